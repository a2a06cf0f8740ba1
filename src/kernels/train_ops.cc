// Dispatched entry points of the training kernels (train_ops.h); the per-target bodies are in
// train_ops-inl.h. The RoPE tables and the embedding backward are plain scalar code.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/train_ops.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kernels/train_ops-inl.h"

#if HWY_ONCE
#include <cmath>

#include "kernels/train_ops.h"

namespace moe::kernels {

HWY_EXPORT(RmsNormTrain);
HWY_EXPORT(RmsNormBackward);
HWY_EXPORT(CausalAttentionForward);
HWY_EXPORT(CausalAttentionBackward);
HWY_EXPORT(CrossEntropyRow);
HWY_EXPORT(LogProbRow);
HWY_EXPORT(AdamWUpdate);
HWY_EXPORT(SumSquares);

float RmsNormTrain(const float* x, const float* w, int64_t n, float eps, float* y) {
  return HWY_DYNAMIC_DISPATCH(RmsNormTrain)(x, w, n, eps, y);
}
void RmsNormBackward(const float* x, const float* w, float rstd, const float* dy, int64_t n,
                     float* dx, float* dw) {
  HWY_DYNAMIC_DISPATCH(RmsNormBackward)(x, w, rstd, dy, n, dx, dw);
}
void CausalAttentionForward(int L, int dh, float scale, const float* q, int ldq, const float* k,
                            int ldk, const float* v, int ldv, float* probs, float* out, int ldo) {
  HWY_DYNAMIC_DISPATCH(CausalAttentionForward)(L, dh, scale, q, ldq, k, ldk, v, ldv, probs, out, ldo);
}
void CausalAttentionBackward(int L, int dh, float scale, const float* q, int ldq, const float* k,
                             int ldk, const float* v, int ldv, const float* probs,
                             const float* dout, int ldo, float* dq, int lddq, float* dk,
                             int lddk, float* dv, int lddv, float* scratch) {
  HWY_DYNAMIC_DISPATCH(CausalAttentionBackward)(L, dh, scale, q, ldq, k, ldk, v, ldv, probs, dout,
                                                ldo, dq, lddq, dk, lddk, dv, lddv, scratch);
}
double CrossEntropyRow(const float* logits, int64_t V, int32_t target, float scale, float* dlogits) {
  return HWY_DYNAMIC_DISPATCH(CrossEntropyRow)(logits, V, target, scale, dlogits);
}
double LogProbRow(const float* logits, int64_t V, int32_t target) {
  return HWY_DYNAMIC_DISPATCH(LogProbRow)(logits, V, target);
}

void AdamWUpdate(float* w, const float* g, float* m, float* v, int64_t n, const AdamWParams& p) {
  HWY_DYNAMIC_DISPATCH(AdamWUpdate)(w, g, m, v, n, p);
}
double SumSquares(const float* x, int64_t n) { return HWY_DYNAMIC_DISPATCH(SumSquares)(x, n); }

void EmbeddingBackward(const int32_t* tokens, int n, const float* dx, int d, float* dE) {
  for (int t = 0; t < n; ++t) {
    float* row = dE + static_cast<int64_t>(tokens[t]) * d;
    const float* g = dx + static_cast<int64_t>(t) * d;
    for (int i = 0; i < d; ++i) row[i] += g[i];
  }
}

}  // namespace moe::kernels
#endif  // HWY_ONCE
