// CPU kernels of the unpool_deconv family: the fused decoder block
//   out = act(conv_transpose2d(max_unpool2d(z, idx, pool), W, b, stride, padding, output_padding))
// and the drop-in max_unpool2d, forward and backward.
//
// Math (dilation 1, groups 1). Let pos(n, ci, ph, pw) = (h, w) be where pooled value
// z[n, ci, ph, pw] sits in the unpooled plane (the map u is z there and 0 elsewhere). Then
//   pre[n, co, oy, ox] = b[co] + sum_{ci, ph, pw, kh, kw : oy = h*sh - padh + kh, ox = w*sw - padw + kw}
//                                z[n, ci, ph, pw] * W[ci, co, kh, kw]
// 1/(pool_h*pool_w) of the MACs of the dense transposed conv over u, and u is never built.
// With gpre = grad_out * act'(.) the gradients are
//   grad_z[n, ci, ph, pw] = sum_{co, kh, kw} gpre[n, co, h*sh - padh + kh, w*sw - padw + kw] * W[ci, co, kh, kw]
//       (the dgrad conv evaluated only at the argmax position of each window),
//   grad_W[ci, co, kh, kw] = sum_{n, ph, pw} z[n, ci, ph, pw] * gpre[n, co, h*sh - padh + kh, w*sw - padw + kw]
//       (only the nonzero positions of u contribute),
//   grad_b[co] = sum_{n, oy, ox} gpre[n, co, oy, ox].
//
// This file checks the arguments and picks the kernels; they live in two families, with what
// they share (SIMD vectors, ISA clones, index decoding = validation, notation) in
// unpool_deconv_cpu.h:
//   * the per-entry kernels (unpool_deconv_entries_forward.cpp / _backward.cpp): one slab of taps per pooled entry,
//     summed per unpooled position; every shape the window vectors do not take;
//   * the window-vector kernels (unpool_deconv_window_vectors.cpp): lanes = pool windows, for
//     small slabs (C_out = 1 or 3) with windows of at most 4 elements (use_window_vectors);
//   * and, for the forward with few input channels, the vendor's transposed conv over a
//     scattered unpooled map (forward_vendor, decoder_forward_uses_vendor).
// The drop-in max_unpool2d (forward and backward) and first_bad_unpool_index are here too.
//
// Determinism: every output element is owned by one thread and accumulated in a fixed order
// (forward and grad_input per image; grad_weight per fixed chunk of images, entries in a fixed
// channel / window order, the chunk partials added in chunk order; grad_bias from per-image
// partial sums added in image order). No atomics in the sums; results do not depend on the
// number of threads (the chunks depend on N only).
#include "unpool_deconv_cpu.h"

