// The eager autograd entry of aefast::batch_norm_act2d_forward: the fused forward, called below the
// Autograd key, plus a C++ backward node.
//
// Why not the registered Python formula (aefast/ops/batch_norm_act.py) on the eager path: the op
// runs after every conv -> BatchNorm -> activation that no pool follows, often on small maps (a VAE's
// 8x8 stages, SegNet's 24x24 decoder), where the torch.library autograd wrapper's Python on entry and
// the engine's call back into Python for the backward cost about as much as the two memory passes
// themselves. Here the forward is one pybind call and the backward never leaves C++. The math is the
// registered formula's, which torch.compile, tensor subclasses and torch.func still use:
//   saved: input, mean, var (the op's statistics), weight, bias;
//   backward: (grad_input, grad_weight, grad_bias) = <ns>::batch_norm_act2d_backward(grad_out, input,
//   mean, var, weight, bias, eps, activation, negative_slope), output_mask = what autograd needs.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor, std::optional for pybind11

#include <optional>
#include <string>
#include <tuple>

#include "aefast/autograd_entry.h"
#include "aefast/batch_norm_act_autograd.h"

namespace aefast {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The kernels' C++ signatures (csrc/cpu/batch_norm_act.cpp, csrc/cuda/batch_norm_act.cu).
using ForwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                                  const std::optional<at::Tensor>&, double, int64_t,
                                                                  double);
using BackwardSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
    const std::optional<at::Tensor>&, double, int64_t, double, std::array<bool, 3>);

struct BatchNormActOps {
  c10::TypedOperatorHandle<ForwardSig> forward;
  c10::TypedOperatorHandle<BackwardSig> backward;
};

// The kernels of one namespace: aefast (C++ CPU / CUDA) or aefast_triton (the Triton twins).
const BatchNormActOps& ops_for(const std::string& ns) {
  return cached_ops<BatchNormActOps>(ns, [](const std::string& n) {
    return BatchNormActOps{typed_op<ForwardSig>(n, "batch_norm_act2d_forward"),
                           typed_op<BackwardSig>(n, "batch_norm_act2d_backward")};
  });
}

struct BatchNormActBackward final : torch::autograd::Node {
  const BatchNormActOps* ops = nullptr;
  double eps = 1e-5, negative_slope = 0.01;
  int64_t activation = 0;
  bool has_weight = false, has_bias = false;
  SavedVariable input, mean, var, weight, bias;

  std::string name() const override { return "aefast::BatchNormAct2DBackward"; }

  void release_variables() override {
    for (SavedVariable* v : {&input, &mean, &var, &weight, &bias}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(3);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return out;  // the output was not used (grads are not zero-filled)
    TORCH_CHECK(!at::GradMode::is_enabled(), "aefast: double backward (create_graph=True) through ",
                "batch_norm_act2d is not supported; use aefast.set_backend('reference') for higher-order gradients");
    const std::array<bool, 3> need{task_should_compute_output(0), has_weight && task_should_compute_output(1),
                                   has_bias && task_should_compute_output(2)};
    if (!(need[0] || need[1] || need[2])) return out;
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const std::optional<at::Tensor> w = has_weight ? std::optional<at::Tensor>(weight.unpack()) : std::nullopt;
    const std::optional<at::Tensor> b = has_bias ? std::optional<at::Tensor>(bias.unpack()) : std::nullopt;
    auto [gi, gw, gb] = ops->backward.call(grad, input.unpack(), mean.unpack(), var.unpack(), w, b, eps, activation,
                                           negative_slope, need);
    if (need[0]) out[0] = std::move(gi);
    if (need[1]) out[1] = std::move(gw);
    if (need[2]) out[2] = std::move(gb);
    return out;
  }
};

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act2d_autograd(
    const std::string& ns, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t activation, double negative_slope) {
  const BatchNormActOps& ops = ops_for(ns);
  const bool has_weight = weight.has_value() && weight->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  const bool need_grad = at::GradMode::is_enabled() &&
                         (input.requires_grad() || (has_weight && weight->requires_grad()) ||
                          (has_bias && bias->requires_grad()));
  refuse_forward_ad("batch_norm_act2d", {&input, has_weight ? &*weight : nullptr, has_bias ? &*bias : nullptr});
  at::Tensor out, mean, var;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(out, mean, var) = ops.forward.call(input, weight, bias, eps, activation, negative_slope);
  }
  if (!need_grad) return {out, mean, var};
  auto node = make_node<BatchNormActBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, has_weight ? *weight : at::Tensor(),
                                                           has_bias ? *bias : at::Tensor()));
  node->ops = &ops;
  node->eps = eps;
  node->activation = activation;
  node->negative_slope = negative_slope;
  node->has_weight = has_weight;
  node->has_bias = has_bias;
  torch::autograd::set_history(out, node);
  node->input = SavedVariable(input, /*is_output=*/false);
  node->mean = SavedVariable(mean, /*is_output=*/false);
  node->var = SavedVariable(var, /*is_output=*/false);
  if (has_weight) node->weight = SavedVariable(*weight, /*is_output=*/false);
  if (has_bias) node->bias = SavedVariable(*bias, /*is_output=*/false);
  return {out, mean, var};
}

