// Autograd of the quantized linear ops. The weights are frozen integer codes (and frozen scales
// and biases), so only the activation and the optional linear bias get gradients:
//   grad_input = <op>_backward(grad_out, W)    (a metalcore op, one node in compiled graphs)
//   grad_bias  = grad_out summed over every leading dim.
// A scale or bias tensor that requires grad is an error naming it, never a silent zero
// gradient. The op is linear in (input, bias), so the forward-mode tangent is the same op
// applied to the tangents: <op>(t_input, W) + t_bias.
#include <torch/library.h>

#include "common/autograd_util.h"

namespace metalcore {
namespace {

using T = at::Tensor;
using OptT = std::optional<at::Tensor>;

using AffineSig = T(const T&, const T&, const T&, const T&, int64_t, const OptT&);
using AffineBwdSig = T(const T&, const T&, const T&, const T&, int64_t);
using GgufSig = T(const T&, const T&, int64_t, const OptT&);
using GgufBwdSig = T(const T&, const T&, int64_t);

void check_frozen(const char* op, const char* arg, const T& t) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && t.defined() && t.requires_grad()), "metalcore.", op,
              ": '", arg,
              "' requires grad, but quantized weights are frozen (only 'input' and 'bias' get "
              "gradients); pass it detached");
}

// grad_out summed down to [n] (the linear bias's gradient).
T bias_grad(const T& grad) { return grad.reshape({-1, grad.size(-1)}).sum(0); }

// The node of one affine (int4/int8) linear call; its edges are (input, bias).
struct AffineLinearBackward : OpNode<AffineLinearBackward> {
  static constexpr const char* kName = "MetalcoreQuantLinearBackward";
  SavedVariable qweight_, scales_, biases_;
  int64_t group_ = 0;
  int64_t bits_ = 4;
  template <typename V>
  void visit(V&& v) {
    v(qweight_, false);
    v(scales_, false);
    v(biases_, false);
    v(group_);
    v(bits_);
  }
  variable_list backward(variable_list& grads) {
    if (!grads[0].defined()) return {T(), T()};
    static const auto bwd4 = op_handle<AffineBwdSig>("int4_linear_backward");
    static const auto bwd8 = op_handle<AffineBwdSig>("int8_linear_backward");
    const auto& bwd = bits_ == 4 ? bwd4 : bwd8;
    T gi = bwd.call(grads[0], qweight_.unpack(), scales_.unpack(), biases_.unpack(), group_);
    const bool want_bias = task_should_compute_output(1);
    return {gi, want_bias ? bias_grad(grads[0]) : T()};
  }
};

struct GgufLinearBackward : OpNode<GgufLinearBackward> {
  static constexpr const char* kName = "MetalcoreGgufLinearBackward";
  SavedVariable data_;
  int64_t qtype_ = 0;
  template <typename V>
  void visit(V&& v) {
    v(data_, false);
    v(qtype_);
  }
  variable_list backward(variable_list& grads) {
    if (!grads[0].defined()) return {T(), T()};
    static const auto bwd = op_handle<GgufBwdSig>("gguf_linear_backward");
    T gi = bwd.call(grads[0], data_.unpack(), qtype_);
    return {gi, task_should_compute_output(1) ? bias_grad(grads[0]) : T()};
  }
};

// Forward-mode tangent of a linear call: op(t_input, W, no bias) + t_bias.
template <typename Call>
void set_linear_tangent(const char* op, const T& out, const T& input, const T& bias, Call call) {
  const T t_in = tangent_of(input), t_b = tangent_of(bias);
  if (!t_in.defined() && !t_b.defined()) return;
  T tangent;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    if (t_in.defined()) tangent = call(t_in);
    if (t_b.defined()) {
      tangent = tangent.defined() ? tangent + t_b : t_b.expand(out.sizes()).contiguous();
    }
  }
  set_tangent(op, out, tangent, {t_in, t_b});
}