namespace aefast {
namespace unpool_deconv_cpu {
namespace {

int64_t unpool_deconv_cpu_isa() { return static_cast<int64_t>(decoder_isa()); }

// Whether the window-vector kernels run (else band_sums / band_grads): small slabs and windows
// of at most 4 elements (the dense select costs `window` FMAs per entry and tap vector).
// AEFAST_DECODER_WINDOW_VECTORS=0 (read per call) turns them off, so that the per-entry band
// kernels they replaced run instead: for A/B timing (bench/bench_kernel_ledger.py) and tests.
bool use_window_vectors(const DecoderGeometry& g, at::ScalarType dtype) {
  if (const char* env = std::getenv("AEFAST_DECODER_WINDOW_VECTORS"); env != nullptr && *env != '\0') {
    const std::string_view v(env);
    TORCH_CHECK(v == "0" || v == "1", "AEFAST_DECODER_WINDOW_VECTORS must be 0 or 1, got '", v, "'");
    if (v == "0") return false;
  }
  const int64_t L = decoder_lanes(decoder_isa(), dtype);
  const int64_t kp = (g.kernel_h * g.kernel_w * g.c_out + L - 1) / L * L;
  return kp / L <= 4 && g.pool_h * g.pool_w <= 4;
}

// ---------------------------------------------------------------- few input channels: the vendor's conv
// With few input channels (SegNet's and the tutorial AEs' 8- and 16-channel decoders, channels_last)
// the sparse kernels (both families) have little to sum per position (~C_in/window entries of a K =
// KH*KW*C_out slab) and run at ~20 GFLOP/s, while oneDNN's channels-last transposed conv over the
// unpooled map, doing `window` times the MACs, runs at ~100. There the forward scatters the pooled
// values into a zeroed channels-last unpooled map (decoding, i.e. validating, every index on the
// way, as the sparse kernels do), runs the vendor's transposed conv and applies the activation in
// place; the backward keeps the sparse kernels. Measured (1 thread, CPU time, interleaved, loaded
// machine; forward vendor / sparse): N16 16->16 24->48 1.77 / 2.48 ms, 16->8 48->96 6.06 / 8.24,
// N128 8->8 14->28 2.60 / 4.48, 16->8 4.25 / 5.42, N32 32->16 32->64 11.0 / 15.8; but N256 64->32
// 14->28 64.7 / 30.4 (the W1 decoder), N16 16->5 48->96 5.49 / 3.00 (C_out < 8: the window-vector
// kernels) and N16 8->8 48->96 6.5 / 7.5 (even, fwd+bwd). The rule: channels_last, fp32 (the dtype
// measured), C_in <= 32, C_out >= 8, windows of <= 4 elements. AEFAST_DECODER_FORWARD=vendor|sparse
// (read per call) overrides it, for A/B timing (bench/bench_kernel_ledger.py) and tests.
constexpr int64_t kVendorForwardMaxCin = 32;
constexpr int64_t kVendorForwardMinCout = 8;

bool decoder_forward_uses_vendor(const DecoderGeometry& g, bool cl, at::ScalarType dtype) {
  if (const char* env = std::getenv("AEFAST_DECODER_FORWARD"); env != nullptr && *env != '\0') {
    const std::string v(env);
    TORCH_CHECK(v == "vendor" || v == "sparse", "AEFAST_DECODER_FORWARD must be 'vendor' or 'sparse', got '", v, "'");
    return v == "vendor";
  }
  return cl && dtype == at::kFloat && g.c_in <= kVendorForwardMaxCin && g.c_out >= kVendorForwardMinCout &&
         g.pool_h * g.pool_w <= 4;
}

// u[n, c, h, w] = z at the position each index names, 0 elsewhere (u zeroed by the caller, in z's
// layout). Returns the NCHW-linear position of the first invalid index, or INT64_MAX.
template <typename scalar_t, typename index_t>
int64_t scatter_unpooled(const at::Tensor& z, const at::Tensor& idx, const DecoderGeometry& g, at::Tensor& u) {
  const WindowTable wt(g);
  const int64_t C = g.c_in, HP = g.pooled_h, WP = g.pooled_w;
  // Element strides of z/idx and u (dense in one layout: NCHW or channels-last).
  const int64_t zs_c = z.stride(1), zs_h = z.stride(2), zs_w = z.stride(3), zs_n = z.stride(0);
  const int64_t us_c = u.stride(1), us_h = u.stride(2), us_w = u.stride(3), us_n = u.stride(0);
  const scalar_t* zp = z.const_data_ptr<scalar_t>();
  const index_t* ip = idx.const_data_ptr<index_t>();
  scalar_t* up = u.mutable_data_ptr<scalar_t>();
  std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
  at::parallel_for(0, g.n * HP, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, WP * C)), [&](int64_t r0, int64_t r1) {
    int64_t bad = std::numeric_limits<int64_t>::max();
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = r / HP, ph = r % HP;
      for (int64_t pw = 0; pw < WP; ++pw)
        for (int64_t c = 0; c < C; ++c) {
          const int64_t k = n * zs_n + c * zs_c + ph * zs_h + pw * zs_w;
          const int64_t o = decode_offset<index_t>(ip, k, ph * g.pool_h, pw * g.pool_w, g, wt);
          if (o < 0) {
            bad = std::min(bad, ((n * C + c) * HP + ph) * WP + pw);
            continue;
          }
          up[n * us_n + c * us_c + (ph * g.pool_h + wt.di[o]) * us_h + (pw * g.pool_w + wt.dj[o]) * us_w] = zp[k];
        }
    }
    if (bad != std::numeric_limits<int64_t>::max()) atomic_min(first_bad, bad);
  });
  return first_bad.load();
}

