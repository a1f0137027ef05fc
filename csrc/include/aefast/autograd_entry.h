#pragma once
// What the eager autograd entries (csrc/*_autograd.cpp) share: the per-namespace cache of typed
// operator handles, and the argument helpers. Each entry calls an op's forward below the Autograd
// key and attaches a C++ backward node, instead of the torch.library autograd wrapper's Python.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <array>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

namespace aefast {

// A new autograd node, held as torch's set_history wants it: torch 2.13 keeps nodes in
// c10::intrusive_ptr (Node is an intrusive_ptr_target), torch 2.11 (the GPU image's) in
// std::shared_ptr. Chosen from Node's own type, so no version number has to be right.
template <typename NodeT>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, torch::autograd::Node>) {
    return c10::make_intrusive<NodeT>();
  } else {
    return std::make_shared<NodeT>();
  }
}

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

// Forward-mode AD would need a jvp formula; the entries have none, and silently dropping a
// tangent would be wrong. (The Python callers route functorch transforms elsewhere.) nullptr or
// undefined tensors (an absent bias) are skipped.
inline void refuse_forward_ad(const char* what, std::initializer_list<const at::Tensor*> tensors) {
  for (const at::Tensor* t : tensors)
    TORCH_CHECK(t == nullptr || !t->defined() || !t->_fw_grad(/*level=*/0).defined(),
                "aefast: forward-mode AD (jvp, dual tensors) through ", what,
                "'s eager path is not supported; use aefast.set_backend('reference') for it");
}

// The backward of the decoder entries (conv_transpose_act2d, unpool_conv_transpose2d), whose
// backward ops return (grad_input, grad_weight, grad_bias) for an output_mask: the mask from what
// autograd needs (no bias, no grad_bias), run(mask) called below the Autograd key, the unneeded
// gradients left undefined. The backward ops have no autograd formula of their own: a graph
// through them would have no second derivative, so create_graph=True is refused rather than
// given a silently wrong Hessian.
template <typename Run>
torch::autograd::variable_list input_weight_bias_grads(const torch::autograd::Node& node, const at::Tensor& grad,
                                                       bool has_bias, const char* what, const Run& run) {
  torch::autograd::variable_list out(3);
  if (!grad.defined()) return out;  // the output was not used (grads are not zero-filled)
  TORCH_CHECK(!at::GradMode::is_enabled(), "aefast: double backward (create_graph=True) through ", what,
              " is not supported; use aefast.set_backend('reference') for higher-order gradients");
  const std::array<bool, 3> need{node.task_should_compute_output(0), node.task_should_compute_output(1),
                                 has_bias && node.task_should_compute_output(2)};
  if (!(need[0] || need[1] || need[2])) return out;
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  auto [gi, gw, gb] = run(need);
  if (need[0]) out[0] = std::move(gi);
  if (need[1]) out[1] = std::move(gw);
  if (need[2]) out[2] = std::move(gb);
  return out;
}

// What a decoder node keeps for act': the pre-activation for leaky_relu / gelu / silu (the op's
// second output), else the activated output out, the node's own output: saved as one (no
// reference cycle), so that an in-place change of it after the forward makes the backward raise
// instead of reading modified values.
inline torch::autograd::SavedVariable saved_act_input(const std::optional<std::string>& activation,
                                                      const at::Tensor& pre, const at::Tensor& out) {
  return needs_preactivation(activation) ? torch::autograd::SavedVariable(pre, /*is_output=*/false)
                                         : torch::autograd::SavedVariable(out, /*is_output=*/true);
}

// What the two decoder nodes (conv_transpose_act2d, unpool_conv_transpose2d) share: the conv
// geometry and activation of the call, and the saved input, weight and act_input
// (saved_act_input). attach() wires the node to the forward's output; the derived node adds what
// its own op needs (the indices and pool geometry of the unpooling one) and its apply().
struct DecoderActNode : torch::autograd::Node {
  std::array<int64_t, 2> stride{}, padding{}, output_padding{};
  std::optional<std::string> activation;
  double negative_slope = 0.01;
  bool has_bias = false;
  torch::autograd::SavedVariable input, weight, act_input;

  void release_variables() override {
    for (torch::autograd::SavedVariable* v : {&input, &weight, &act_input}) v->reset_data();
  }

  // Called once, right after the forward, with its inputs and its two outputs.
  void attach(const at::Tensor& input_, const at::Tensor& weight_, const std::optional<at::Tensor>& bias,
              std::array<int64_t, 2> stride_, std::array<int64_t, 2> padding_,
              std::array<int64_t, 2> output_padding_, const std::optional<std::string>& activation_,
              double negative_slope_, at::Tensor& out, const at::Tensor& pre) {
    has_bias = bias.has_value() && bias->defined();
    set_next_edges(torch::autograd::collect_next_edges(input_, weight_, has_bias ? *bias : at::Tensor()));
    stride = stride_;
    padding = padding_;
    output_padding = output_padding_;
    activation = activation_;
    negative_slope = negative_slope_;
    torch::autograd::set_history(out, getptr());
    input = torch::autograd::SavedVariable(input_, /*is_output=*/false);
    weight = torch::autograd::SavedVariable(weight_, /*is_output=*/false);
    act_input = saved_act_input(activation_, pre, out);
  }
};

}  // namespace aefast
