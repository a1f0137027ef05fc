// The eager autograd entry of aefast::conv_bn_pool2d_forward: the fused forward, called below the
// Autograd key, plus a C++ backward node.
//
// Why not the registered Python formula (aefast/ops/conv_bn_pool.py) on the eager path: the op also
// serves conv -> BatchNorm -> activation blocks with no pool (1x1 windows: a conv VAE's stride-2
// encoder, aefast.optimize's conv_batch_norm_act rewrite) on small maps, where the torch.library
// autograd wrapper's Python on entry and the engine's call back into Python for the backward cost as
// much as the conv itself. Here the forward is one pybind call and the backward never leaves C++.
// The math is the registered formula's, which torch.compile, tensor subclasses and torch.func still use:
//   saved: window, conv_out, mean, var (the op's outputs), input, weight, bn_weight, bn_bias;
//   backward: (grad_input, grad_weight, grad_bias, grad_bn_weight, grad_bn_bias) =
//   <ns>::conv_bn_pool2d_backward(grad_pooled, window, conv_out, mean, var, input, weight, bn_weight,
//   bn_bias, ...), output_mask = which of the five autograd needs (and are present).
// Only the pooled map carries the history; window, conv_out, mean and var are not differentiable.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor, std::optional / std::vector for pybind11

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "aefast/autograd_entry.h"
#include "aefast/conv_bn_pool_autograd.h"
#include "aefast/conv_direct.h"

namespace aefast {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;
using Five = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using OptTensor = std::optional<at::Tensor>;

// The kernels' C++ signatures (csrc/cpu/conv_bn_pool.cpp, csrc/cuda/conv_bn_pool.cu).
using ForwardSig = Five(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const OptTensor&,
                        c10::IntArrayRef, c10::IntArrayRef, double, int64_t, double, c10::IntArrayRef,
                        c10::IntArrayRef, bool);
using BackwardSig = Five(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                         const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&,
                         c10::IntArrayRef, c10::IntArrayRef, double, int64_t, double, c10::IntArrayRef,
                         std::array<bool, 5>, c10::IntArrayRef, bool);

struct ConvBnPoolOps {
  c10::TypedOperatorHandle<ForwardSig> forward;
  c10::TypedOperatorHandle<BackwardSig> backward;
};

// The kernels of one namespace: aefast (C++ CPU / CUDA) or aefast_triton (the Triton twins).
const ConvBnPoolOps& ops_for(const std::string& ns) {
  return cached_ops<ConvBnPoolOps>(ns, [](const std::string& n) {
    return ConvBnPoolOps{typed_op<ForwardSig>(n, "conv_bn_pool2d_forward"),
                         typed_op<BackwardSig>(n, "conv_bn_pool2d_backward")};
  });
}

struct ConvBnPoolBackward final : torch::autograd::Node {
  const ConvBnPoolOps* ops = nullptr;
  std::array<int64_t, 2> stride{}, padding{}, pool_size{}, pool_stride{};
  double eps = 1e-5, negative_slope = 0.01;
  int64_t activation = 0;
  bool ceil_mode = false;
  std::array<bool, 5> present{};  // input, weight, bias, bn_weight, bn_bias
  SavedVariable window, conv_out, mean, var, input, weight, bn_weight, bn_bias;

  std::string name() const override { return "aefast::ConvBnPool2DBackward"; }

