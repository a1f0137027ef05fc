#pragma once
// What the eager autograd entries (csrc/*_autograd.cpp) share: the per-namespace cache of typed
// operator handles, and the argument helpers. Each entry calls an op's forward below the Autograd
// key and attaches a C++ backward node, instead of the torch.library autograd wrapper's Python.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <array>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace aefast {

// The typed handle of <ns>::<name>. Looked up once per namespace by cached_ops: a schema lookup
// costs about as much as the call.
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const std::string& ns, const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow((ns + "::" + name).c_str(), "").typed<Sig>();
}

// The Ops struct of one namespace: aefast (C++ CPU / CUDA) or aefast_triton (the Triton twins,
// registered from Python), built once by make(ns) and kept for the process (leaked: used at exit).
template <typename Ops, typename Make>
const Ops& cached_ops(const std::string& ns, Make make) {
  static std::mutex mutex;
  static auto* cache = new std::map<std::string, std::unique_ptr<Ops>>();
  std::lock_guard<std::mutex> lock(mutex);
  auto& slot = (*cache)[ns];
  if (!slot) slot = std::make_unique<Ops>(make(ns));
  return *slot;
}

// A two-entry int list argument (stride, padding, ...) of op, as an array.
inline std::array<int64_t, 2> pair_of(const std::vector<int64_t>& v, const char* op, const char* what) {
  TORCH_CHECK(v.size() == 2, "aefast::", op, ": ", what, " needs two entries, got ", v.size());
  return {v[0], v[1]};
}

// The activations whose derivative needs the pre-activation (aefast/ops/unpool_deconv.py,
// NEEDS_PREACTIVATION): the decoder ops then return it as their second output.
inline bool needs_preactivation(const std::optional<std::string>& activation) {
  return activation.has_value() && (*activation == "leaky_relu" || *activation == "gelu" || *activation == "silu");
}

// An optional activation name as the ops' `str?` argument.
inline std::optional<c10::string_view> activation_arg(const std::optional<std::string>& activation) {
  return activation.has_value() ? std::optional<c10::string_view>(*activation) : std::nullopt;
}

}  // namespace aefast
