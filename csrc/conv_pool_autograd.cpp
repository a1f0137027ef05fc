// The eager autograd entry of aefast::conv_pool2d_forward (clean input): the fused forward, called
// below the Autograd key, plus a C++ backward node.
//
// Why not the registered Python formula (aefast/ops/conv_pool.py) on the eager path: FCN-8s' and
// VGG-style encoders close each stage with a fused conv -> act -> pool on small maps (12x12, 6x6,
// 3x3 with 16-32 channels, ~100-400 us of kernels fwd+bwd), where the torch.library autograd
// wrapper's Python on entry and the engine's call back into Python for the backward cost a large
// part of the kernels' own time and made the fused block slower than eager's conv -> relu -> pool
// in channels_last. Here the forward is one pybind call and the backward never leaves C++. The math
// is the registered formula's (aefast/ops/conv_pool.py, _make_forward_backward), which
// torch.compile, tensor subclasses, torch.func and the corruption-in-the-load path still use:
//   saved: input (when the weight or bias needs a gradient), weight (when the input does), and the
//   op's pooled-size bookkeeping window and preact;
//   backward: gz once for both gradients through <ns>::conv_pool2d_backward when the input and the
//   weight or bias need gradients, else <ns>::conv_pool2d_backward_input / _backward_weight alone.
// The grad reaching the node is made contiguous in preact's layout first (the kernels read the
// pooled tensors in one layout), as the formula does.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor, std::optional / std::vector for pybind11

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "aefast/autograd_entry.h"
#include "aefast/conv_pool_autograd.h"

namespace aefast {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The kernels' C++ signatures (csrc/cpu/conv_pool.cpp; schemas in csrc/ops.cpp).
using ForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, c10::IntArrayRef, c10::IntArrayRef,
    int64_t, double, c10::IntArrayRef, c10::string_view, double, int64_t, double, double, c10::IntArrayRef, bool);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
    c10::IntArrayRef, int64_t, double, c10::IntArrayRef, c10::string_view, double, int64_t, double, double,
    c10::IntArrayRef, bool);
using BackwardInputSig = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, int64_t, double,
                                    c10::IntArrayRef, c10::IntArrayRef, bool);
using BackwardWeightSig = std::tuple<at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
    c10::IntArrayRef, int64_t, double, c10::IntArrayRef, c10::string_view, double, int64_t, double, double,
    c10::IntArrayRef, bool);

struct ConvPoolOps {
  c10::TypedOperatorHandle<ForwardSig> forward;
  c10::TypedOperatorHandle<BackwardSig> backward;
  c10::TypedOperatorHandle<BackwardInputSig> backward_input;
  c10::TypedOperatorHandle<BackwardWeightSig> backward_weight;
};

// The kernels of one namespace: aefast (C++ CPU / CUDA) or aefast_triton (the Triton twins).
const ConvPoolOps& ops_for(const std::string& ns) {
  return cached_ops<ConvPoolOps>(ns, [](const std::string& n) {
    return ConvPoolOps{typed_op<ForwardSig>(n, "conv_pool2d_forward"),
                       typed_op<BackwardSig>(n, "conv_pool2d_backward"),
                       typed_op<BackwardInputSig>(n, "conv_pool2d_backward_input"),
                       typed_op<BackwardWeightSig>(n, "conv_pool2d_backward_weight")};
  });
}

