#pragma once
#include <optional>
// Host-side planning of the recon_loss family, shared by the CPU and CUDA entry points:
// argument parsing, the (rows x cols) view of the data, and the reduction's scales.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>

#include <string_view>

#include "aefast/cpu_buffer_cache.h"
#include "aefast/recon_loss.h"

namespace aefast {

enum LossReduction : int { kNone = 0, kMean = 1, kSum = 2, kPerSample = 3 };

inline int parse_loss_kind(std::string_view kind) {
  if (kind == "mse") return kMse;
  if (kind == "l1") return kL1;
  if (kind == "huber") return kHuber;
  if (kind == "bce") return kBce;
  if (kind == "bce_logits") return kBceLogits;
  TORCH_CHECK(false, "aefast::recon_loss: unknown kind '", std::string(kind), "'");
}

inline int parse_reduction(std::string_view reduction) {
  if (reduction == "none") return kNone;
  if (reduction == "mean") return kMean;
  if (reduction == "sum") return kSum;
  if (reduction == "per_sample") return kPerSample;
  TORCH_CHECK(false, "aefast: unknown reduction '", std::string(reduction), "'");
}

// The data is viewed as rows x cols (row-major, contiguous). per_sample reduces each row
// (rows = batch); mean/sum reduce one row of every element; none reduces nothing.
// out[r] = out_scale * sum_c l[r, c]; saved gradient = grad_scale * dl/dx.
struct LossPlan {
  int reduction;
  int64_t rows, cols;
  double out_scale, grad_scale;
};

inline LossPlan plan_loss(const at::Tensor& input, int reduction, bool kl) {
  LossPlan p{reduction, 1, input.numel(), 1.0, 1.0};
  const int64_t batch = input.dim() > 0 ? input.size(0) : 1;
  if (reduction == kPerSample) {
    TORCH_CHECK(input.dim() >= 1, "aefast: reduction per_sample needs a batch dim");
    p.rows = batch;
    p.cols = batch == 0 ? 0 : input.numel() / batch;
    // recon_loss: mean over each sample's elements; kl: sum over latent dims.
    p.out_scale = p.grad_scale = kl ? 1.0 : 1.0 / static_cast<double>(p.cols);
  } else if (reduction == kMean) {
    // recon_loss: mean of all elements; kl: per-sample sums averaged over the batch.
    // 1/0 = inf makes an empty mean NaN (0 * inf), as torch's mean of an empty tensor.
    const double count = kl ? static_cast<double>(batch) : static_cast<double>(input.numel());
    p.out_scale = p.grad_scale = 1.0 / count;
  }
  return p;
}

// Input-sized buffers: on the CPU through the buffer cache (a fresh multi-MB buffer would
// page-fault on every call, aefast/cpu_buffer_cache.h); on CUDA the caching allocator does that.
inline at::Tensor input_sized_buffer(const at::Tensor& input) {
  if (input.device().is_cpu()) return empty_cpu_cached(input.sizes(), input.options(), at::MemoryFormat::Contiguous);
  return at::empty(input.sizes(), input.options().memory_format(at::MemoryFormat::Contiguous));
}

inline at::Tensor reduced_output(const at::Tensor& input, const LossPlan& p) {
  if (p.reduction == kNone) return input_sized_buffer(input);
  if (p.reduction == kPerSample) return at::empty({p.rows}, input.options());
  return at::empty({}, input.options());
}

inline void check_same(const at::Tensor& a, const at::Tensor& b, const char* what) {
  TORCH_CHECK(a.sizes() == b.sizes(), "aefast: ", what, " must have the input's shape ", a.sizes(), ", got ",
              b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "aefast: ", what, " must have the input's dtype");
  TORCH_CHECK(a.device() == b.device(), "aefast: ", what, " must be on the input's device");
}

// The gradients a loss saves in its forward are kept in the accumulation type (fp32 for fp16 and
// bf16 inputs). The backward multiplies them by grad_output and rounds ONCE into the input's
// dtype, as torch's loss backward does. Saved already rounded to fp16, 2(x-t)/numel would
// underflow into fp16's subnormals (below 6e-5) for large tensors before a loss scale of, say,
// 2^16 could lift it back: the gradient would be flushed to zero or lose most of its bits.
inline at::ScalarType saved_grad_dtype(at::ScalarType input_dtype) { return at::toOpMathType(input_dtype); }

inline at::Tensor grad_buffer(const at::Tensor& input, bool wanted) {
  const at::TensorOptions opts = input.options().dtype(saved_grad_dtype(input.scalar_type()));
  if (!wanted) return at::empty({0}, opts);
  if (input.device().is_cpu()) return empty_cpu_cached(input.sizes(), opts, at::MemoryFormat::Contiguous);
  return at::empty(input.sizes(), opts.memory_format(at::MemoryFormat::Contiguous));
}

// loss_grad_scale's output is grad_output's dtype; the saved gradient is that dtype or its
// accumulation type (the forward's saved buffer).
inline void check_grad_scale_dtypes(const at::Tensor& grad_output, const at::Tensor& saved) {
  TORCH_CHECK(saved.scalar_type() == grad_output.scalar_type() ||
                  saved.scalar_type() == saved_grad_dtype(grad_output.scalar_type()),
              "aefast::loss_grad_scale: saved must have grad_output's dtype or its accumulation dtype, got ",
              saved.scalar_type(), " and ", grad_output.scalar_type());
}

// How grad_output broadcasts over saved in loss_grad_scale: 0 scalar, 1 per row, 2 elementwise.
inline int grad_scale_mode(const at::Tensor& grad_output, const at::Tensor& saved) {
  if (grad_output.sizes() == saved.sizes()) return 2;
  if (grad_output.dim() == 0) return 0;
  TORCH_CHECK(grad_output.dim() == 1 && saved.dim() >= 1 && grad_output.size(0) == saved.size(0),
              "aefast::loss_grad_scale: grad_output of shape ", grad_output.sizes(),
              " is neither a scalar, one value per row, nor the shape of ", saved.sizes());
  return 1;
}

inline int parse_corruption(std::string_view kind) {
  if (kind == "gaussian") return 0;
  if (kind == "masking") return 1;
  if (kind == "salt_pepper") return 2;
  TORCH_CHECK(false, "aefast::corrupt: unknown kind '", std::string(kind), "'");
}


// The tensors one recon_loss call works on: contiguous operands, the reduced output and the
// gradient buffers that were asked for. Both the CPU and the CUDA op start from this.
struct LossCall {
  at::Tensor input, target, weight, pos_weight;  // weight / pos_weight undefined when absent
  LossPlan plan;
  at::Tensor out, gx, gt;
  bool own_gt;  // the kind has its own target gradient and it was asked for
};

inline LossCall prepare_loss_call(const at::Tensor& input, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& pos_weight, int kind, int reduction,
                                  bool grad_input, bool grad_target) {
  check_same(input, target, "target");
  LossCall c;
  c.input = contiguous_cpu_cached(input);
  c.target = contiguous_cpu_cached(target);
  if (weight.has_value()) {
    check_same(input, *weight, "weight");
    c.weight = contiguous_cpu_cached(*weight);
  }
  if (pos_weight.has_value()) {
    TORCH_CHECK(kind == kBceLogits, "aefast: pos_weight is only for bce_logits");
    check_same(input, *pos_weight, "pos_weight");
    c.pos_weight = contiguous_cpu_cached(*pos_weight);
  }
  c.plan = plan_loss(c.input, reduction, kind == kKl);
  c.out = reduced_output(c.input, c.plan);
  c.gx = grad_buffer(c.input, grad_input);
  c.own_gt = loss_kind_has_own_target_grad(kind) && grad_target;
  c.gt = grad_buffer(c.input, c.own_gt);
  return c;
}

}  // namespace aefast