void forward_vendor(const at::Tensor& z, const at::Tensor& idx, const at::Tensor& weight,
                    const std::optional<at::Tensor>& bias, const DecoderGeometry& g, c10::IntArrayRef output_padding,
                    DecoderAct act, double slope, at::MemoryFormat fmt, at::Tensor& out, at::Tensor& pre) {
  at::Tensor u = at::empty({g.n, g.c_in, g.unpooled_h, g.unpooled_w}, z.options(), fmt).zero_();
  int64_t bad = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "unpool_conv_transpose2d_vendor", [&] {
    bad = idx.scalar_type() == at::kLong ? scatter_unpooled<scalar_t, int64_t>(z, idx, g, u)
                                         : scatter_unpooled<scalar_t, uint8_t>(z, idx, g, u);
  });
  check_no_bad_index(bad);
  at::Tensor y = at::convolution(u, weight, bias, {g.stride_h, g.stride_w}, {g.pad_h, g.pad_w}, {1, 1}, true,
                                 output_padding, 1);
  if (act_needs_preactivation(act)) pre = y.clone(fmt);
  switch (act) {
    case DecoderAct::None: break;
    case DecoderAct::Relu: y.relu_(); break;
    case DecoderAct::LeakyRelu: at::leaky_relu_(y, slope); break;
    case DecoderAct::Sigmoid: y.sigmoid_(); break;
    case DecoderAct::Tanh: y.tanh_(); break;
    case DecoderAct::Gelu: y = at::gelu(y); break;
    case DecoderAct::Silu: at::silu_(y); break;
  }
  out = y.contiguous(fmt);
}

std::tuple<at::Tensor, at::Tensor> unpool_conv_transpose2d_cpu(
    const at::Tensor& input, const at::Tensor& indices, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef output_padding, std::optional<c10::string_view> activation, double negative_slope) {
  check_same_device("unpool_conv_transpose2d", {&input, &indices, &weight}, bias);
  const DecoderGeometry g =
      decoder_geometry(input, indices, weight, pool_size, unpooled_size, stride, padding, output_padding);
  const DecoderAct act = parse_activation(activation);
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), "aefast::unpool_conv_transpose2d: dtype mismatch");
  TORCH_CHECK(g.c_in * g.pooled_h * g.pooled_w < std::numeric_limits<int32_t>::max() &&
                  g.unpooled_h * g.unpooled_w < std::numeric_limits<int32_t>::max(),
              "aefast::unpool_conv_transpose2d: one image is too large for the CPU kernel");
  // channels_last in, channels_last out (eager's rule; the fake function follows it).
  const bool cl = decoder_channels_last(input);
  const at::MemoryFormat fmt = cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor z = dense_in(input, fmt), idx = dense_in(indices, fmt);
  if (decoder_forward_uses_vendor(g, cl, input.scalar_type())) {
    RECORD_USER_SCOPE("aefast path: unpool_conv_transpose2d vendor conv");
    at::Tensor out, pre = at::empty({0}, input.options());
    // the weight as it is: oneDNN takes either layout (a channels_last model's needs no NCHW copy)
    forward_vendor(z, idx, weight, bias, g, output_padding, act, negative_slope, fmt, out, pre);
    return {out, pre};
  }
  const at::Tensor w = weight.contiguous();
  // Output-sized buffers through the buffer cache (aefast/cpu_buffer_cache.h).
  at::Tensor out = empty_cpu_cached({g.n, g.c_out, g.out_h, g.out_w}, input.options(), fmt);
  at::Tensor pre = act_needs_preactivation(act) ? empty_cpu_cached(out.sizes(), input.options(), fmt)
                                                : at::empty({0}, input.options());
  forward_sparse(ForwardCall{z, idx, w, bias, g, act, negative_slope, cl, out, pre});
  return {out, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> unpool_conv_transpose2d_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& act_input, const at::Tensor& input, const at::Tensor& indices,
    const at::Tensor& weight, c10::IntArrayRef pool_size, c10::IntArrayRef unpooled_size, c10::IntArrayRef stride,
    c10::IntArrayRef padding, c10::IntArrayRef output_padding, std::optional<c10::string_view> activation,
    double negative_slope, std::array<bool, 3> output_mask) {
  check_same_device("unpool_conv_transpose2d_backward", {&grad_out, &act_input, &input, &indices, &weight});
  const DecoderGeometry g =
      decoder_geometry(input, indices, weight, pool_size, unpooled_size, stride, padding, output_padding);
  const DecoderAct act = parse_activation(activation);
  TORCH_CHECK(grad_out.sizes() == at::IntArrayRef({g.n, g.c_out, g.out_h, g.out_w}) &&
                  act_input.sizes() == grad_out.sizes(),
              "aefast::unpool_conv_transpose2d_backward: grad_out / act_input have the wrong shape");
  TORCH_CHECK(g.c_in * g.pooled_h * g.pooled_w < std::numeric_limits<int32_t>::max() &&
                  g.unpooled_h * g.unpooled_w < std::numeric_limits<int32_t>::max(),
              "aefast::unpool_conv_transpose2d_backward: one image is too large for the CPU kernel");
  // channels_last input (z, idx; grad_z in its layout) and channels_last grad_out (act_input
  // then read in the same layout) are each served without a copy (decoder_channels_last).
  const bool cl_in = decoder_channels_last(input), cl_go = decoder_channels_last(grad_out);
  const at::MemoryFormat fmt_in = cl_in ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::MemoryFormat fmt_go = cl_go ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor go = dense_in(grad_out, fmt_go).to(input.scalar_type());
  const at::Tensor ai = dense_in(act_input, fmt_go);
  const at::Tensor z = dense_in(input, fmt_in), idx = dense_in(indices, fmt_in), w = weight.contiguous();
  at::Tensor grad_z = output_mask[0] ? empty_cpu_cached(z.sizes(), z.options(), fmt_in)
                                     : at::zeros(z.sizes(), z.options().memory_format(fmt_in));
  at::Tensor grad_w = output_mask[1] ? at::empty_like(w) : at::zeros_like(w);
  at::Tensor grad_b = at::zeros({g.c_out}, input.options());
  const BackwardCall call{go, ai, z, idx, w, g, act, negative_slope, output_mask, cl_in, cl_go, grad_z, grad_w, grad_b};
  if (use_window_vectors(g, input.scalar_type()))
    backward_window_vectors(call);
  else
    backward_per_entry(call);
  return {grad_z, grad_w, grad_b};
}

