// The eager autograd entry of aefast::recon_loss: the fused forward kernel, called below the
// Autograd key, plus a C++ backward node.
//
// Why not a Python torch.autograd.Function: on a 256x1x28x28 batch the whole fused kernel takes
// ~15 us, while a Python Function costs ~13 us to enter and ~8 us more for the engine to call
// back into Python for the backward. Here the forward is one pybind call and the backward never
// leaves C++. The math is the registered Python formula's (aefast/ops/recon_loss.py, which
// torch.compile and tensor subclasses still use):
//
//   mean / sum / per_sample: the forward already wrote dl/dx (and dl/dt for bce kinds) with the
//     reduction's scale applied, so grad_x = loss_grad_scale(g, saved, 1) and, for mse/l1/huber
//     (dl/dt = -dl/dx), grad_t = loss_grad_scale(g, saved, -1). When g is the plain CPU scalar
//     1.0 (loss.backward()), the saved buffer IS the answer and is returned without a pass.
//   none, mse/l1/huber: nothing is saved in the forward; the backward is one more fused pass
//     with weight = g (* weight) and reduction "sum", since dl_i/dx_i * g_i is the gradient of
//     sum_i g_i l_i. bce kinds keep the saved gradient (a recompute would pay log/exp twice).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/csrc/utils/pybind.h>  // at::Tensor <-> torch.Tensor for pybind11

#include <string>

#include "aefast/autograd_entry.h"
#include "aefast/recon_loss_autograd.h"

namespace aefast {
namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using ReconLossSig = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                                     const std::optional<at::Tensor>&,
                                                                     const std::optional<at::Tensor>&,
                                                                     c10::string_view, c10::string_view, double,
                                                                     bool, bool);
using GradScaleSig = at::Tensor(const at::Tensor&, const at::Tensor&, double);

struct LossOps {
  c10::TypedOperatorHandle<ReconLossSig> loss;
  c10::TypedOperatorHandle<GradScaleSig> scale;
};

// The kernels of one namespace: aefast (C++ CPU / CUDA) or aefast_triton (the Triton twins).
const LossOps& ops_for(const std::string& ns) {
  return cached_ops<LossOps>(ns, [](const std::string& n) {
    return LossOps{typed_op<ReconLossSig>(n, "recon_loss"),
                   typed_op<GradScaleSig>(n, "loss_grad_scale")};
  });
}

bool owns_target_grad(const std::string& kind) { return kind == "bce" || kind == "bce_logits"; }

// grad_output is a plain CPU scalar equal to 1 (not a subclass or a functorch/functional wrapper,
// whose value must not be read here).
bool is_plain_cpu_one(const at::Tensor& g) {
  static const c10::DispatchKeySet wrapped({c10::DispatchKey::Python, c10::DispatchKey::FuncTorchBatched,
                                            c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::Functionalize});
  if (g.dim() != 0 || !g.device().is_cpu() || g.key_set().has_any(wrapped)) return false;
  // Read in place: item() is a dispatcher call, a sizeable part of this node's ~3 us.
  bool one = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "aefast_is_one", [&] {
    one = static_cast<double>(*g.const_data_ptr<scalar_t>()) == 1.0;
  });
  return one;
}

at::Tensor scaled(const LossOps& ops, const at::Tensor& grad, const at::Tensor& saved, double alpha,
                  const char* what) {
  TORCH_CHECK(saved.numel() != 0 || grad.numel() == 0, "aefast: the forward was called without computing the ",
              "gradient w.r.t. ", what, "; call the op with its grad flag set when that tensor requires grad");
  // (fp16/bf16 save fp32 gradients: the scale kernel's rounding is then their only one)
  if (alpha == 1.0 && saved.scalar_type() == grad.scalar_type() && is_plain_cpu_one(grad)) return saved;
  return ops.scale.call(grad, saved, alpha);
}

struct ReconLossBackward final : Node {
  const LossOps* ops = nullptr;
  std::string kind, reduction;
  double delta = 1.0;
  SavedVariable grad_input, grad_target;                 // the forward's dl/dx, dl/dt (maybe empty)
  SavedVariable input, target, weight, pos_weight;       // reduction none's recompute only

  std::string name() const override { return "aefast::ReconLossBackward"; }

  void release_variables() override {
    for (SavedVariable* v : {&grad_input, &grad_target, &input, &target, &weight, &pos_weight}) v->reset_data();
  }

