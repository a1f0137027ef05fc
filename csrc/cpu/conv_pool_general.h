#pragma once
// What the encoder blocks' vendor-conv paths share on CPU:
// - EncoderPool, the pool over a channels-last conv output that the vectorised epilogue and
//   backward kernels of conv_bn_pool_kernels.inc take (any pool stride, ceil_mode clipping);
// - the layout helpers (tiled transposes; defined in conv_bn_pool.cpp);
// - the conv_pool2d entry points for the pools conv_pool.cpp's tiling kernels do not cover: pool
//   stride != kernel (overlapping or gapped windows) and ceil_mode windows clipped at the conv
//   output's edge (aefast::pool_is_tiling is false). Their outputs (pooled, uint8 window offsets,
//   z at the argmax) are those of conv_pool.cpp; derivation in conv_pool_general.cpp.
#include <ATen/ATen.h>

#include <algorithm>
#include <optional>
#include <tuple>

namespace aefast {

struct PoolWindows {
  int64_t kh, kw;  // window
  int64_t sh, sw;  // stride between windows
  bool ceil_mode;
};

// A pool over the conv output y (N, C, HC, WC), stored channels-last: windows of (PKH, PKW)
// starting at (i*SPH, j*SPW), clipped to the conv output (a ceil_mode window may hang over the
// edge; torch's size rule makes it start inside). A window offset k = ki*PKW + kj names a
// position inside the FULL window, also for a clipped one.
struct EncoderPool {
  int64_t N, C, HC, WC, PKH, PKW, SPH, SPW, HO, WO;
  int64_t plane() const { return HC * WC; }
  int64_t count() const { return N * HC * WC; }
  // The backward's work units are bands of conv rows, one per pooled row i: [band_begin(i),
  // band_begin(i + 1)), the last band running to HC, so that the bands partition the rows (rows
  // in a gap between windows, and the rows below the last window, belong to one too).
  int64_t band_begin(int64_t i) const { return i * SPH; }
  int64_t band_end(int64_t i) const { return i + 1 == HO ? HC : (i + 1) * SPH; }
  // The pooled rows whose windows reach into conv rows [h0, h1).
  int64_t first_window_row(int64_t h0) const { return h0 < PKH ? 0 : (h0 - PKH + SPH) / SPH; }
  int64_t last_window_row(int64_t h1) const { return std::min(HO - 1, (h1 - 1) / SPH); }
};

// t (N, C, H, W) with channels-last strides: itself when it has them, the same memory with the
// strides restated when the layouts coincide, else a tiled-transposed copy.
at::Tensor as_channels_last(const at::Tensor& t);
// t in `format` (NCHW or channels-last), by the tiled transpose for channels-last -> NCHW.
at::Tensor in_memory_format(const at::Tensor& t, at::MemoryFormat format);
// The layout the encoder blocks give the vendor conv its input in: channels-last, except for a
// 1-channel input under a 1-wide conv output, where oneDNN's channels-last conv (torch 2.13)
// returns wrong values (tests/test_pool_geometry.py holds it), and NCHW is the same memory anyway.
inline bool conv_runs_channels_last(int64_t in_channels, int64_t conv_w) { return in_channels > 1 || conv_w > 1; }
// The conv operand x in that layout (as_channels_last, or x itself).
inline at::Tensor conv_operand(const at::Tensor& x, int64_t conv_w) {
  return conv_runs_channels_last(x.size(1), conv_w) ? as_channels_last(x) : x;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_forward_general(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias, c10::IntArrayRef stride,
    c10::IntArrayRef padding, int64_t activation, double negative_slope, const PoolWindows& pool);

// (grad_input, grad_weight, grad_bias); input (for the weight gradient) or weight (for the input
// gradient) may be undefined, and the matching gradients are then undefined too. input_size and
// kernel_size give the geometry either way.
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv_pool2d_backward_general(
    const at::Tensor& grad_pooled, const at::Tensor& window, const at::Tensor& preact, const at::Tensor& input,
    const at::Tensor& weight, int64_t n, int64_t c_in, c10::IntArrayRef input_size, c10::IntArrayRef kernel_size,
    c10::IntArrayRef stride, c10::IntArrayRef padding, int64_t activation, double negative_slope,
    const PoolWindows& pool);

}  // namespace aefast