// ---------------------------------------------------------------- drop-in max_unpool2d
// out[plane, idx[plane, p]] = in[plane, p]; with duplicate indices the last p (row-major) wins,
// because each plane is written by one thread in increasing p. Backward: grad_in[p] =
// grad_out[idx[p]] for the winning p of each element and 0 for the positions it overwrote (they
// do not reach the output), found by a reverse scan that marks elements already claimed.
at::Tensor max_unpool2d_cpu(const at::Tensor& input, const at::Tensor& indices, c10::IntArrayRef output_size) {
  check_same_device("max_unpool2d", {&input, &indices});
  TORCH_CHECK(input.dim() >= 2 && indices.sizes() == input.sizes() && indices.scalar_type() == at::kLong &&
                  output_size.size() == 2,
              "aefast::max_unpool2d: indices must be int64 with the input's shape, output_size two ints");
  const at::Tensor x = contiguous_cpu_cached(input), idx = contiguous_cpu_cached(indices);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  shape.push_back(output_size[0]);
  shape.push_back(output_size[1]);
  at::Tensor out = zeros_cpu_cached(shape, x.options());
  const int64_t plane_in = x.size(-2) * x.size(-1), plane_out = output_size[0] * output_size[1];
  const int64_t planes = plane_in ? x.numel() / plane_in : 0;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "max_unpool2d_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t p = 0; p < plane_in; ++p) {
          const int64_t t = ip[b * plane_in + p];
          if (t < 0 || t >= plane_out) {
            bad = true;
            continue;
          }
          op[b * plane_out + t] = xp[b * plane_in + p];
        }
    });
  });
  TORCH_CHECK(!bad, "aefast::max_unpool2d: an index is outside the output plane");
  return out;
}

at::Tensor max_unpool2d_backward_cpu(const at::Tensor& grad_out, const at::Tensor& indices) {
  check_same_device("max_unpool2d_backward", {&grad_out, &indices});
  TORCH_CHECK(grad_out.dim() >= 2 && indices.dim() == grad_out.dim() && indices.scalar_type() == at::kLong,
              "aefast::max_unpool2d_backward: bad arguments");
  const at::Tensor g = contiguous_cpu_cached(grad_out), idx = contiguous_cpu_cached(indices);
  at::Tensor grad_in = empty_cpu_cached(idx.sizes(), g.options());
  const int64_t plane_in = idx.size(-2) * idx.size(-1), plane_out = g.size(-2) * g.size(-1);
  const int64_t planes = plane_in ? idx.numel() / plane_in : 0;
  std::atomic<bool> bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "max_unpool2d_backward_cpu", [&] {
    const scalar_t* gp = g.const_data_ptr<scalar_t>();
    const int64_t* ip = idx.const_data_ptr<int64_t>();
    scalar_t* out = grad_in.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, planes, 1, [&](int64_t b0, int64_t b1) {
      std::vector<uint8_t> claimed(static_cast<size_t>(plane_out), 0);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t* ib = ip + b * plane_in;
        for (int64_t p = plane_in - 1; p >= 0; --p) {
          const int64_t t = ib[p];
          if (t < 0 || t >= plane_out) {
            bad = true;
            out[b * plane_in + p] = scalar_t(0);
            continue;
          }
          out[b * plane_in + p] = claimed[t] ? scalar_t(0) : gp[b * plane_out + t];
          claimed[t] = 1;
        }
        for (int64_t p = 0; p < plane_in; ++p) {
          const int64_t t = ib[p];
          if (t >= 0 && t < plane_out) claimed[t] = 0;
        }
      }
    });
  });
  TORCH_CHECK(!bad, "aefast::max_unpool2d_backward: an index is outside the output plane");
  return grad_in;
}

