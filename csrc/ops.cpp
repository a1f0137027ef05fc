// Every aefast operator schema, in one place. Kernels register per device in csrc/cpu and
// csrc/cuda; fake (meta) functions, autograd formulas and the Triton twins are registered in
// Python (aefast/ops/). Only this file may define a schema.
#include <torch/library.h>
#include <pybind11/pybind11.h>

#include <string>

#ifndef AEFAST_TORCH_VERSION
#define AEFAST_TORCH_VERSION "unknown"
#endif
#ifndef AEFAST_CXX_COMPILER
#define AEFAST_CXX_COMPILER "unknown"
#endif

TORCH_LIBRARY(aefast, m) {
  // ---- pool_index: PyTorch flat pooling indices <-> aefast compact window offsets ----
  // input_size is the (H, W) of the pooled plane; the rest is the pooling window geometry.
  m.def("flat_to_window(Tensor indices, int[2] input_size, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation) -> Tensor");
  m.def("window_to_flat(Tensor window, int[2] input_size, int[2] kernel_size, int[2] stride, "
        "int[2] padding, int[2] dilation) -> Tensor");

  // ---- conv_pool (encoder) ----
  // activation: 0 none, 1 relu, 2 leaky_relu, 3 sigmoid, 4 tanh, 5 gelu, 6 silu
  // (csrc/include/aefast/conv_pool.h). Pools are non-overlapping (stride = pool_size, no
  // padding, floor mode). The forward writes only pooled-size tensors: the pooled map, the
  // uint8 window offset of each maximum and the conv output (pre-activation) at that maximum,
  // which is all the backward needs.
  m.def("conv_pool2d_forward(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int activation, float negative_slope, int[2] pool_size) -> (Tensor pooled, Tensor window, Tensor preact)");
  // Sparse backward: the conv output's gradient is nonzero only at the argmax of each window.
  m.def("conv_pool2d_backward_input(Tensor grad_pooled, Tensor window, Tensor preact, Tensor weight, "
        "int[2] input_size, int[2] stride, int[2] padding, int activation, float negative_slope, "
        "int[2] pool_size) -> Tensor");
  m.def("conv_pool2d_backward_weight(Tensor grad_pooled, Tensor window, Tensor preact, Tensor input, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int activation, float negative_slope, "
        "int[2] pool_size) -> (Tensor grad_weight, Tensor grad_bias)");
  // The drop-in max_pool2d (4-D input, any memory format; flat int64 indices as torch's).
  m.def("max_pool2d_forward(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, bool ceil_mode) -> (Tensor output, Tensor indices)");
  m.def("max_pool2d_backward(Tensor grad_output, Tensor indices, Tensor input) -> Tensor");

  // ---- unpool_deconv (decoder) ----

  // ---- recon_loss (loss, corruption, VAE terms) ----
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "aefast compiled kernels; the operators live in torch.ops.aefast";
  m.def("build_info", []() {
    py::dict info;
    info["torch_version"] = std::string(AEFAST_TORCH_VERSION);
    info["compiler"] = std::string(AEFAST_CXX_COMPILER);
    info["cplusplus"] = static_cast<long>(__cplusplus);
#ifdef AEFAST_WITH_CUDA
    info["cuda"] = true;
    info["cuda_archs"] = std::string(AEFAST_CUDA_ARCHS);
    info["cuda_compiler_version"] = std::string(AEFAST_CUDA_VERSION);
#else
    info["cuda"] = false;
    info["cuda_archs"] = std::string();
    info["cuda_compiler_version"] = std::string();
#endif
    return info;
  });
}