  variable_list apply(variable_list&& grads) override {
    variable_list out(2);
    const at::Tensor& grad = grads[0];
    if (!grad.defined()) return out;  // the loss was not used (grads are not zero-filled)
    // The saved gradient is a constant to autograd: a graph through it would have no second
    // derivative, so refuse rather than return a silently wrong Hessian.
    TORCH_CHECK(!at::GradMode::is_enabled(), "aefast: double backward (create_graph=True) through the fused loss ",
                "is not supported; use aefast.set_backend('reference') for higher-order gradients");
    const bool need_x = task_should_compute_output(0), need_t = task_should_compute_output(1);
    const bool own_t = owns_target_grad(kind);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor gx = grad_input.unpack(), gt = grad_target.unpack();
    if (reduction == "none" && gx.numel() == 0 && gt.numel() == 0) {
      const at::Tensor w = weight.unpack();
      const at::Tensor w_eff = w.defined() ? grad * w : grad.contiguous();
      const at::Tensor pw = pos_weight.unpack();
      auto [_, rx, rt] = ops->loss.call(input.unpack(), target.unpack(), w_eff,
                                        pw.defined() ? std::optional<at::Tensor>(pw) : std::nullopt, kind, "sum",
                                        delta, need_x || (need_t && !own_t), need_t && own_t);
      const at::ScalarType dtype = input.unpack().scalar_type();  // the op's gradients are fp32 for fp16/bf16
      if (need_x) out[0] = rx.to(dtype);
      if (need_t) out[1] = own_t ? rt.to(dtype) : rx.to(dtype).neg();
      return out;
    }
    if (need_x) out[0] = scaled(*ops, grad, gx, 1.0, "input");
    if (need_t) out[1] = own_t ? scaled(*ops, grad, gt, 1.0, "target") : scaled(*ops, grad, gx, -1.0, "target");
    return out;
  }
};

SavedVariable saved(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? SavedVariable(*t, /*is_output=*/false) : SavedVariable();
}

}  // namespace

at::Tensor recon_loss_autograd(const std::string& ns, const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                               const std::string& kind, const std::string& reduction, double delta) {
  const LossOps& ops = ops_for(ns);
  const bool grad_mode = at::GradMode::is_enabled();
  const bool need_x = grad_mode && input.requires_grad(), need_t = grad_mode && target.requires_grad();
  for (const auto* t : {&weight, &pos_weight})
    TORCH_CHECK(!(grad_mode && t->has_value() && (*t)->defined() && (*t)->requires_grad()),
                "aefast::recon_loss does not differentiate weight or pos_weight; aefast.functional routes such "
                "calls to the reference");
  refuse_forward_ad("the fused loss", {&input, &target});
  const bool own_t = owns_target_grad(kind);
  const bool recompute = reduction == "none" && !own_t;  // see the comment at the top
  const bool flag_x = !recompute && (need_x || (need_t && !own_t));
  const bool flag_t = !recompute && need_t && own_t;
  at::Tensor loss, gx, gt;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(loss, gx, gt) = ops.loss.call(input, target, weight, pos_weight, kind, reduction, delta, flag_x, flag_t);
  }
  if (!(need_x || need_t)) return loss;
  auto node = make_node<ReconLossBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input, target));
  node->ops = &ops;
  node->kind = kind;
  node->reduction = reduction;
  node->delta = delta;
  node->grad_input = SavedVariable(gx, /*is_output=*/false);
  node->grad_target = SavedVariable(gt, /*is_output=*/false);
  if (recompute) {
    node->input = SavedVariable(input, false);
    node->target = SavedVariable(target, false);
    node->weight = saved(weight);
    node->pos_weight = saved(pos_weight);
  }
  torch::autograd::set_history(loss, node);
  return loss;
}

void bind_recon_loss_autograd(pybind11::module_& m) {
  // The GIL is released while the kernel runs, as torch's own bindings do (other Python threads,
  // e.g. a DataLoader's, keep running); Triton twins are Python kernels and take it back themselves.
  m.def("recon_loss_autograd", &recon_loss_autograd, "the fused loss with its C++ backward node (eager path)",
        pybind11::call_guard<pybind11::gil_scoped_release>(), pybind11::arg("ns"), pybind11::arg("input"),
        pybind11::arg("target"), pybind11::arg("weight"), pybind11::arg("pos_weight"), pybind11::arg("kind"),
        pybind11::arg("reduction"), pybind11::arg("delta"));
}

}  // namespace aefast