at::Tensor first_bad_unpool_index_cpu(const at::Tensor& indices, c10::IntArrayRef unpooled_size,
                                      c10::IntArrayRef pool_size, bool in_window) {
  check_same_device("first_bad_unpool_index", {&indices});
  TORCH_CHECK(indices.dim() >= 2 && (indices.scalar_type() == at::kLong || indices.scalar_type() == at::kByte) &&
                  unpooled_size.size() == 2 && pool_size.size() == 2 && pool_size[0] > 0 && pool_size[1] > 0,
              "aefast::first_bad_unpool_index: bad arguments");
  const at::Tensor idx = indices.contiguous();
  const int64_t hp = idx.size(-2), wp = idx.size(-1), plane = hp * wp;
  const int64_t planes = plane ? idx.numel() / plane : 0;
  const int64_t uh = unpooled_size[0], uw = unpooled_size[1], kh = pool_size[0], kw = pool_size[1];
  const bool flat = idx.scalar_type() == at::kLong;
  const int64_t none = std::numeric_limits<int64_t>::max();
  // One first-bad slot per plane, combined in plane order: the answer is the minimum position.
  std::vector<int64_t> first(static_cast<size_t>(planes), none);
  const int64_t* flat_ptr = flat ? idx.const_data_ptr<int64_t>() : nullptr;
  const uint8_t* window_ptr = flat ? nullptr : idx.const_data_ptr<uint8_t>();
  at::parallel_for(0, planes, std::max<int64_t>(1, 65536 / std::max<int64_t>(plane, 1)), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      for (int64_t ph = 0; ph < hp; ++ph)
        for (int64_t pw = 0; pw < wp; ++pw) {
          const int64_t k = b * plane + ph * wp + pw;
          const bool ok = flat ? unpool_index_valid_flat(flat_ptr[k], ph, pw, uh, uw, kh, kw, in_window)
                               : unpool_index_valid_window(window_ptr[k], ph, pw, uh, uw, kh, kw);
          if (!ok) {
            first[b] = k;
            ph = hp;  // stop this plane
            break;
          }
        }
    }
  });
  int64_t result = -1;
  for (int64_t b = 0; b < planes; ++b)
    if (first[b] != none) {
      result = first[b];
      break;
    }
  return at::scalar_tensor(result, idx.options().dtype(at::kLong));
}


}  // namespace

void forward_sparse(const ForwardCall& call) {
  if (use_window_vectors(call.g, call.z.scalar_type()))
    forward_window_vectors(call);
  else
    forward_per_entry(call);
}

}  // namespace unpool_deconv_cpu

TORCH_LIBRARY_IMPL(aefast, CompositeExplicitAutograd, m) {
  m.impl("unpool_deconv_cpu_isa", &unpool_deconv_cpu::unpool_deconv_cpu_isa);
}

TORCH_LIBRARY_IMPL(aefast, CPU, m) {
  m.impl("first_bad_unpool_index", &unpool_deconv_cpu::first_bad_unpool_index_cpu);
  m.impl("unpool_conv_transpose2d", &unpool_deconv_cpu::unpool_conv_transpose2d_cpu);
  m.impl("unpool_conv_transpose2d_backward", &unpool_deconv_cpu::unpool_conv_transpose2d_backward_cpu);
  m.impl("max_unpool2d", &unpool_deconv_cpu::max_unpool2d_cpu);
  m.impl("max_unpool2d_backward", &unpool_deconv_cpu::max_unpool2d_backward_cpu);
}

}  // namespace aefast
