#pragma once
// The eager autograd entry of conv_pool2d (csrc/conv_pool_autograd.cpp), bound in csrc/ops.cpp as
// aefast._C.conv_pool2d_autograd.
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace aefast {

// (pooled, window) of <ns>::conv_pool2d_forward (ns: "aefast" or "aefast_triton") on the clean input
// (no corruption), with a C++ backward node attached to pooled when input, weight or bias requires
// grad. window (uint8 offsets) is not differentiable.
std::tuple<at::Tensor, at::Tensor> conv_pool2d_autograd(const std::string& ns, const at::Tensor& input,
                                                        const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias,
                                                        const std::vector<int64_t>& stride,
                                                        const std::vector<int64_t>& padding, int64_t activation,
                                                        double negative_slope, const std::vector<int64_t>& pool_size,
                                                        const std::vector<int64_t>& pool_stride, bool ceil_mode);

// Adds conv_pool2d_autograd to the extension module (called from csrc/ops.cpp's PYBIND11_MODULE).
void bind_conv_pool_autograd(pybind11::module_& m);

}  // namespace aefast
