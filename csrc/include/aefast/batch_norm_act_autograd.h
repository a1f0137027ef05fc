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

// Adds batch_norm_act2d_autograd to the extension module (called from csrc/ops.cpp's PYBIND11_MODULE).
void bind_batch_norm_act_autograd(pybind11::module_& m);

}  // namespace aefast
