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
