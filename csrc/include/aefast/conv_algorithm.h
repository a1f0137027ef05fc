#pragma once
// Which algorithm the encoder forward uses, shared by the CPU (csrc/cpu/conv_pool.cpp) and CUDA
// (csrc/include/aefast/gemm_gather_host.h) backends so that the rule exists once.
#include <cstdint>

namespace aefast {

// The vendor conv (oneDNN / cuDNN through at::convolution) plus aefast's fused epilogue pays off
// once the reduction K = Cin*KH*KW is long enough for the conv's FLOPs to outweigh the epilogue's
// extra pass over the full-resolution conv output. Measured on the CPU (2-core machines, same
// process, interleaved): 32->64 3x3 (K = 288) 2.3x faster than the direct path; 1->32 and 3->32
// 3x3 (K = 9, 27) 0.82x and 0.85x. Shorter reductions keep the direct kernel, whose conv tile never
// leaves registers/cache. The GPU uses the same threshold until a GPU measurement moves it.
// On the CPU, where this rule picks the vendor conv for a 3x3 stride-1 conv under a 2x2 pool,
// aefast's Winograd F(2x2, 3x3) runs instead (csrc/cpu/conv_pool.cpp, encoder_uses_winograd:
// measured 1.4-1.7x faster than oneDNN + epilogue on the W1/W2 layers).
constexpr int64_t kVendorConvMinReduction = 64;

inline bool encoder_uses_vendor_conv(int64_t reduction) { return reduction >= kVendorConvMinReduction; }

}  // namespace aefast
