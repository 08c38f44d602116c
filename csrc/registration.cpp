// Every metalcore operator schema, in one place. Backend kernels (CPU, MPS, CUDA) and autograd
// live next to their family in csrc/<family>/ and only register implementations.
//
// Schema rules (schemas are a public ABI: exported .pt2 files serialize arguments by name):
//  - never rename or reorder arguments; append new ones at the end, with defaults;
//  - scheduled scalars (learning rate) are 0-dim tensors, so compiled graphs do not recompile
//    when a scheduler changes them;
//  - each mutated list has its own alias set; mutating ops return nothing;
//  - no `.out` overloads: on torch 2.13 they break torch.compile(dynamic=True).
#include <torch/library.h>

TORCH_LIBRARY(metalcore, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};

  // --- RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, over the last dim, fp32 accumulation.
  m.def("rmsnorm(Tensor input, Tensor? weight, float eps) -> Tensor", tags);
  // grad_weight is empty (shape [0]) when weight is None.
  m.def(
      "rmsnorm_backward(Tensor grad_out, Tensor input, Tensor? weight, float eps)"
      " -> (Tensor grad_input, Tensor grad_weight)",
      tags);
  // residual_out = input + residual; output = rmsnorm(residual_out, weight, eps).
  m.def(
      "fused_add_rmsnorm(Tensor input, Tensor residual, Tensor? weight, float eps)"
      " -> (Tensor output, Tensor residual_out)",
      tags);
  // Gradient w.r.t. input equals gradient w.r.t. residual; grad_residual_out may be None.
  m.def(
      "fused_add_rmsnorm_backward(Tensor grad_out, Tensor? grad_residual_out, Tensor residual_out,"
      " Tensor? weight, float eps) -> (Tensor grad_input, Tensor grad_weight)",
      tags);

  // --- Activations (elementwise; gelu's approximate is 'none' or 'tanh' as in torch).
  m.def("silu(Tensor input) -> Tensor", tags);
  m.def("silu_backward(Tensor grad_out, Tensor input) -> Tensor", tags);
  m.def("gelu(Tensor input, str approximate='none') -> Tensor", tags);
  m.def("gelu_backward(Tensor grad_out, Tensor input, str approximate='none') -> Tensor", tags);
  // swiglu(gate, up) = silu(gate) * up
  m.def("swiglu(Tensor gate, Tensor up) -> Tensor", tags);
  m.def(
      "swiglu_backward(Tensor grad_out, Tensor gate, Tensor up) -> (Tensor grad_gate, Tensor "
      "grad_up)",
      tags);

  // --- Rotary embedding of q and k in one op. q: [B, Hq, S, D], k: [B, Hk, S, D];
  // cos/sin: [S, R] or [B|1, S, R] with R <= D even (R < D: partial rotary, the rest passes
  // through). interleaved=False: Llama/HF half-split pairs (i, i + R/2); True: GPT-J pairs
  // (2i, 2i + 1).
  m.def(
      "rope(Tensor q, Tensor k, Tensor cos, Tensor sin, bool interleaved=False)"
      " -> (Tensor q_out, Tensor k_out)",
      tags);
  m.def(
      "rope_backward(Tensor grad_q_out, Tensor grad_k_out, Tensor cos, Tensor sin,"
      " bool interleaved=False) -> (Tensor grad_q, Tensor grad_k)",
      tags);

  // --- AdamW step over lists of tensors, in place. Increments each state_steps[i] by one and
  // uses the incremented value for bias correction (one launch = one optimizer step).
  // max_exp_avg_sqs is empty unless amsgrad.
  m.def(
      "adamw(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs,"
      " Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!)[] state_steps,"
      " Tensor lr, float beta1, float beta2, float weight_decay, float eps, bool amsgrad=False,"
      " bool maximize=False) -> ()",
      tags);

  // Where Dynamo should look for the Python fake implementations.
  m.set_python_module("metalcore._fakes");
}
