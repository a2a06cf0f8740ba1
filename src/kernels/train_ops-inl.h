// Per-target training kernels (Highway). Included once per target by train_ops.cc (through
// foreach_target.h) and by tests/kernels/train_ops_test.cc, which calls these per-target
// functions directly so every compiled target is tested. Contracts: train_ops.h.

#if defined(MOE_KERNELS_TRAIN_OPS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef MOE_KERNELS_TRAIN_OPS_INL_H_
#undef MOE_KERNELS_TRAIN_OPS_INL_H_
#else
#define MOE_KERNELS_TRAIN_OPS_INL_H_
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>

#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "kernels/gemm.h"
#include "kernels/train_ops.h"

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

namespace train_detail {

template <class D, class V>
HWY_INLINE float SumLanes(D d, V v) {
  return hn::GetLane(hn::SumOfLanes(d, v));
}

// exp(x) for x <= 0 (x - max of a softmax row): clamped at -150, where hn::Exp is exactly 0
// (hn::Exp is only valid down to about -104), so -inf (masked entries) gives 0.
template <class D, class V>
HWY_INLINE V ExpNonPositive(D d, V x) {
  return hn::Exp(d, hn::Max(x, hn::Set(d, -150.0f)));
}

// sum of x[i] * y[i] (four accumulators, fixed order).
HWY_INLINE float Dot(const float* HWY_RESTRICT x, const float* HWY_RESTRICT y, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  auto s0 = hn::Zero(d), s1 = hn::Zero(d);
  int64_t i = 0;
  for (; i + 2 * N <= n; i += 2 * N) {
    s0 = hn::MulAdd(hn::LoadU(d, x + i), hn::LoadU(d, y + i), s0);
    s1 = hn::MulAdd(hn::LoadU(d, x + i + N), hn::LoadU(d, y + i + N), s1);
  }
  for (; i + N <= n; i += N) s0 = hn::MulAdd(hn::LoadU(d, x + i), hn::LoadU(d, y + i), s0);
  float s = SumLanes(d, hn::Add(s0, s1));
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

HWY_INLINE float Max(const float* x, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}

// out[i] = exp(x[i] - mx); returns the sum (vector accumulators, fixed order).
HWY_INLINE double ExpShiftSum(const float* x, int64_t n, float mx, float* out) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto vm = hn::Set(d, mx);
  auto s = hn::Zero(d);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto e = ExpNonPositive(d, hn::Sub(hn::LoadU(d, x + i), vm));
    hn::StoreU(e, d, out + i);
    s = hn::Add(s, e);
  }
  double sum = SumLanes(d, s);
  for (; i < n; ++i) {
    out[i] = std::exp(x[i] - mx);
    sum += out[i];
  }
  return sum;
}

HWY_INLINE void ScaleInPlace(float a, float* x, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto va = hn::Set(d, a);
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(hn::Mul(hn::LoadU(d, x + i), va), d, x + i);
  for (; i < n; ++i) x[i] *= a;
}

// Softmax of row x [n] in place.
HWY_INLINE void SoftmaxInPlace(float* x, int64_t n) {
  const float mx = Max(x, n);
  const double sum = ExpShiftSum(x, n, mx, x);
  ScaleInPlace(static_cast<float>(1.0 / sum), x, n);
}

// dp[i] = scale * p[i] * (dp[i] - sum_j p[j] dp[j]) in place.
HWY_INLINE void SoftmaxBackwardInPlace(const float* p, float* dp, int64_t n, float scale) {
  const float dot = Dot(p, dp, n);
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto vdot = hn::Set(d, dot), vs = hn::Set(d, scale);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto r = hn::Mul(hn::Mul(hn::LoadU(d, p + i), hn::Sub(hn::LoadU(d, dp + i), vdot)), vs);
    hn::StoreU(r, d, dp + i);
  }
  for (; i < n; ++i) dp[i] = p[i] * (dp[i] - dot) * scale;
}

}  // namespace train_detail

