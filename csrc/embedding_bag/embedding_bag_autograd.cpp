// Autograd of embedding_bag: the forward redispatches below autograd, the backward calls
// metalcore::embedding_bag_backward, which gives the weight's and per_sample_weights' gradients.
// indices and offsets are integer tensors: no gradients. Forward-mode AD is not
// offered (an error naming the op, rather than a tangent silently read as zero).
#include <torch/library.h>

#include <string>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using T = at::Tensor;
using OptT = std::optional<at::Tensor>;
using Pair = std::tuple<at::Tensor, at::Tensor>;
using S = c10::string_view;

const auto& forward_op() {
  static const auto op =
      op_handle<T(const T&, const T&, const T&, S, const OptT&, bool, std::optional<int64_t>)>(
          "embedding_bag");
  return op;
}
const auto& backward_op() {
  static const auto op = op_handle<Pair(const T&, const T&, const T&, const T&, S, const OptT&,
                                        bool, std::optional<int64_t>)>("embedding_bag_backward");
  return op;
}

OptT opt(const T& t) { return t.defined() ? OptT(t) : std::nullopt; }

struct EmbeddingBagBackward : OpNode<EmbeddingBagBackward> {
  static constexpr const char* kName = "MetalcoreEmbeddingBagBackward";
  // weight gives V and the per_sample_weights' gradient (a dot with each gathered row).
  SavedVariable weight_, indices_, offsets_, psw_;
  std::string mode_;
  bool include_last_offset_ = false;
  // -1 - V .. V - 1 as given, or none; compiled autograd keys its cache on the scalars.
  bool has_padding_ = false;
  int64_t padding_idx_ = 0;
  template <typename V>
  void visit(V&& v) {
    v(weight_, false);
    v(indices_, false);
    v(offsets_, false);
    v(psw_, false);
    v(mode_);
    v(include_last_offset_);
    v(has_padding_);
    v(padding_idx_);
  }
  variable_list backward(variable_list& grads) {
    if (!grads[0].defined()) return {T(), T()};
    const T psw = psw_.unpack();
    const std::optional<int64_t> pad =
        has_padding_ ? std::optional<int64_t>(padding_idx_) : std::nullopt;
    auto [grad_weight, grad_psw] =
        backward_op().call(grads[0], weight_.unpack(), indices_.unpack(), offsets_.unpack(), mode_,
                           opt(psw), include_last_offset_, pad);
    return {grad_weight, psw.defined() ? grad_psw : T()};
  }
};

T embedding_bag_autograd(const T& weight, const T& indices, const T& offsets, S mode,
                         const OptT& per_sample_weights, bool include_last_offset,
                         std::optional<int64_t> padding_idx) {
  const T psw = per_sample_weights.value_or(T());
  TORCH_CHECK(!any_has_tangent({weight, psw}),
              "metalcore.embedding_bag: forward-mode AD (tangents of 'weight' or "
              "'per_sample_weights') is not supported");
  const bool grad = any_requires_grad({weight, psw});
  T out = call_below(forward_op(), weight, indices, offsets, mode, per_sample_weights,
                     include_last_offset, padding_idx);
  if (grad) {
    auto node = new_node<EmbeddingBagBackward>(weight, psw);
    node->weight_ = SavedVariable(weight, false);
    node->indices_ = SavedVariable(indices, false);
    node->offsets_ = SavedVariable(offsets, false);
    node->psw_ = SavedVariable(psw, false);
    node->mode_ = std::string(mode);
    node->include_last_offset_ = include_last_offset;
    node->has_padding_ = padding_idx.has_value();
    node->padding_idx_ = padding_idx.value_or(0);
    torch::autograd::set_history(out, node);
  }
  return out;
}

Pair embedding_bag_backward_autograd(const T& grad_out, const T& weight, const T& indices,
                                     const T& offsets, S mode, const OptT& per_sample_weights,
                                     bool include_last_offset, std::optional<int64_t> padding_idx) {
  return call_backward_op("embedding_bag_backward", "embedding_bag", backward_op(),
                          {grad_out, weight, per_sample_weights.value_or(T())}, grad_out, weight,
                          indices, offsets, mode, per_sample_weights, include_last_offset,
                          padding_idx);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, Autograd, m) {
  m.impl("embedding_bag", &embedding_bag_autograd);
  m.impl("embedding_bag_backward", &embedding_bag_backward_autograd);
}

}  // namespace metalcore
