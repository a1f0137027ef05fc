#pragma once
// The eager autograd entry of batch_norm_act2d (csrc/batch_norm_act_autograd.cpp), bound in
// csrc/ops.cpp as aefast._C.batch_norm_act2d_autograd.
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <tuple>

namespace aefast {

// (out, mean, var) of <ns>::batch_norm_act2d_forward (ns: "aefast" or "aefast_triton"), with a C++
// backward node attached to out when input, weight or bias requires grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_act2d_autograd(
    const std::string& ns, const at::Tensor& input, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, double eps, int64_t activation, double negative_slope);

// nn.BatchNorm2d's training-mode update, in place, as aefast.reference.functional.update_running_stats
// (its specification): num_batches_tracked += 1 (when given); with f = momentum, or 1/num_batches_tracked
// when momentum is None (no update without a counter), running = (1 - f)*running + f*stat, the
// variance unbiased (var * count/(count - 1)). One implementation for every fused BatchNorm op.
void update_running_stats(const std::optional<at::Tensor>& running_mean, const std::optional<at::Tensor>& running_var,
                          const std::optional<at::Tensor>& num_batches_tracked, std::optional<double> momentum,
                          const at::Tensor& mean, const at::Tensor& var, int64_t count);

// Adds batch_norm_act2d_autograd and update_running_stats to the extension module (called from csrc/ops.cpp's PYBIND11_MODULE).
void bind_batch_norm_act_autograd(pybind11::module_& m);

}  // namespace aefast