HWY_NOINLINE inline float RmsNormTrain(const float* x, const float* w, int64_t n, float eps, float* y) {
  if (n <= 0) return 0.0f;
  const float ss = train_detail::Dot(x, x, n);
  const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(n) + eps);
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto vr = hn::Set(d, rstd);
  int64_t i = 0;
  if (w != nullptr) {
    for (; i + N <= n; i += N) hn::StoreU(hn::Mul(hn::Mul(hn::LoadU(d, x + i), vr), hn::LoadU(d, w + i)), d, y + i);
    for (; i < n; ++i) y[i] = x[i] * rstd * w[i];
  } else {
    for (; i + N <= n; i += N) hn::StoreU(hn::Mul(hn::LoadU(d, x + i), vr), d, y + i);
    for (; i < n; ++i) y[i] = x[i] * rstd;
  }
  return rstd;
}

HWY_NOINLINE inline void RmsNormBackward(const float* x, const float* w, float rstd, const float* dy,
                                         int64_t n, float* dx, float* dw) {
  if (n <= 0) return;
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  // sum(dy * w * x), and dw += dy * x * rstd.
  auto acc = hn::Zero(d);
  const auto vr = hn::Set(d, rstd);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto vx = hn::LoadU(d, x + i), vdy = hn::LoadU(d, dy + i);
    const auto g = w ? hn::Mul(vdy, hn::LoadU(d, w + i)) : vdy;
    acc = hn::MulAdd(g, vx, acc);
    if (dw) hn::StoreU(hn::MulAdd(hn::Mul(vdy, vx), vr, hn::LoadU(d, dw + i)), d, dw + i);
  }
  float dot = train_detail::SumLanes(d, acc);
  for (; i < n; ++i) {
    const float g = w ? dy[i] * w[i] : dy[i];
    dot += g * x[i];
    if (dw) dw[i] += dy[i] * x[i] * rstd;
  }
  const float c = dot * rstd * rstd * rstd / static_cast<float>(n);
  const auto vc = hn::Set(d, c);
  i = 0;
  for (; i + N <= n; i += N) {
    const auto vdy = hn::LoadU(d, dy + i);
    const auto g = w ? hn::Mul(vdy, hn::LoadU(d, w + i)) : vdy;
    hn::StoreU(hn::Sub(hn::Mul(g, vr), hn::Mul(hn::LoadU(d, x + i), vc)), d, dx + i);
  }
  for (; i < n; ++i) {
    const float g = w ? dy[i] * w[i] : dy[i];
    dx[i] = g * rstd - x[i] * c;
  }
}

HWY_NOINLINE inline void CausalAttentionForward(int L, int dh, float scale, const float* q, int ldq,
                                                const float* k, int ldk, const float* v, int ldv,
                                                float* probs, float* out, int ldo) {
  if (L <= 0) return;
  // S = q k^T (all L x L; the masked half is overwritten below), then scale, mask and softmax.
  Gemm(GemmOp::kNT, L, L, dh, q, ldq, k, ldk, probs, L, false);
  for (int i = 0; i < L; ++i) {
    float* row = probs + static_cast<size_t>(i) * L;
    train_detail::ScaleInPlace(scale, row, i + 1);
    train_detail::SoftmaxInPlace(row, i + 1);
    for (int j = i + 1; j < L; ++j) row[j] = 0.0f;
  }
  Gemm(GemmOp::kNN, L, dh, L, probs, L, v, ldv, out, ldo, false);
}

HWY_NOINLINE inline void CausalAttentionBackward(int L, int dh, float scale, const float* q, int ldq,
                                                 const float* k, int ldk, const float* v, int ldv,
                                                 const float* probs, const float* dout, int ldo,
                                                 float* dq, int lddq, float* dk, int lddk, float* dv,
                                                 int lddv, float* scratch) {
  if (L <= 0) return;
  // dv += P^T dout; dP = dout v^T; dS = scale * P (dP - rowsum(P dP)); dq = dS k; dk += dS^T q.
  Gemm(GemmOp::kTN, L, dh, L, probs, L, dout, ldo, dv, lddv, true);
  float* ds = scratch;
  Gemm(GemmOp::kNT, L, L, dh, dout, ldo, v, ldv, ds, L, false);
  for (int i = 0; i < L; ++i) {
    float* row = ds + static_cast<size_t>(i) * L;
    train_detail::SoftmaxBackwardInPlace(probs + static_cast<size_t>(i) * L, row, i + 1, scale);
    for (int j = i + 1; j < L; ++j) row[j] = 0.0f;
  }
  Gemm(GemmOp::kNN, L, dh, L, ds, L, k, ldk, dq, lddq, false);
  Gemm(GemmOp::kTN, L, dh, L, ds, L, q, ldq, dk, lddk, true);
}

