// The eager autograd entry of aefast::conv_transpose_act2d: the fused forward, called below the
// Autograd key, plus a C++ backward node.
//
// Why not the registered Python formula (aefast/ops/conv_transpose_act.py) on the eager path: the
// op sits at the end of a small decoder (a conv VAE's last ConvTranspose2d -> Sigmoid, N128 16x16:
// ~400 us of oneDNN fwd+bwd), and the torch.library autograd wrapper cost ~40 us to enter plus the
// engine's call back into Python for the backward, which made the fused site slower than eager's
// conv_transpose2d -> sigmoid. Here the forward is one pybind call and the backward never leaves
// C++. The math is the registered formula's, which torch.compile, tensor subclasses and torch.func
// still use:
//   saved: input, weight, and act_input = the pre-activation for leaky_relu / gelu / silu (the op's
//   second output), else the activated output (relu / sigmoid / tanh take act' from it; none
//   ignores it);
//   backward: (grad_input, grad_W, grad_b) = <ns>::conv_transpose_act2d_backward(grad_out,
//   act_input, input, weight, ...), with output_mask = which of the three autograd needs.
// The pre-activation is never returned to Python on this path, so no gradient reaches it.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor, std::optional / std::vector for pybind11

#include <optional>
#include <string>
#include <vector>

#include "aefast/autograd_entry.h"
#include "aefast/conv_transpose_act_autograd.h"

namespace aefast {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The kernels' C++ signatures (csrc/cpu/conv_transpose_act.cpp, csrc/cuda/conv_transpose_act.cu).
using ForwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&, c10::IntArrayRef,
                                                      c10::IntArrayRef, c10::IntArrayRef,
                                                      std::optional<c10::string_view>, double);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef,
    c10::IntArrayRef, std::optional<c10::string_view>, double, std::array<bool, 3>);

struct ConvTransposeActOps {
  c10::TypedOperatorHandle<ForwardSig> forward;
  c10::TypedOperatorHandle<BackwardSig> backward;
};

// The kernels of one namespace: aefast (C++ CPU / CUDA) or aefast_triton (the Triton twins).
const ConvTransposeActOps& ops_for(const std::string& ns) {
  return cached_ops<ConvTransposeActOps>(ns, [](const std::string& n) {
    return ConvTransposeActOps{typed_op<ForwardSig>(n, "conv_transpose_act2d"),
                               typed_op<BackwardSig>(n, "conv_transpose_act2d_backward")};
  });
}

struct ConvTransposeActBackward final : DecoderActNode {
  const ConvTransposeActOps* ops = nullptr;

  std::string name() const override { return "aefast::ConvTransposeAct2DBackward"; }

  variable_list apply(variable_list&& grads) override {
    return input_weight_bias_grads(*this, grads[0], has_bias, "conv_transpose_act2d", [&](std::array<bool, 3> need) {
      return ops->backward.call(grads[0], act_input.unpack(getptr()), input.unpack(), weight.unpack(), stride, padding,
                                output_padding, activation_arg(activation), negative_slope, need);
    });
  }
};

}  // namespace

at::Tensor conv_transpose_act2d_autograd(const std::string& ns, const at::Tensor& input, const at::Tensor& weight,
                                         const std::optional<at::Tensor>& bias, const std::vector<int64_t>& stride,
                                         const std::vector<int64_t>& padding,
                                         const std::vector<int64_t>& output_padding,
                                         const std::optional<std::string>& activation, double negative_slope) {
  const ConvTransposeActOps& ops = ops_for(ns);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool grad_mode = at::GradMode::is_enabled();
  const bool need_grad = grad_mode && (input.requires_grad() || weight.requires_grad() ||
                                       (has_bias && bias->requires_grad()));
  refuse_forward_ad("conv_transpose_act2d", {&input, &weight, has_bias ? &*bias : nullptr});
  const auto s = pair_of(stride, "conv_transpose_act2d", "stride");
  const auto p = pair_of(padding, "conv_transpose_act2d", "padding");
  const auto op = pair_of(output_padding, "conv_transpose_act2d", "output_padding");
  at::Tensor out, pre;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(out, pre) = ops.forward.call(input, weight, bias, s, p, op, activation_arg(activation), negative_slope);
  }
  if (!need_grad) return out;
  auto node = make_node<ConvTransposeActBackward>();
  node->ops = &ops;
  node->attach(input, weight, bias, s, p, op, activation, negative_slope, out, pre);
  return out;
}

void bind_conv_transpose_act_autograd(pybind11::module_& m) {
  // The GIL is released while the kernels run, as torch's own bindings do; Triton twins are Python
  // kernels and take it back themselves.
  m.def("conv_transpose_act2d_autograd", &conv_transpose_act2d_autograd,
        "conv_transpose_act2d with its C++ backward node (eager path)",
        pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("ns"), pybind11::arg("input"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("output_padding"), pybind11::arg("activation"), pybind11::arg("negative_slope"));
}

}  // namespace aefast