template <int Bits>
T affine_linear_autograd(const T& input, const T& qweight, const T& scales, const T& biases,
                         int64_t group, const OptT& bias) {
  static const char* op = Bits == 4 ? "int4_linear" : "int8_linear";
  static const auto handle = op_handle<AffineSig>(op);
  check_frozen(op, "scales", scales);
  check_frozen(op, "biases", biases);
  const T b = bias.value_or(T());
  const bool grad = any_requires_grad({input, b});
  T out = call_below(handle, input, qweight, scales, biases, group, bias);
  if (grad) {
    auto node = new_node<AffineLinearBackward>(input, b);
    node->qweight_ = SavedVariable(qweight, false);
    node->scales_ = SavedVariable(scales, false);
    node->biases_ = SavedVariable(biases, false);
    node->group_ = group;
    node->bits_ = Bits;
    torch::autograd::set_history(out, node);
  }
  set_linear_tangent(op, out, input, b, [&](const T& t) {
    return handle.call(t, qweight, scales, biases, group, std::nullopt);
  });
  return out;
}

T gguf_linear_autograd(const T& input, const T& data, int64_t qtype, const OptT& bias) {
  static const auto handle = op_handle<GgufSig>("gguf_linear");
  const T b = bias.value_or(T());
  const bool grad = any_requires_grad({input, b});
  T out = call_below(handle, input, data, qtype, bias);
  if (grad) {
    auto node = new_node<GgufLinearBackward>(input, b);
    node->data_ = SavedVariable(data, false);
    node->qtype_ = qtype;
    torch::autograd::set_history(out, node);
  }
  set_linear_tangent("gguf_linear", out, input, b,
                     [&](const T& t) { return handle.call(t, data, qtype, std::nullopt); });
  return out;
}

template <int Bits>
T affine_backward_autograd(const T& grad, const T& qweight, const T& scales, const T& biases,
                           int64_t group) {
  static const char* op = Bits == 4 ? "int4_linear_backward" : "int8_linear_backward";
  static const auto handle = op_handle<AffineBwdSig>(op);
  return call_backward_op(op, Bits == 4 ? "int4_linear" : "int8_linear", handle,
                          {grad, scales, biases}, grad, qweight, scales, biases, group);
}

T gguf_backward_autograd(const T& grad, const T& data, int64_t qtype) {
  static const auto handle = op_handle<GgufBwdSig>("gguf_linear_backward");
  return call_backward_op("gguf_linear_backward", "gguf_linear", handle, {grad}, grad, data, qtype);
}

// The dequantize ops have integer inputs and frozen scales: nothing to differentiate, but a
// scale tensor that requires grad must not silently get none.
template <int Bits>
T affine_dequantize_autograd(const T& qweight, const T& scales, const T& biases, int64_t group) {
  static const char* op = Bits == 4 ? "int4_dequantize" : "int8_dequantize";
  static const auto handle = op_handle<T(const T&, const T&, const T&, int64_t)>(op);
  check_frozen(op, "scales", scales);
  check_frozen(op, "biases", biases);
  return call_below(handle, qweight, scales, biases, group);
}

T gguf_dequantize_autograd(const T& data, int64_t qtype, std::optional<at::ScalarType> dtype) {
  static const auto handle =
      op_handle<T(const T&, int64_t, std::optional<at::ScalarType>)>("gguf_dequantize");
  return call_below(handle, data, qtype, dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(metalcore, Autograd, m) {
  m.impl("int4_linear", &affine_linear_autograd<4>);
  m.impl("int8_linear", &affine_linear_autograd<8>);
  m.impl("gguf_linear", &gguf_linear_autograd);
  m.impl("int4_linear_backward", &affine_backward_autograd<4>);
  m.impl("int8_linear_backward", &affine_backward_autograd<8>);
  m.impl("gguf_linear_backward", &gguf_backward_autograd);
  m.impl("int4_dequantize", &affine_dequantize_autograd<4>);
  m.impl("int8_dequantize", &affine_dequantize_autograd<8>);
  m.impl("gguf_dequantize", &gguf_dequantize_autograd);
}

}  // namespace metalcore
