#pragma once
// The eager autograd entry of conv_bn_pool2d (csrc/conv_bn_pool_autograd.cpp), bound in
// csrc/ops.cpp as aefast._C.conv_bn_pool2d_autograd.
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace aefast {

// (pooled, window, conv_out, mean, var) of <ns>::conv_bn_pool2d_forward (ns: "aefast" or
// "aefast_triton"), with a C++ backward node attached to pooled when input, weight, bias, bn_weight
// or bn_bias requires grad.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv_bn_pool2d_autograd(
    const std::string& ns, const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& bn_weight, const std::optional<at::Tensor>& bn_bias,
    const std::vector<int64_t>& stride, const std::vector<int64_t>& padding, double eps, int64_t activation,
    double negative_slope, const std::vector<int64_t>& pool_size, const std::vector<int64_t>& pool_stride,
    bool ceil_mode);

// Adds conv_bn_pool2d_autograd to the extension module (called from csrc/ops.cpp's PYBIND11_MODULE).
void bind_conv_bn_pool_autograd(pybind11::module_& m);

}  // namespace aefast
