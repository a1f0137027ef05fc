#pragma once
// PyTorch pooling indices are int64 flat positions h*W + w inside one (N, C) plane of the
// unpadded input. aefast's compact form is the uint8 offset i*kernel_w + j of the element
// inside its own window (row i, column j of the window, in dilation steps). Because the
// window is known from the output position, the offset is enough to recover the flat index,
// and it takes one byte instead of eight.
#include "aefast/common.h"

namespace aefast {

// A window holds at most 255 elements so that 255 can mark "not inside this window".
constexpr uint8_t kInvalidWindowOffset = 255;
constexpr int64_t kMaxWindowElements = 255;
constexpr int64_t kInvalidFlatIndex = -1;

AEFAST_HD uint8_t window_offset_of_flat(int64_t flat, int64_t oh, int64_t ow, const PoolGeometry& g) {
  if (flat < 0 || flat >= g.in_h * g.in_w) return kInvalidWindowOffset;
  const int64_t h = flat / g.in_w;
  const int64_t w = flat - h * g.in_w;
  const int64_t rh = h - (oh * g.stride_h - g.pad_h);
  const int64_t rw = w - (ow * g.stride_w - g.pad_w);
  if (rh < 0 || rw < 0 || rh % g.dilation_h != 0 || rw % g.dilation_w != 0) return kInvalidWindowOffset;
  const int64_t i = rh / g.dilation_h;
  const int64_t j = rw / g.dilation_w;
  if (i >= g.kernel_h || j >= g.kernel_w) return kInvalidWindowOffset;
  return static_cast<uint8_t>(i * g.kernel_w + j);
}

AEFAST_HD int64_t flat_of_window_offset(int64_t offset, int64_t oh, int64_t ow, const PoolGeometry& g) {
  if (offset < 0 || offset >= g.kernel_h * g.kernel_w) return kInvalidFlatIndex;
  const int64_t i = offset / g.kernel_w;
  const int64_t j = offset - i * g.kernel_w;
  const int64_t h = oh * g.stride_h - g.pad_h + i * g.dilation_h;
  const int64_t w = ow * g.stride_w - g.pad_w + j * g.dilation_w;
  // A window offset that lands in the padding names no input element.
  if (h < 0 || h >= g.in_h || w < 0 || w >= g.in_w) return kInvalidFlatIndex;
  return h * g.in_w + w;
}

}  // namespace aefast
