// Forward and backward kernels of the dense parts of a transformer block, for training (fp32):
// RMSNorm, rotary embeddings, causal attention, the embedding lookup and cross-entropy. Plain
// API, no Highway include; per-target code in train_ops-inl.h, dispatched once per call from
// train_ops.cc. Each has a scalar reference in ref/train_ref.h (templated on the element type,
// gradient-checked in double by tests/kernels/train_ops_test.cc).
//
// Single-threaded: the caller splits the work (rows, tokens, sequences x heads) over its pool.
// Deterministic: every result depends only on the inputs of its row, never on the split.
// Inference keeps kernels.h (whose rounding reproduces llama.cpp's); these round as they like.
#pragma once

#include <cstdint>

namespace moe::kernels {

// ---- RMSNorm ----------------------------------------------------------------------------------
// y = x * rstd * w, rstd = 1 / sqrt(mean(x^2) + eps); returns rstd (the backward's input).
// w may be nullptr (no weight). y may alias x.
float RmsNormTrain(const float* x, const float* w, int64_t n, float eps, float* y);
// From dy: dx = rstd * (dy*w) - x * rstd^3 / n * sum(dy*w*x) (written); dw += dy * x * rstd
// (ADDED, when dw is not nullptr). dx may alias dy.
void RmsNormBackward(const float* x, const float* w, float rstd, const float* dy, int64_t n,
                     float* dx, float* dw);

// Rotary embeddings: kernels.h RopeTables and RopeApply (inverse = the backward), shared with
// inference.

// ---- causal attention (one sequence, one head) ------------------------------------------------
// q, k, v: L rows of dh values (row strides ldq, ldk, ldv). probs [L][L]: row i the softmax over
// j <= i of scale * q_i . k_j (0 for j > i). out: L rows (stride ldo) = probs v.
void CausalAttentionForward(int L, int dh, float scale, const float* q, int ldq, const float* k,
                            int ldk, const float* v, int ldv, float* probs, float* out, int ldo);
// From dout (L rows, stride ldo) and the forward's probs: dq WRITTEN, dk and dv ADDED (the heads
// of a GQA group share k and v: call once per head, in head order). scratch: L*L floats.
void CausalAttentionBackward(int L, int dh, float scale, const float* q, int ldq, const float* k,
                             int ldk, const float* v, int ldv, const float* probs,
                             const float* dout, int ldo, float* dq, int lddq, float* dk,
                             int lddk, float* dv, int lddv, float* scratch);

// ---- embedding lookup -------------------------------------------------------------------------
// dE[tokens[t]] += dx[t] for t = 0..n-1, in token order (d values per row).
void EmbeddingBackward(const int32_t* tokens, int n, const float* dx, int d, float* dE);

// ---- cross-entropy ----------------------------------------------------------------------------
// One row of logits [V] and its target: returns logsumexp(logits) - logits[target] (computed in
// double), and writes dlogits = scale * (softmax(logits) - onehot(target)). dlogits may alias
// logits (in place).
double CrossEntropyRow(const float* logits, int64_t V, int32_t target, float scale, float* dlogits);
// log softmax of the target alone (no gradient): logits[target] - logsumexp(logits).
double LogProbRow(const float* logits, int64_t V, int32_t target);

// ---- optimizer ------------------------------------------------------------------------------
// AdamW on n elements: g' = g * grad_scale; m = b1 m + (1 - b1) g'; v = b2 v + (1 - b2) g'^2;
// w -= decay * w; w -= step_size * m / (sqrt(v * inv_bc2) + eps). step_size = lr / (1 - b1^t),
// inv_bc2 = 1 / (1 - b2^t), decay = lr * weight_decay (0 for tensors without decay).
struct AdamWParams {
  float b1, b2, step_size, inv_bc2, eps, decay, grad_scale;
};
void AdamWUpdate(float* w, const float* g, float* m, float* v, int64_t n, const AdamWParams& p);
// sum of x[i]^2, accumulated in float vectors over blocks and in double across them.
double SumSquares(const float* x, int64_t n);

}  // namespace moe::kernels