  void release_variables() override {
    for (SavedVariable* v : {&window, &conv_out, &mean, &var, &input, &weight, &bn_weight, &bn_bias}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(5);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return out;  // the pooled map was not used (grads are not zero-filled)
    TORCH_CHECK(!at::GradMode::is_enabled(), "aefast: double backward (create_graph=True) through ",
                "conv_bn_pool2d is not supported; use aefast.set_backend('reference') for higher-order gradients");
    std::array<bool, 5> need{};
    bool any = false;
    for (size_t i = 0; i < 5; ++i) any |= need[i] = present[i] && task_should_compute_output(i);
    if (!any) return out;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const OptTensor g = present[3] ? OptTensor(bn_weight.unpack()) : std::nullopt;
    const OptTensor b = present[4] ? OptTensor(bn_bias.unpack()) : std::nullopt;
    auto result = ops->backward.call(grad.contiguous(), window.unpack(), conv_out.unpack(), mean.unpack(),
                                     var.unpack(), input.unpack(), weight.unpack(), g, b, stride, padding, eps,
                                     activation, negative_slope, pool_size, need, pool_stride, ceil_mode);
    if (need[0]) out[0] = std::move(std::get<0>(result));
    if (need[1]) out[1] = std::move(std::get<1>(result));
    if (need[2]) out[2] = std::move(std::get<2>(result));
    if (need[3]) out[3] = std::move(std::get<3>(result));
    if (need[4]) out[4] = std::move(std::get<4>(result));
    return out;
  }
};

}  // namespace

Five conv_bn_pool2d_autograd(const std::string& ns, const at::Tensor& input, const at::Tensor& weight,
                             const OptTensor& bias, const OptTensor& bn_weight, const OptTensor& bn_bias,
                             const std::vector<int64_t>& stride, const std::vector<int64_t>& padding, double eps,
                             int64_t activation, double negative_slope, const std::vector<int64_t>& pool_size,
                             const std::vector<int64_t>& pool_stride, bool ceil_mode) {
  const ConvBnPoolOps& ops = ops_for(ns);
  const std::array<bool, 5> present{true, true, bias.has_value() && bias->defined(),
                                    bn_weight.has_value() && bn_weight->defined(),
                                    bn_bias.has_value() && bn_bias->defined()};
  const std::array<const at::Tensor*, 5> tensors{&input, &weight, present[2] ? &*bias : nullptr,
                                                 present[3] ? &*bn_weight : nullptr,
                                                 present[4] ? &*bn_bias : nullptr};
  refuse_forward_ad("conv_bn_pool2d", {tensors[0], tensors[1], tensors[2], tensors[3], tensors[4]});
  bool need_grad = false;
  for (const at::Tensor* t : tensors) need_grad |= t != nullptr && t->requires_grad();
  need_grad &= at::GradMode::is_enabled();
  const auto s = pair_of(stride, "conv_bn_pool2d", "stride"), p = pair_of(padding, "conv_bn_pool2d", "padding");
  const auto k = pair_of(pool_size, "conv_bn_pool2d", "pool_size");
  const auto ks = pair_of(pool_stride, "conv_bn_pool2d", "pool_stride");
  Five result;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    result = ops.forward.call(input, weight, bias, bn_weight, bn_bias, s, p, eps, activation, negative_slope, k, ks,
                              ceil_mode);
  }
  if (!need_grad) return result;
  auto& [pooled, window, conv_out, mean, var] = result;
  auto node = make_node<ConvBnPoolBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, weight, present[2] ? *bias : at::Tensor(),
                                                           present[3] ? *bn_weight : at::Tensor(),
                                                           present[4] ? *bn_bias : at::Tensor()));
  node->ops = &ops;
  node->stride = s;
  node->padding = p;
  node->pool_size = k;
  node->pool_stride = ks;
  node->eps = eps;
  node->negative_slope = negative_slope;
  node->activation = activation;
  node->ceil_mode = ceil_mode;
  node->present = present;
  torch::autograd::set_history(pooled, node);
  node->window = SavedVariable(window, /*is_output=*/false);
  node->conv_out = SavedVariable(conv_out, /*is_output=*/false);
  node->mean = SavedVariable(mean, /*is_output=*/false);
  node->var = SavedVariable(var, /*is_output=*/false);
  node->input = SavedVariable(input, /*is_output=*/false);
  node->weight = SavedVariable(weight, /*is_output=*/false);
  if (present[3]) node->bn_weight = SavedVariable(*bn_weight, /*is_output=*/false);
  if (present[4]) node->bn_bias = SavedVariable(*bn_bias, /*is_output=*/false);
  return result;
}

void bind_conv_bn_pool_autograd(pybind11::module_& m) {
  // The GIL is released while the kernels run, as torch's own bindings do; Triton twins are Python
  // kernels and take it back themselves.
  m.def("conv_bn_pool2d_autograd", &conv_bn_pool2d_autograd,
        "conv_bn_pool2d_forward with its C++ backward node (eager path): (pooled, window, conv_out, mean, var)",
        pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("ns"), pybind11::arg("input"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("bn_weight"), pybind11::arg("bn_bias"),
        pybind11::arg("stride"), pybind11::arg("padding"), pybind11::arg("eps"), pybind11::arg("activation"),
        pybind11::arg("negative_slope"), pybind11::arg("pool_size"), pybind11::arg("pool_stride"),
        pybind11::arg("ceil_mode"));
  // The direct small-channel conv kernels of conv_bn_pool2d's CPU forward and backward
  // (csrc/cpu/conv_direct.cpp), for the tests to hold them to torch's conv2d and its backward (the
  // weight gradient in both of its uses: Conv2d, ConvTranspose2d).
  m.def(
      "conv_weight_grad_direct",
      [](const at::Tensor& grad, const at::Tensor& x, int64_t kh, int64_t kw, std::vector<int64_t> stride,
         std::vector<int64_t> padding, bool want_bias) {
        return conv_weight_grad_direct(grad, x, kh, kw, stride, padding, want_bias);
      },
      "(grad_weight, grad_bias) of a conv by direct accumulation (CPU, fp32/fp64; aefast/conv_direct.h)",
      pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("grad"), pybind11::arg("x"),
      pybind11::arg("kh"), pybind11::arg("kw"), pybind11::arg("stride"), pybind11::arg("padding"),
      pybind11::arg("want_bias"));
  m.def(
      "conv_forward_direct",
      [](const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
         std::vector<int64_t> stride, std::vector<int64_t> padding) {
        return conv_forward_direct(x, weight, bias, stride, padding);
      },
      "conv2d by direct accumulation (CPU, fp32/fp64, channels-last result; aefast/conv_direct.h)",
      pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("x"), pybind11::arg("weight"),
      pybind11::arg("bias"), pybind11::arg("stride"), pybind11::arg("padding"));
}

}  // namespace aefast