// aefast/ops/conv_pool.py's _memory_format: channels-last and not also plainly contiguous.
at::MemoryFormat layout_of(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

constexpr c10::string_view kClean = "none";  // no corruption in the load on this path

struct ConvPool2DBackward final : torch::autograd::Node {
  const ConvPoolOps* ops = nullptr;
  std::array<int64_t, 2> stride{}, padding{}, pool_size{}, pool_stride{}, input_size{}, kernel_size{};
  int64_t activation = 0;
  double negative_slope = 0.01;
  bool ceil_mode = false;
  bool has_bias = false;
  SavedVariable input, weight, window, preact;

  std::string name() const override { return "aefast::ConvPool2DBackward"; }

  void release_variables() override {
    for (SavedVariable* v : {&input, &weight, &window, &preact}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(3);
    at::Tensor grad = grads[0];
    if (!grad.defined()) return out;  // the pooled output was not used (grads are not zero-filled)
    // The backward ops have no autograd formula of their own: refuse a second derivative rather
    // than return a silently wrong one.
    TORCH_CHECK(!at::GradMode::is_enabled(), "aefast: double backward (create_graph=True) through conv_pool2d is ",
                "not supported; use aefast.set_backend('reference') for higher-order gradients");
    const bool need_input = task_should_compute_output(0);
    const bool need_weight = task_should_compute_output(1);
    const bool need_bias = has_bias && task_should_compute_output(2);
    if (!(need_input || need_weight || need_bias)) return out;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const at::Tensor window_t = window.unpack(), preact_t = preact.unpack();
    const at::MemoryFormat fmt = layout_of(preact_t);
    if (!grad.is_contiguous(fmt)) grad = grad.contiguous(fmt);
    if (need_input && (need_weight || need_bias)) {  // one call: gz computed once for both
      auto [gi, gw, gb] = ops->backward.call(grad, window_t, preact_t, input.unpack(), weight.unpack(), stride,
                                             padding, activation, negative_slope, pool_size, kClean, 0.0, 0, 0.0,
                                             1.0, pool_stride, ceil_mode);
      out[0] = std::move(gi);
      if (need_weight) out[1] = std::move(gw);
      if (need_bias) out[2] = std::move(gb);
      return out;
    }
    if (need_input) {
      out[0] = ops->backward_input.call(grad, window_t, preact_t, weight.unpack(), input_size, stride, padding,
                                        activation, negative_slope, pool_size, pool_stride, ceil_mode);
      return out;
    }
    auto [gw, gb] = ops->backward_weight.call(grad, window_t, preact_t, input.unpack(), kernel_size, stride, padding,
                                              activation, negative_slope, pool_size, kClean, 0.0, 0, 0.0, 1.0,
                                              pool_stride, ceil_mode);
    if (need_weight) out[1] = std::move(gw);
    if (need_bias) out[2] = std::move(gb);
    return out;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor> conv_pool2d_autograd(const std::string& ns, const at::Tensor& input,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::vector<int64_t>& stride,
                                                        const std::vector<int64_t>& padding, int64_t activation,
                                                        double negative_slope, const std::vector<int64_t>& pool_size,
                                                        const std::vector<int64_t>& pool_stride, bool ceil_mode) {
  const ConvPoolOps& ops = ops_for(ns);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool grad_mode = at::GradMode::is_enabled();
  const bool needs[3] = {grad_mode && input.requires_grad(), grad_mode && weight.requires_grad(),
                         grad_mode && has_bias && bias->requires_grad()};
  refuse_forward_ad("conv_pool2d", {&input, &weight, has_bias ? &*bias : nullptr});
  const auto s = pair_of(stride, "conv_pool2d", "stride"), p = pair_of(padding, "conv_pool2d", "padding");
  const auto k = pair_of(pool_size, "conv_pool2d", "pool_size");
  const auto ps = pair_of(pool_stride, "conv_pool2d", "pool_stride");
  at::Tensor pooled, window, preact;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(pooled, window, preact) = ops.forward.call(input, weight, bias, s, p, activation, negative_slope, k,
                                                        kClean, 0.0, 0, 0.0, 1.0, ps, ceil_mode);
  }
  if (!(needs[0] || needs[1] || needs[2])) return {pooled, window};
  auto node = make_node<ConvPool2DBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, has_bias ? *bias : at::Tensor()));
  node->ops = &ops;
  node->stride = s;
  node->padding = p;
  node->pool_size = k;
  node->pool_stride = ps;
  node->ceil_mode = ceil_mode;
  node->activation = activation;
  node->negative_slope = negative_slope;
  node->has_bias = has_bias;
  node->input_size = {input.size(-2), input.size(-1)};
  node->kernel_size = {weight.size(-2), weight.size(-1)};
  torch::autograd::set_history(pooled, node);
  // Only what the needed gradients read: the input for the weight / bias gradient, the weight for
  // the input gradient (as the registered formula saves).
  if (needs[1] || needs[2]) node->input = SavedVariable(input, /*is_output=*/false);
  if (needs[0]) node->weight = SavedVariable(weight, /*is_output=*/false);
  // window is also returned: saved as a plain input, an in-place change of it after the forward
  // makes the backward raise instead of routing gradients to the wrong positions.
  node->window = SavedVariable(window, /*is_output=*/false);
  node->preact = SavedVariable(preact, /*is_output=*/false);
  return {pooled, window};
}

void bind_conv_pool_autograd(pybind11::module_& m) {
  // The GIL is released while the kernels run, as torch's own bindings do; Triton twins are Python
  // kernels and take it back themselves.
  m.def("conv_pool2d_autograd", &conv_pool2d_autograd, "conv_pool2d with its C++ backward node (eager path)",
        pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("ns"), pybind11::arg("input"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("activation"), pybind11::arg("negative_slope"), pybind11::arg("pool_size"),
        pybind11::arg("pool_stride"), pybind11::arg("ceil_mode"));
}

}  // namespace aefast
