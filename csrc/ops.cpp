// Every aefast operator schema, in one place. Kernels register per device in csrc/cpu and
// csrc/cuda; fake (meta) functions, autograd formulas and the Triton twins are registered in
// Python (aefast/ops/). Only this file may define a schema.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "aefast/cpu_buffer_cache.h"
#include <pybind11/pybind11.h>

#include <set>
#include <string>

#include "aefast/batch_norm_act_autograd.h"
#include "aefast/conv_bn_pool_autograd.h"
#include "aefast/conv_transpose_act_autograd.h"
#include "aefast/unpool_deconv_autograd.h"
#include "aefast/conv_pool_autograd.h"
#include "aefast/recon_loss_autograd.h"

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
  // (csrc/include/aefast/conv_pool.h). Pools have no padding; pool_stride (0: = pool_size, the
  // non-overlapping pool) and ceil_mode follow torch's max_pool2d, output size rule included. The
  // forward writes only pooled-size tensors: the pooled map, the uint8 row-major offset of each
  // maximum inside its window (which starts at (i*pool_stride_h, j*pool_stride_w) of the conv
  // output) and the conv output (pre-activation) at that maximum, which is all the backward needs.
  // corruption != "none" (gaussian | masking | salt_pepper, as aefast::corrupt with the same seed,
  // level, low and high) corrupts each input element as it is loaded: the conv sees
  // corrupt(input), and no corrupted copy of the input is stored (aefast/corruption.h).
  m.def("conv_pool2d_forward(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int activation, float negative_slope, int[2] pool_size, str corruption=\"none\", float corruption_level=0., "
        "int seed=0, float low=0., float high=1., int[2] pool_stride=0, bool ceil_mode=False) "
        "-> (Tensor pooled, Tensor window, Tensor preact)");
  // Sparse backward: the conv output's gradient is nonzero only at the argmax of each window.
  m.def("conv_pool2d_backward_input(Tensor grad_pooled, Tensor window, Tensor preact, Tensor weight, "
        "int[2] input_size, int[2] stride, int[2] padding, int activation, float negative_slope, "
        "int[2] pool_size, int[2] pool_stride=0, bool ceil_mode=False) -> Tensor");
  // The corruption arguments of the forward: the input's noise is regenerated in the load.
  m.def("conv_pool2d_backward_weight(Tensor grad_pooled, Tensor window, Tensor preact, Tensor input, "
        "int[2] kernel_size, int[2] stride, int[2] padding, int activation, float negative_slope, "
        "int[2] pool_size, str corruption=\"none\", float corruption_level=0., int seed=0, float low=0., "
        "float high=1., int[2] pool_stride=0, bool ceil_mode=False) -> (Tensor grad_weight, Tensor grad_bias)");
  // Both: backward_input and backward_weight in one call, which computes the conv output's
  // gradient at the argmax once for the two (autograd uses it when both are needed). grad_input
  // is the gradient w.r.t. the (corrupted) conv operand; the weight gradient reads that operand.
  m.def("conv_pool2d_backward(Tensor grad_pooled, Tensor window, Tensor preact, Tensor input, Tensor weight, "
        "int[2] stride, int[2] padding, int activation, float negative_slope, int[2] pool_size, "
        "str corruption=\"none\", float corruption_level=0., int seed=0, float low=0., float high=1., "
        "int[2] pool_stride=0, bool ceil_mode=False) -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
  // The drop-in max_pool2d (4-D input, any memory format; flat int64 indices as torch's).
  m.def("max_pool2d_forward(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, bool ceil_mode) -> (Tensor output, Tensor indices)");
  m.def("max_pool2d_backward(Tensor grad_output, Tensor indices, Tensor input) -> Tensor");

  // ---- conv_bn_pool (encoder with BatchNorm in training mode; aefast/ops/conv_bn_pool.py) ----
  // pooled = maxpool(act(BN(conv2d(input, weight, bias, stride, padding)))) with BN normalising by
  // the batch statistics of the conv output (biased variance, eps) and the affine bn_weight /
  // bn_bias (absent: 1 / 0). Pools as conv_pool2d_forward's (pool_stride 0: = pool_size; ceil_mode). Returns
  // the pooled map, the uint8 window offset of each maximum, the conv output (what BatchNorm's
  // dense gradient needs) and the per-channel batch mean and biased variance (op-math dtype:
  // float for half/bf16/float, double for double), from which the caller updates running stats.
  m.def("conv_bn_pool2d_forward(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
        "int[2] stride, int[2] padding, float eps, int activation, float negative_slope, int[2] pool_size, "
        "int[2] pool_stride=0, bool ceil_mode=False) -> (Tensor pooled, Tensor window, Tensor conv_out, Tensor mean, Tensor var)");
  // The gradients of (input, weight, bias, bn_weight, bn_bias); one left out by output_mask (or a
  // bn parameter that is absent) is an empty tensor.
  m.def("conv_bn_pool2d_backward(Tensor grad_pooled, Tensor window, Tensor conv_out, Tensor mean, Tensor var, "
        "Tensor input, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, int[2] stride, int[2] padding, float eps, "
        "int activation, float negative_slope, int[2] pool_size, bool[5] output_mask, int[2] pool_stride=0, "
        "bool ceil_mode=False) "
        "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_bn_weight, Tensor grad_bn_bias)");

  // ---- batch_norm_act (BatchNorm with batch statistics -> activation; aefast/ops/batch_norm_act.py) ----
  // out = act(BN(input)) with BN normalising by the batch statistics of input (biased variance, eps)
  // and the affine weight / bias (absent: 1 / 0); out keeps input's memory format (channels-last in,
  // channels-last out). Returns out and the per-channel batch mean and biased variance (op-math
  // dtype), from which the caller updates running statistics; the backward needs only input and these.
  m.def("batch_norm_act2d_forward(Tensor input, Tensor? weight, Tensor? bias, float eps, int activation, "
        "float negative_slope) -> (Tensor out, Tensor mean, Tensor var)");
  // The gradients of (input, weight, bias); one left out by output_mask (or an absent parameter) is
  // an empty tensor.
  m.def("batch_norm_act2d_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor var, Tensor? weight, "
        "Tensor? bias, float eps, int activation, float negative_slope, bool[3] output_mask) "
        "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");

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
  // The decoder's upsampler without unpool (aefast/conv_transpose_act_host.h): act(conv_transpose2d(input,
  // weight, bias, stride, padding, output_padding)), groups 1, dilation 1, the multiply-adds on the
  // vendor's transposed conv and bias -> activation fused into one pass over its output. Returns
  // (out, saved) as unpool_conv_transpose2d does: saved is the pre-activation for leaky_relu/gelu/silu,
  // else empty. Outputs are NCHW-contiguous.
  m.def("conv_transpose_act2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] output_padding, str? activation, float negative_slope) -> (Tensor, Tensor)");
  // grad_out and act_input (out or the pre-activation) -> (grad_input, grad_weight, grad_bias); an
  // output left out by output_mask is zeros.
  m.def("conv_transpose_act2d_backward(Tensor grad_out, Tensor act_input, Tensor input, Tensor weight, "
        "int[2] stride, int[2] padding, int[2] output_padding, str? activation, float negative_slope, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // Drop-in max_unpool2d on (…, H, W) planes with int64 flat indices; duplicates: the last pooled
  // position in row-major order naming an element wins (forward value and backward gradient).
  m.def("max_unpool2d(Tensor input, Tensor indices, int[2] output_size) -> Tensor");
  m.def("max_unpool2d_backward(Tensor grad_out, Tensor indices) -> Tensor");
  // Validation helper (one pass, no intermediate tensors): the linear position of the first
  // invalid index as a 0-d int64 tensor, -1 if none. Flat (int64) indices must lie in
  // [0, H*W) of the unpooled plane and, with in_window, inside their own pool window
  // (stride = pool_size); window (uint8) offsets must be < pool_h*pool_w and land in the plane.
  m.def("first_bad_unpool_index(Tensor indices, int[2] unpooled_size, int[2] pool_size, bool in_window) -> Tensor");
  // Which SIMD variant the CPU decoder kernels run now: 0 baseline, 1 AVX2+FMA, 2 AVX-512 (the
  // CPU's best, capped by AEFAST_CPU_ISA=baseline|avx2|avx512, read per call).
  m.def("unpool_deconv_cpu_isa() -> int");

  // ---- recon_loss (loss, corruption, VAE terms) ----
  // One pass computes the loss (reduced as asked) AND, when grad_input / grad_target is set,
  // the gradient of the REDUCED loss w.r.t. input / target (the reduction's 1/numel or 1/M
  // already applied), so the backward is only loss_grad_scale. kind: mse | l1 | huber | bce |
  // bce_logits; reduction: none | mean | sum | per_sample (mean over all dims but the first).
  // weight and pos_weight, when given, have the input's shape. Returns (loss, grad_input,
  // grad_target); an unrequested gradient is an empty tensor. grad_target is only produced
  // for bce and bce_logits (for the others it is -grad_input, applied by the backward).
  m.def("recon_loss(Tensor input, Tensor target, Tensor? weight, Tensor? pos_weight, str kind, str reduction, "
        "float delta, bool grad_input, bool grad_target) -> (Tensor, Tensor, Tensor)");
  // alpha * saved * grad_output, with grad_output a scalar (mean/sum), one value per row of
  // saved (per_sample) or saved's shape (none). The backward of recon_loss and kl_divergence.
  m.def("loss_grad_scale(Tensor grad_output, Tensor saved, float alpha) -> Tensor");
  // KL(N(mu, exp(logvar)) || N(0, 1)); reduction none | per_sample (sum over all dims but the
  // first) | mean (per-sample sums averaged over the batch) | sum. Returns (kl, grad_mu,
  // grad_logvar), the gradients empty unless grad is set.
  m.def("kl_divergence(Tensor mu, Tensor logvar, str reduction, bool grad) -> (Tensor, Tensor, Tensor)");
  // Denoising corruption from a counter-based Philox stream keyed by seed (aefast/philox.h):
  // gaussian (x + level * n), masking (x -> 0 where u < level), salt_pepper (x -> low if
  // u < level/2, high if level/2 <= u < level). Element i always uses counter i.
  m.def("corrupt(Tensor input, int seed, str kind, float level, float low, float high) -> Tensor");
  // z = mu + exp(logvar/2) * eps(seed); the backward regenerates eps from the seed.
  m.def("reparameterize(Tensor mu, Tensor logvar, int seed) -> Tensor");
  // grad_logvar = grad * exp(logvar/2) * eps(seed) / 2 (grad_mu is grad itself).
  m.def("reparameterize_backward(Tensor grad, Tensor logvar, int seed) -> Tensor");

  // ---- test-only: the CUDA backend's algorithms (aefast/gemm_gather_host.h) run on the CPU ----
  // Same schemas as the ops above plus chunk_bytes (the batch-chunk budget, the GPU's is L2-sized);
  // the per-element bodies the CUDA kernels call run here in CPU loops over the same index spaces
  // (csrc/cpu/emulate_cuda_bodies.cpp), so tests/test_cuda_bodies.py checks the GPU's index math.
  m.def("emulate_cuda_unpool_conv_transpose2d(Tensor input, Tensor indices, Tensor weight, Tensor? bias, "
        "int[2] pool_size, int[2] unpooled_size, int[2] stride, int[2] padding, int[2] output_padding, "
        "str? activation, float negative_slope, int chunk_bytes) -> (Tensor, Tensor)");
  m.def("emulate_cuda_unpool_conv_transpose2d_backward(Tensor grad_out, Tensor act_input, Tensor input, "
        "Tensor indices, Tensor weight, int[2] pool_size, int[2] unpooled_size, int[2] stride, int[2] padding, "
        "int[2] output_padding, str? activation, float negative_slope, bool[3] output_mask, int chunk_bytes) "
        "-> (Tensor, Tensor, Tensor)");
  // conv_transpose_act2d's CUDA host code (aefast/conv_transpose_act_host.h) with the CPU executor.
  m.def("emulate_cuda_conv_transpose_act2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] output_padding, str? activation, float negative_slope) -> (Tensor, Tensor)");
  m.def("emulate_cuda_conv_transpose_act2d_backward(Tensor grad_out, Tensor act_input, Tensor input, Tensor weight, "
        "int[2] stride, int[2] padding, int[2] output_padding, str? activation, float negative_slope, "
        "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  m.def("emulate_cuda_conv_pool2d_forward(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int activation, float negative_slope, int[2] pool_size, str corruption, float corruption_level, "
        "int seed, float low, float high, int chunk_bytes, bool ceil_mode=False) -> (Tensor, Tensor, Tensor)");
  m.def("emulate_cuda_conv_pool2d_backward(Tensor grad_pooled, Tensor window, Tensor preact, Tensor input, "
        "Tensor weight, int[2] stride, int[2] padding, int activation, float negative_slope, int[2] pool_size, "
        "str corruption, float corruption_level, int seed, float low, float high, int chunk_bytes, "
        "bool ceil_mode=False) -> (Tensor, Tensor, Tensor)");
  // conv_bn_pool2d's CUDA host code (aefast/conv_bn_pool_host.h) with the CPU executor; reduction_threads
  // replaces the GPU's target thread count of the chunked reductions (small: many rows per chunk).
  m.def("emulate_cuda_conv_bn_pool2d_forward(Tensor input, Tensor weight, Tensor? bias, Tensor? bn_weight, "
        "Tensor? bn_bias, int[2] stride, int[2] padding, float eps, int activation, float negative_slope, "
        "int[2] pool_size, int[2] pool_stride, bool ceil_mode, int reduction_threads) "
        "-> (Tensor pooled, Tensor window, Tensor conv_out, Tensor mean, Tensor var)");
  m.def("emulate_cuda_conv_bn_pool2d_backward(Tensor grad_pooled, Tensor window, Tensor conv_out, Tensor mean, "
        "Tensor var, Tensor input, Tensor weight, Tensor? bn_weight, Tensor? bn_bias, int[2] stride, int[2] padding, "
        "float eps, int activation, float negative_slope, int[2] pool_size, bool[5] output_mask, int[2] pool_stride, "
        "bool ceil_mode, int reduction_threads) "
        "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor grad_bn_weight, Tensor grad_bn_bias)");
  m.def("emulate_cuda_max_pool2d_backward(Tensor grad_output, Tensor indices, Tensor input) -> Tensor");
  m.def("emulate_cuda_max_pool2d_forward(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, "
        "int[2] dilation, bool ceil_mode) -> (Tensor output, Tensor indices)");
  // batch_norm_act2d's CUDA host code (aefast/batch_norm_act_host.h) with the CPU executor.
  m.def("emulate_cuda_batch_norm_act2d_forward(Tensor input, Tensor? weight, Tensor? bias, float eps, int activation, "
        "float negative_slope) -> (Tensor out, Tensor mean, Tensor var)");
  m.def("emulate_cuda_batch_norm_act2d_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor var, "
        "Tensor? weight, Tensor? bias, float eps, int activation, float negative_slope, bool[3] output_mask) "
        "-> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias)");
}

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  aefast::bind_recon_loss_autograd(m);
  aefast::bind_batch_norm_act_autograd(m);
  aefast::bind_conv_transpose_act_autograd(m);
  aefast::bind_unpool_deconv_autograd(m);
  aefast::bind_conv_pool_autograd(m);
  aefast::bind_conv_bn_pool_autograd(m);
  m.doc() = "aefast compiled kernels; the operators live in torch.ops.aefast";
  m.def("build_info", []() {
    py::dict info;
    info["torch_version"] = std::string(AEFAST_TORCH_VERSION);
    info["compiler"] = std::string(AEFAST_CXX_COMPILER);
    info["cplusplus"] = static_cast<long>(__cplusplus);
    // Whether at::parallel_for runs on several threads in this build (see CMakeLists.txt: without
    // -fopenmp against an OpenMP torch it is a serial loop).
#ifdef INTRA_OP_PARALLEL
    info["intra_op_parallel"] = true;
#else
    info["intra_op_parallel"] = false;
#endif
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
  // How many distinct threads at::parallel_for, compiled here, runs a range of n items on (grain
  // 1): the test that our kernels' parallel loops are parallel at all.
  m.def("parallel_for_threads", [](int64_t n) {
    std::vector<int> tid(static_cast<size_t>(n), -1);
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) tid[static_cast<size_t>(i)] = at::get_thread_num();
    });
    return static_cast<int64_t>(std::set<int>(tid.begin(), tid.end()).size());
  });
  // The CPU buffer cache (aefast/cpu_buffer_cache.h): its counters, and freeing what it holds.
  m.def("cpu_buffer_cache_info", []() {
    const aefast::CpuBufferCacheStats s = aefast::cpu_buffer_cache_stats();
    py::dict info;
    info["cached_bytes"] = s.cached_bytes;
    info["cached_blocks"] = s.cached_blocks;
    info["hits"] = s.hits;
    info["misses"] = s.misses;
    info["limit_bytes"] = s.limit_bytes;
    return info;
  });
  m.def("cpu_buffer_cache_clear", []() { aefast::cpu_buffer_cache_clear(); });
}
