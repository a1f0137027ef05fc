#pragma once
// Host-side argument handling of the unpool_deconv ops, shared by the CPU and CUDA kernels
// (torch headers allowed here). The Python layer validates every argument first; these checks
// only guard direct torch.ops calls.
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

#include <optional>
#include <string>
#include <string_view>

#include "aefast/unpool_deconv.h"

namespace aefast {

inline DecoderAct parse_activation(const std::optional<c10::string_view>& name) {
  if (!name.has_value()) return DecoderAct::None;
  bool ok = false;
  const DecoderAct act = decoder_act_from_name(std::string_view(name->data(), name->size()), ok);
  TORCH_CHECK(ok, "aefast::unpool_conv_transpose2d: unknown activation '", std::string(name->data(), name->size()), "'");
  return act;
}

// The layout rule of every backend (aefast.reference.functional._memory_format, and the fake
// functions in aefast/ops/unpool_deconv.py): a 4-D tensor is channels_last when it is dense in
// that layout and not in the contiguous one (ambiguous shapes such as C = 1 count as
// contiguous). The output (and pre-activation) follow the input's layout, grad_input too.
inline bool decoder_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

inline DecoderGeometry decoder_geometry(const at::Tensor& input, const at::Tensor& indices, const at::Tensor& weight,
                                 c10::IntArrayRef pool, c10::IntArrayRef unpooled, c10::IntArrayRef stride,
                                 c10::IntArrayRef padding, c10::IntArrayRef output_padding) {
  TORCH_CHECK(input.dim() == 4 && weight.dim() == 4, "aefast::unpool_conv_transpose2d: input and weight must be 4-D");
  TORCH_CHECK(indices.sizes() == input.sizes(), "aefast::unpool_conv_transpose2d: indices must have the input's shape");
  TORCH_CHECK(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kByte,
              "aefast::unpool_conv_transpose2d: indices must be int64 (flat) or uint8 (window)");
  TORCH_CHECK(weight.size(0) == input.size(1), "aefast::unpool_conv_transpose2d: weight/input channel mismatch");
  TORCH_CHECK(pool.size() == 2 && unpooled.size() == 2 && stride.size() == 2 && padding.size() == 2 &&
                  output_padding.size() == 2,
              "aefast::unpool_conv_transpose2d: geometry arguments need two entries each");
  DecoderGeometry g;
  g.n = input.size(0);
  g.c_in = input.size(1);
  g.c_out = weight.size(1);
  g.pooled_h = input.size(2);
  g.pooled_w = input.size(3);
  g.pool_h = pool[0];
  g.pool_w = pool[1];
  g.unpooled_h = unpooled[0];
  g.unpooled_w = unpooled[1];
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.out_h = (g.unpooled_h - 1) * g.stride_h - 2 * g.pad_h + g.kernel_h + output_padding[0];
  g.out_w = (g.unpooled_w - 1) * g.stride_w - 2 * g.pad_w + g.kernel_w + output_padding[1];
  TORCH_CHECK(g.pool_h > 0 && g.pool_w > 0 && g.stride_h > 0 && g.stride_w > 0 && g.pad_h >= 0 && g.pad_w >= 0 &&
                  g.out_h > 0 && g.out_w > 0 && g.unpooled_h > 0 && g.unpooled_w > 0,
              "aefast::unpool_conv_transpose2d: invalid geometry");
  return g;
}

}  // namespace aefast