namespace {

// The CPU fast path of update_running_stats: one loop over the channels, in the running
// statistics' dtype T, with the operations (and roundings) of the ATen ops below: the scalar factors
// are rounded to T first, as a Python number is when it multiplies a T tensor.
template <typename T>
void update_running_stats_loop(at::Tensor& running_mean, at::Tensor& running_var, const at::Tensor& mean,
                               const at::Tensor& var, T factor, T keep, T unbias) {
  T* rm = running_mean.mutable_data_ptr<T>();
  T* rv = running_var.mutable_data_ptr<T>();
  const T* m = mean.const_data_ptr<T>();
  const T* v = var.const_data_ptr<T>();
  for (int64_t c = 0; c < running_mean.numel(); ++c) {
    const T a = rm[c] * keep, b = m[c] * factor;
    rm[c] = a + b;
    const T u = v[c] * unbias;
    const T d = rv[c] * keep, e = u * factor;
    rv[c] = d + e;
  }
}

}  // namespace

void update_running_stats(const std::optional<at::Tensor>& running_mean_opt,
                          const std::optional<at::Tensor>& running_var_opt,
                          const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
                          const at::Tensor& mean, const at::Tensor& var, int64_t count) {
  at::NoGradGuard no_grad;
  const bool tracked = num_batches_tracked.has_value() && num_batches_tracked->defined();
  if (tracked) num_batches_tracked->add_(1);
  if (!(running_mean_opt.has_value() && running_mean_opt->defined())) return;
  TORCH_CHECK(running_var_opt.has_value() && running_var_opt->defined(),
              "aefast: update_running_stats needs both running_mean and running_var");
  TORCH_CHECK(count > 1, "aefast: update_running_stats needs more than one value per channel, got ", count);
  at::Tensor running_mean = *running_mean_opt, running_var = *running_var_opt;
  if (!momentum.has_value() && !tracked) return;  // torch's factor 0.0: the running statistics stay
  const double unbias = static_cast<double>(count) / static_cast<double>(count - 1);
  const auto dtype = running_mean.scalar_type();
  const bool fast = running_mean.device().is_cpu() && (dtype == at::kFloat || dtype == at::kDouble) &&
                    running_var.scalar_type() == dtype && mean.scalar_type() == dtype &&
                    var.scalar_type() == dtype && mean.device().is_cpu() && var.device().is_cpu() &&
                    running_mean.is_contiguous() && running_var.is_contiguous() && mean.is_contiguous() &&
                    var.is_contiguous() && running_mean.numel() == mean.numel() &&
                    running_var.numel() == var.numel() && running_mean.numel() == running_var.numel() &&
                    (momentum.has_value() || num_batches_tracked->device().is_cpu());
  if (fast) {
    AT_DISPATCH_FLOATING_TYPES(dtype, "aefast_update_running_stats", [&] {
      scalar_t factor, keep;
      if (momentum.has_value()) {
        factor = static_cast<scalar_t>(*momentum);
        keep = static_cast<scalar_t>(1.0 - *momentum);
      } else {  // 1 / num_batches_tracked in T (a reciprocal), and 1 - that in T
        const scalar_t reciprocal = scalar_t(1) / static_cast<scalar_t>(num_batches_tracked->item<int64_t>());
        factor = reciprocal * scalar_t(1);
        keep = scalar_t(1) - factor;
      }
      update_running_stats_loop<scalar_t>(running_mean, running_var, mean, var, factor, keep,
                                          static_cast<scalar_t>(unbias));
    });
    return;
  }
  // Any other device or dtype: the reference's tensor ops (no host synchronisation on CUDA).
  const at::Tensor unbiased = var * unbias;
  if (momentum.has_value()) {
    running_mean.mul_(1.0 - *momentum).add_(mean.to(dtype) * *momentum);
    running_var.mul_(1.0 - *momentum).add_(unbiased.to(running_var.scalar_type()) * *momentum);
  } else {
    const at::Tensor factor = num_batches_tracked->to(dtype).reciprocal() * 1.0;
    const at::Tensor keep = at::rsub(factor, 1);
    running_mean.mul_(keep).add_(mean.to(dtype) * factor);
    running_var.mul_(keep).add_(unbiased.to(running_var.scalar_type()) * factor);
  }
}

void bind_batch_norm_act_autograd(pybind11::module_& m) {
  m.def("update_running_stats", &update_running_stats,
        "nn.BatchNorm2d's training-mode update of running_mean, running_var and num_batches_tracked, in place, "
        "from the batch mean and biased var of count values per channel (aefast.reference.functional."
        "update_running_stats is its specification)",
        pybind11::arg("running_mean"), pybind11::arg("running_var"), pybind11::arg("num_batches_tracked"),
        pybind11::arg("momentum"), pybind11::arg("mean"), pybind11::arg("var"), pybind11::arg("count"));
  // The GIL is released while the kernels run, as torch's own bindings do; Triton twins are Python
  // kernels and take it back themselves.
  m.def("batch_norm_act2d_autograd", &batch_norm_act2d_autograd,
        "batch_norm_act2d_forward with its C++ backward node (eager path): (out, mean, var)",
        pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("ns"), pybind11::arg("input"),
        pybind11::arg("weight"), pybind11::arg("bias"), pybind11::arg("eps"), pybind11::arg("activation"),
        pybind11::arg("negative_slope"));
}

}  // namespace aefast
