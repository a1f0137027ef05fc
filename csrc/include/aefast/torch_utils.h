#pragma once
// Host-side helpers for the op implementations (torch headers allowed here).
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>
#include <initializer_list>
#include "aefast/common.h"

namespace aefast {

// The Python layer validates every argument before calling an op; these checks only
// guard the C++ entry points against direct torch.ops calls with malformed arguments.
inline PoolGeometry pool_geometry_from_args(c10::IntArrayRef input_size, c10::IntArrayRef kernel,
                                            c10::IntArrayRef stride, c10::IntArrayRef padding,
                                            c10::IntArrayRef dilation) {
  TORCH_CHECK(input_size.size() == 2 && kernel.size() == 2 && stride.size() == 2 &&
                  padding.size() == 2 && dilation.size() == 2,
              "aefast: pooling geometry arguments must have two entries each");
  TORCH_CHECK(kernel[0] > 0 && kernel[1] > 0 && stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 &&
                  dilation[1] > 0 && padding[0] >= 0 && padding[1] >= 0,
              "aefast: kernel, stride and dilation must be positive and padding non-negative");
  return PoolGeometry{input_size[0], input_size[1], kernel[0], kernel[1], stride[0],
                      stride[1],     padding[0],    padding[1], dilation[0], dilation[1]};
}

// Every defined tensor argument of an op must live on the device of the first one. The dispatcher
// picks the kernel from the highest-priority device among the arguments, so a direct torch.ops call
// mixing CPU and CUDA tensors would otherwise hand a host pointer to a GPU kernel (a sticky illegal
// address) or a device pointer to a CPU loop. Undefined tensors (absent optionals) are skipped.
inline void check_same_device(const char* op, std::initializer_list<const at::Tensor*> tensors) {
  const at::Tensor* first = nullptr;
  for (const at::Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) continue;
    if (first == nullptr) {
      first = t;
      continue;
    }
    TORCH_CHECK(t->device() == first->device(), "aefast::", op,
                ": all tensor arguments must be on one device; found ", first->device(), " and ",
                t->device());
  }
}

inline void check_same_device(const char* op, std::initializer_list<const at::Tensor*> tensors,
                              const c10::optional<at::Tensor>& optional) {
  check_same_device(op, tensors);
  if (optional.has_value() && optional->defined() && tensors.size() > 0)
    check_same_device(op, {*tensors.begin(), &*optional});
}

}  // namespace aefast
