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
  // Fused act(conv_transpose2d(max_unpool2d(input, indices, pool_size, unpooled_size), weight, bias,
  // stride, padding, output_padding)) without the unpooled map. indices are int64 flat positions in
  // the (unpooled_size) plane or uint8 offsets inside each pool window (stride = pool_size). Returns
  // (out, saved): saved is the pre-activation for leaky_relu/gelu/silu (their derivative needs it)
  // and an empty tensor otherwise (the backward then uses out).
  m.def("unpool_conv_transpose2d(Tensor input, Tensor indices, Tensor weight, Tensor? bias, int[2] pool_size, "
        "int[2] unpooled_size, int[2] stride, int[2] padding, int[2] output_padding, str? activation, "
        "float negative_slope) -> (Tensor, Tensor)");
  // grad_out and act_input (out or the pre-activation, as above) -> (grad_input, grad_weight, grad_bias).
  m.def("unpool_conv_transpose2d_backward(Tensor grad_out, Tensor act_input, Tensor input, Tensor indices, "
        "Tensor weight, int[2] pool_size, int[2] unpooled_size, int[2] stride, int[2] padding, "
        "int[2] output_padding, str? activation, float negative_slope, bool[3] output_mask) "
        "-> (Tensor, Tensor, Tensor)");
  // Drop-in max_unpool2d on (…, H, W) planes with int64 flat indices; duplicates: the last pooled
  // position in row-major order naming an element wins (forward value and backward gradient).
  m.def("max_unpool2d(Tensor input, Tensor indices, int[2] output_size) -> Tensor");
  m.def("max_unpool2d_backward(Tensor grad_out, Tensor indices) -> Tensor");
  // Validation helper (one pass, no intermediate tensors): the linear position of the first
  // invalid index as a 0-d int64 tensor, -1 if none. Flat (int64) indices must lie in
  // [0, H*W) of the unpooled plane and, with in_window, inside their own pool window
  // (stride = pool_size); window (uint8) offsets must be < pool_h*pool_w and land in the plane.
  m.def("first_bad_unpool_index(Tensor indices, int[2] unpooled_size, int[2] pool_size, bool in_window) -> Tensor");

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
