// The eager autograd entry of aefast::unpool_conv_transpose2d (the fused decoder block): the
// forward, called below the Autograd key, plus a C++ backward node.
//
// Why not the registered Python formula (aefast/ops/unpool_deconv.py) on the eager path: the
// torch.library autograd wrapper costs ~65 us of Python to enter (fill_defaults, the Function
// apply) and the engine calls back into Python for the backward, ~0.1-0.4 ms per training step of
// one decoder block (64->32 14x14 N=256: ~5.5 ms of kernels fwd+bwd), more on small decoders.
// Here the forward is one pybind call and the backward never leaves C++. The math is the
// registered formula's, which torch.compile, tensor subclasses and torch.func still use:
//   saved: input, indices, weight, and act_input = the pre-activation for leaky_relu / gelu /
//   silu (the op's second output), else the activated output;
//   backward: (grad_input, grad_W, grad_b) = <ns>::unpool_conv_transpose2d_backward(grad_out,
//   act_input, input, indices, weight, ...), grad_out dense in either layout (the formula's _dense),
//   output_mask = which of the three autograd needs.
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
#include "aefast/unpool_deconv_autograd.h"

namespace aefast {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

constexpr const char* kOp = "unpool_conv_transpose2d";

// The kernels' C++ signatures (csrc/cpu/unpool_deconv.cpp, csrc/cuda/unpool_deconv.cu).
using ForwardSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                      const std::optional<at::Tensor>&, c10::IntArrayRef,
                                                      c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef,
                                                      c10::IntArrayRef, std::optional<c10::string_view>, double);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, c10::IntArrayRef,
    c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, c10::IntArrayRef, std::optional<c10::string_view>, double,
    std::array<bool, 3>);

struct UnpoolDeconvOps {
  c10::TypedOperatorHandle<ForwardSig> forward;
  c10::TypedOperatorHandle<BackwardSig> backward;
};

// The kernels of one namespace: aefast (C++ CPU / CUDA) or aefast_triton (the Triton twins).
const UnpoolDeconvOps& ops_for(const std::string& ns) {
  return cached_ops<UnpoolDeconvOps>(ns, [](const std::string& n) {
    return UnpoolDeconvOps{typed_op<ForwardSig>(n, "unpool_conv_transpose2d"),
                           typed_op<BackwardSig>(n, "unpool_conv_transpose2d_backward")};
  });
}

// aefast/ops/unpool_deconv.py's _dense: t when dense in either layout the kernels read, else contiguous.
at::Tensor dense(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast) ? t : t.contiguous();
}

struct UnpoolConvTranspose2DBackward final : DecoderActNode {
  const UnpoolDeconvOps* ops = nullptr;
  std::array<int64_t, 2> pool_size{}, unpooled_size{};
  SavedVariable indices;

  std::string name() const override { return "aefast::UnpoolConvTranspose2DBackward"; }

  void release_variables() override {
    DecoderActNode::release_variables();
    indices.reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    return input_weight_bias_grads(*this, grads[0], has_bias, kOp, [&](std::array<bool, 3> need) {
      return ops->backward.call(dense(grads[0]), act_input.unpack(getptr()), input.unpack(), indices.unpack(),
                                weight.unpack(), pool_size, unpooled_size, stride, padding, output_padding,
                                activation_arg(activation), negative_slope, need);
    });
  }
};

}  // namespace

at::Tensor unpool_conv_transpose2d_autograd(const std::string& ns, const at::Tensor& input, const at::Tensor& indices,
                                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                            const std::vector<int64_t>& pool_size,
                                            const std::vector<int64_t>& unpooled_size,
                                            const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                                            const std::vector<int64_t>& output_padding,
                                            const std::optional<std::string>& activation, double negative_slope) {
  const UnpoolDeconvOps& ops = ops_for(ns);
  const bool has_bias = bias.has_value() && bias->defined();
  const bool need_grad = at::GradMode::is_enabled() && (input.requires_grad() || weight.requires_grad() ||
                                                        (has_bias && bias->requires_grad()));
  refuse_forward_ad(kOp, {&input, &weight, has_bias ? &*bias : nullptr});
  const auto k = pair_of(pool_size, kOp, "pool_size"), u = pair_of(unpooled_size, kOp, "unpooled_size");
  const auto s = pair_of(stride, kOp, "stride"), p = pair_of(padding, kOp, "padding");
  const auto op = pair_of(output_padding, kOp, "output_padding");
  at::Tensor out, pre;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(out, pre) =
        ops.forward.call(input, indices, weight, bias, k, u, s, p, op, activation_arg(activation), negative_slope);
  }
  if (!need_grad) return out;
  auto node = make_node<UnpoolConvTranspose2DBackward>();
  node->ops = &ops;
  node->pool_size = k;
  node->unpooled_size = u;
  node->attach(input, weight, bias, s, p, op, activation, negative_slope, out, pre);
  node->indices = SavedVariable(indices, /*is_output=*/false);
  return out;
}

void bind_unpool_deconv_autograd(pybind11::module_& m) {
  // The GIL is released while the kernels run, as torch's own bindings do; Triton twins are Python
  // kernels and take it back themselves.
  m.def("unpool_conv_transpose2d_autograd", &unpool_conv_transpose2d_autograd,
        "unpool_conv_transpose2d with its C++ backward node (eager path)",
        pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("ns"), pybind11::arg("input"),
        pybind11::arg("indices"), pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("pool_size"),
        pybind11::arg("unpooled_size"), pybind11::arg("stride"), pybind11::arg("padding"),
        pybind11::arg("output_padding"), pybind11::arg("activation"), pybind11::arg("negative_slope"));
}

}  // namespace aefast
