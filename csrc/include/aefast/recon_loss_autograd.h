#pragma once
// The eager autograd entry of the fused loss (csrc/recon_loss_autograd.cpp), bound in csrc/ops.cpp
// as aefast._C.recon_loss_autograd.
#include <ATen/ATen.h>
#include <pybind11/pybind11.h>

#include <optional>
#include <string>

namespace aefast {

// The loss value of <ns>::recon_loss(input, target, weight, pos_weight, kind, reduction, delta)
// (ns: "aefast" or "aefast_triton"), with a backward node attached when input or target
// requires grad. The gradient flags of the op are derived here, not passed.
at::Tensor recon_loss_autograd(const std::string& ns, const at::Tensor& input, const at::Tensor& target,
                               const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& pos_weight,
                               const std::string& kind, const std::string& reduction, double delta);

// Adds recon_loss_autograd to the extension module (called from csrc/ops.cpp's PYBIND11_MODULE).
void bind_recon_loss_autograd(pybind11::module_& m);

}  // namespace aefast