HWY_NOINLINE inline double CrossEntropyRow(const float* logits, int64_t V, int32_t target, float scale,
                                           float* dlogits) {
  const float mx = train_detail::Max(logits, V);
  const float lt = logits[target];  // read before dlogits (which may alias) is written
  const double sum = train_detail::ExpShiftSum(logits, V, mx, dlogits);
  train_detail::ScaleInPlace(static_cast<float>(scale / sum), dlogits, V);
  dlogits[target] -= scale;
  return std::log(sum) + static_cast<double>(mx) - static_cast<double>(lt);
}

HWY_NOINLINE inline double LogProbRow(const float* logits, int64_t V, int32_t target) {
  const float mx = train_detail::Max(logits, V);
  double sum = 0;
  for (int64_t i = 0; i < V; ++i) sum += std::exp(static_cast<double>(logits[i]) - mx);
  return static_cast<double>(logits[target]) - mx - std::log(sum);
}

HWY_NOINLINE inline void AdamWUpdate(float* HWY_RESTRICT w, const float* HWY_RESTRICT g, float* HWY_RESTRICT m,
                                     float* HWY_RESTRICT v, int64_t n, const AdamWParams& p) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto b1 = hn::Set(d, p.b1), b2 = hn::Set(d, p.b2), c1 = hn::Set(d, 1.0f - p.b1), c2 = hn::Set(d, 1.0f - p.b2);
  const auto step = hn::Set(d, p.step_size), ibc2 = hn::Set(d, p.inv_bc2), eps = hn::Set(d, p.eps);
  const auto keep = hn::Set(d, 1.0f - p.decay), gs = hn::Set(d, p.grad_scale);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    const auto gi = hn::Mul(hn::LoadU(d, g + i), gs);
    const auto mi = hn::MulAdd(b1, hn::LoadU(d, m + i), hn::Mul(c1, gi));
    const auto vi = hn::MulAdd(b2, hn::LoadU(d, v + i), hn::Mul(c2, hn::Mul(gi, gi)));
    hn::StoreU(mi, d, m + i);
    hn::StoreU(vi, d, v + i);
    const auto denom = hn::Add(hn::Sqrt(hn::Mul(vi, ibc2)), eps);
    const auto wi = hn::Mul(hn::LoadU(d, w + i), keep);
    hn::StoreU(hn::NegMulAdd(step, hn::Div(mi, denom), wi), d, w + i);
  }
  for (; i < n; ++i) {
    const float gi = g[i] * p.grad_scale;
    m[i] = p.b1 * m[i] + (1.0f - p.b1) * gi;
    v[i] = p.b2 * v[i] + (1.0f - p.b2) * (gi * gi);
    w[i] = w[i] * (1.0f - p.decay) - p.step_size * (m[i] / (std::sqrt(v[i] * p.inv_bc2) + p.eps));
  }
}

HWY_NOINLINE inline double SumSquares(const float* HWY_RESTRICT x, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  constexpr int64_t kBlock = 4096;  // float partial sums stay short; blocks add up in double
  double total = 0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = b + kBlock < n ? b + kBlock : n;
    auto acc = hn::Zero(d);
    int64_t i = b;
    for (; i + N <= e; i += N) {
      const auto xi = hn::LoadU(d, x + i);
      acc = hn::MulAdd(xi, xi, acc);
    }
    double s = train_detail::SumLanes(d, acc);
    for (; i < e; ++i) s += static_cast<double>(x[i]) * x[i];
    total += s;
  }
  return total;
}

}  // namespace HWY_NAMESPACE
}  // namespace moe::kernels
HWY_AFTER_NAMESPACE();

#endif  // MOE_KERNELS_TRAIN_OPS_INL_H_
