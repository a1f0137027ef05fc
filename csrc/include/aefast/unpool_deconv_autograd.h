#pragma once
// The eager autograd entry of unpool_conv_transpose2d (csrc/unpool_deconv_autograd.cpp), bound in
// csrc/ops.cpp as aefast._C.unpool_conv_transpose2d_autograd.
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <string>
#include <vector>

namespace aefast {

// The activated output of <ns>::unpool_conv_transpose2d (ns: "aefast" or "aefast_triton"), with a
// C++ backward node attached when input, weight or bias requires grad.
at::Tensor unpool_conv_transpose2d_autograd(const std::string& ns, const at::Tensor& input, const at::Tensor& indices,
                                            const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                                            const std::vector<int64_t>& pool_size,
                                            const std::vector<int64_t>& unpooled_size,
                                            const std::vector<int64_t>& stride, const std::vector<int64_t>& padding,
                                            const std::vector<int64_t>& output_padding,
                                            const std::optional<std::string>& activation, double negative_slope);

// Adds unpool_conv_transpose2d_autograd to the extension module (called from csrc/ops.cpp's PYBIND11_MODULE).
void bind_unpool_deconv_autograd(pybind11::module_& m);

}  // namespace aefast
