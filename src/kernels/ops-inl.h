// Per-target vector and element-wise kernels (Highway). Included once per target by ops.cc
// (through foreach_target.h) and by tests/kernels/ops_test.cc, which calls these per-target
// functions directly so every compiled target is tested. The public, dispatched entry points
// are in kernels.h.
//
// Numerics follow ggml's CPU backend where it matters for agreement with llama.cpp:
//   RmsNorm: float squares summed in double, scale = 1/sqrtf(mean + eps) in float.
//   Softmax: max subtracted, exp in float (Highway's Exp, within 1 ulp of expf, as ggml's
//   vectorised expf is), each vector's sum added in double, scale by float(1/sum).
//   Rope: theta_scale = powf(base, -2/n_rot), theta *= theta_scale iteratively from pos.

#if defined(MOE_KERNELS_OPS_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef MOE_KERNELS_OPS_INL_H_
#undef MOE_KERNELS_OPS_INL_H_
#else
#define MOE_KERNELS_OPS_INL_H_
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "kernels/kernels.h"
#include "kernels/rope-inl.h"

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Entry points are "inline" because this header is compiled into the tests too (one definition
// per target namespace across translation units).

// Sum of all lanes as a scalar.
template <class D, class V>
HWY_INLINE hn::TFromD<D> ReduceLanes(D d, V v) {
  return hn::GetLane(hn::SumOfLanes(d, v));
}

HWY_NOINLINE inline float DotF32(const float* HWY_RESTRICT a, const float* HWY_RESTRICT b,
                          int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  // Four independent accumulators hide the FMA latency.
  auto s0 = hn::Zero(df), s1 = hn::Zero(df), s2 = hn::Zero(df), s3 = hn::Zero(df);
  int64_t i = 0;
  for (; i + 4 * N <= n; i += 4 * N) {
    s0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), s0);
    s1 = hn::MulAdd(hn::LoadU(df, a + i + N), hn::LoadU(df, b + i + N), s1);
    s2 = hn::MulAdd(hn::LoadU(df, a + i + 2 * N), hn::LoadU(df, b + i + 2 * N), s2);
    s3 = hn::MulAdd(hn::LoadU(df, a + i + 3 * N), hn::LoadU(df, b + i + 3 * N), s3);
  }
  for (; i + N <= n; i += N) {
    s0 = hn::MulAdd(hn::LoadU(df, a + i), hn::LoadU(df, b + i), s0);
  }
  float sum = ReduceLanes(df, hn::Add(hn::Add(s0, s1), hn::Add(s2, s3)));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

HWY_NOINLINE inline void Axpy(float a, const float* HWY_RESTRICT x, float* HWY_RESTRICT y,
                       int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const auto va = hn::Set(df, a);
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    hn::StoreU(hn::MulAdd(va, hn::LoadU(df, x + i), hn::LoadU(df, y + i)), df, y + i);
  }
  // The tail uses a one-lane vector so it rounds exactly like the body (fused).
  const hn::CappedTag<float, 1> d1;
  const auto va1 = hn::Set(d1, a);
  for (; i < n; ++i) {
    hn::StoreU(hn::MulAdd(va1, hn::LoadU(d1, x + i), hn::LoadU(d1, y + i)), d1, y + i);
  }
}

HWY_NOINLINE inline void Scale(float a, float* HWY_RESTRICT y, int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const auto va = hn::Set(df, a);
  int64_t i = 0;
  for (; i + N <= n; i += N) hn::StoreU(hn::Mul(va, hn::LoadU(df, y + i)), df, y + i);
  for (; i < n; ++i) y[i] *= a;
}

// y may alias a or b: each lane is read before it is written, so no HWY_RESTRICT here.
HWY_NOINLINE inline void Add(const float* a, const float* b, float* y, int64_t n) {
  const hn::ScalableTag<float> df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    hn::StoreU(hn::Add(hn::LoadU(df, a + i), hn::LoadU(df, b + i)), df, y + i);
  }
  for (; i < n; ++i) y[i] = a[i] + b[i];
}

// Sum of x[i]*x[i] (float products) accumulated in double, as ggml_float.
HWY_INLINE double SumSquaresF64(const float* x, int64_t n) {
  double sum = 0.0;
  int64_t i = 0;
#if HWY_HAVE_FLOAT64
  const hn::ScalableTag<double> dd;
  const hn::Rebind<float, decltype(dd)> dfh;  // as many float lanes as double lanes
  const int64_t N = static_cast<int64_t>(hn::Lanes(dd));
  auto s0 = hn::Zero(dd), s1 = hn::Zero(dd);
  for (; i + 2 * N <= n; i += 2 * N) {
    const auto v0 = hn::LoadU(dfh, x + i);
    const auto v1 = hn::LoadU(dfh, x + i + N);
    s0 = hn::Add(s0, hn::PromoteTo(dd, hn::Mul(v0, v0)));
    s1 = hn::Add(s1, hn::PromoteTo(dd, hn::Mul(v1, v1)));
  }
  sum = ReduceLanes(dd, hn::Add(s0, s1));
#endif
  for (; i < n; ++i) sum += static_cast<double>(x[i] * x[i]);
  return sum;
}

// out may alias x (element-wise second pass).
HWY_NOINLINE inline void RmsNorm(const float* x, const float* w, int64_t n, float eps, float* out) {
  if (n <= 0) return;
  const double sum = SumSquaresF64(x, n);
  const float mean = static_cast<float>(sum / static_cast<double>(n));
  const float scale = 1.0f / std::sqrt(mean + eps);
  const hn::ScalableTag<float> df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const auto vs = hn::Set(df, scale);
  int64_t i = 0;
  // (x * scale) * w, in this order, as ggml's rms_norm followed by mul.
  if (w != nullptr) {
    for (; i + N <= n; i += N) {
      const auto v = hn::Mul(hn::LoadU(df, x + i), vs);
      hn::StoreU(hn::Mul(v, hn::LoadU(df, w + i)), df, out + i);
    }
    for (; i < n; ++i) out[i] = (x[i] * scale) * w[i];
  } else {
    for (; i + N <= n; i += N) hn::StoreU(hn::Mul(hn::LoadU(df, x + i), vs), df, out + i);
    for (; i < n; ++i) out[i] = x[i] * scale;
  }
}

// Not hot (one call per head group per token): scalar, with the angle recurrence of ggml so the
// float rounding of theta matches, and its rope_yarn for the scaling.
HWY_NOINLINE inline void Rope(float* x, int n_heads, int head_dim, int n_rot, int pos,
                       float freq_base, bool neox, const RopeScaling& sc = RopeScaling()) {
  if (n_rot <= 0 || n_heads <= 0) return;
  const float theta_scale = std::pow(freq_base, -2.0f / static_cast<float>(n_rot));
  const int half = n_rot / 2;
  float mscale = sc.attn_factor;
  if (sc.ext_factor != 0.0f) mscale *= 1.0f + 0.1f * std::log(1.0f / sc.freq_scale);
  float theta = static_cast<float>(pos);
  for (int i = 0; i < half; ++i) {
    float angle = sc.freq_scale * theta;
    if (sc.ext_factor != 0.0f) {
      const float y = (static_cast<float>(i) - sc.corr_dims[0]) / std::max(0.001f, sc.corr_dims[1] - sc.corr_dims[0]);
      const float ramp = (1.0f - std::min(1.0f, std::max(0.0f, y))) * sc.ext_factor;
      angle = angle * (1.0f - ramp) + theta * ramp;
    }
    const float c = std::cos(angle) * mscale;
    const float s = std::sin(angle) * mscale;
    const int i0 = neox ? i : 2 * i;
    const int i1 = neox ? i + half : 2 * i + 1;
    RotatePair(x, n_heads, head_dim, i0, i1, c, s);
    theta *= theta_scale;
  }
}

HWY_NOINLINE inline void Softmax(float* x, int64_t n) {
  if (n <= 0) return;
  float max = x[0];
  for (int64_t i = 1; i < n; ++i) max = x[i] > max ? x[i] : max;
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto vmax = hn::Set(d, max);
  double sum = 0.0;
  for (int64_t i = 0; i < n; i += N) {  // the tail through a masked load and store
    const auto m = hn::FirstN(d, static_cast<size_t>(std::min(N, n - i)));
    const auto e = hn::IfThenElseZero(m, hn::Exp(d, hn::Sub(hn::MaskedLoad(m, d, x + i), vmax)));
    hn::BlendedStore(e, m, d, x + i);
    sum += static_cast<double>(hn::GetLane(hn::SumOfLanes(d, e)));
  }
  Scale(static_cast<float>(1.0 / sum), x, n);
}

// One query's attention over n keys and values (rows k_stride and v_stride floats apart), in one
// call: s[j] = scale * q.K_j, s = softmax(s), out[0..D) = sum_j s[j] V_j with each output
// element one fused multiply-add chain over j in order (what std::fill and an Axpy per key give),
// held in registers four vectors at a time. s: n floats of scratch.
HWY_NOINLINE inline void Attend(const float* HWY_RESTRICT q, const float* K, int64_t k_stride,
                                const float* V, int64_t v_stride, int64_t n, int64_t D, float scale,
                                float* HWY_RESTRICT s, float* HWY_RESTRICT out) {
  const hn::ScalableTag<float> df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  if (D % N == 0) {
    // Four keys at a time (four independent chains, one reduction each), then one at a time in
    // the same form, so a key's score does not depend on where it falls.
    const auto dot = [&](const float* k) {
      auto acc = hn::Zero(df);
      for (int64_t i = 0; i < D; i += N) acc = hn::MulAdd(hn::LoadU(df, q + i), hn::LoadU(df, k + i), acc);
      return ReduceLanes(df, acc) * scale;
    };
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
      const float* k0 = K + j * k_stride;
      const float* k1 = k0 + k_stride;
      const float* k2 = k1 + k_stride;
      const float* k3 = k2 + k_stride;
      auto s0 = hn::Zero(df), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t i = 0; i < D; i += N) {
        const auto qi = hn::LoadU(df, q + i);
        s0 = hn::MulAdd(qi, hn::LoadU(df, k0 + i), s0);
        s1 = hn::MulAdd(qi, hn::LoadU(df, k1 + i), s1);
        s2 = hn::MulAdd(qi, hn::LoadU(df, k2 + i), s2);
        s3 = hn::MulAdd(qi, hn::LoadU(df, k3 + i), s3);
      }
      s[j] = ReduceLanes(df, s0) * scale;
      s[j + 1] = ReduceLanes(df, s1) * scale;
      s[j + 2] = ReduceLanes(df, s2) * scale;
      s[j + 3] = ReduceLanes(df, s3) * scale;
    }
    for (; j < n; ++j) s[j] = dot(K + j * k_stride);
  } else {
    for (int64_t j = 0; j < n; ++j) s[j] = DotF32(q, K + j * k_stride, D) * scale;
  }
  Softmax(s, n);
  int64_t c = 0;
  for (; c + 4 * N <= D; c += 4 * N) {
    auto o0 = hn::Zero(df), o1 = o0, o2 = o0, o3 = o0;
    for (int64_t j = 0; j < n; ++j) {
      const auto sj = hn::Set(df, s[j]);
      const float* v = V + j * v_stride + c;
      o0 = hn::MulAdd(sj, hn::LoadU(df, v), o0);
      o1 = hn::MulAdd(sj, hn::LoadU(df, v + N), o1);
      o2 = hn::MulAdd(sj, hn::LoadU(df, v + 2 * N), o2);
      o3 = hn::MulAdd(sj, hn::LoadU(df, v + 3 * N), o3);
    }
    hn::StoreU(o0, df, out + c);
    hn::StoreU(o1, df, out + c + N);
    hn::StoreU(o2, df, out + c + 2 * N);
    hn::StoreU(o3, df, out + c + 3 * N);
  }
  for (; c + N <= D; c += N) {
    auto o = hn::Zero(df);
    for (int64_t j = 0; j < n; ++j) o = hn::MulAdd(hn::Set(df, s[j]), hn::LoadU(df, V + j * v_stride + c), o);
    hn::StoreU(o, df, out + c);
  }
  const hn::CappedTag<float, 1> d1;  // the tail rounds like the body (fused)
  for (; c < D; ++c) {
    auto o = hn::Zero(d1);
    for (int64_t j = 0; j < n; ++j) o = hn::MulAdd(hn::Set(d1, s[j]), hn::LoadU(d1, V + j * v_stride + c), o);
    hn::StoreU(o, d1, out + c);
  }
}

// out may alias gate or up: element i is read before it is written. silu(g) = g / (1 + e^-g),
// with e^-g capped at e^88 (beyond it g / (1 + e^-g) rounds to -0 anyway).
HWY_NOINLINE inline void SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  const auto one = hn::Set(d, 1.0f), cap = hn::Set(d, 88.0f);
  for (int64_t i = 0; i < n; i += N) {
    const auto m = hn::FirstN(d, static_cast<size_t>(std::min(N, n - i)));
    const auto g = hn::MaskedLoad(m, d, gate + i);
    const auto e = hn::Exp(d, hn::Min(hn::Neg(g), cap));
    hn::BlendedStore(hn::Mul(hn::Div(g, hn::Add(one, e)), hn::MaskedLoad(m, d, up + i)), m, d, out + i);
  }
}

// True if a ranks above b: larger value first; NaN ranks below every number. Index order
// breaks ties (handled by the caller's scan order).
HWY_INLINE bool RanksAbove(float a, float b) {
  if (std::isnan(a)) return false;
  if (std::isnan(b)) return true;
  return a > b;
}

// Insertion into a sorted prefix of length <= k: O(n k), fine for expert counts.
HWY_NOINLINE inline void TopK(const float* x, int n, int k, int* idx) {
  if (k <= 0) return;
  int len = 0;
  for (int i = 0; i < n; ++i) {
    // Strictly-above comparison keeps earlier (lower) indices ahead on ties.
    int p = len;
    while (p > 0 && RanksAbove(x[i], x[idx[p - 1]])) --p;
    if (p >= k) continue;
    const int end = len < k ? len : k - 1;
    for (int q = end; q > p; --q) idx[q] = idx[q - 1];
    idx[p] = i;
    if (len < k) ++len;
  }
}

HWY_NOINLINE inline const char* ActiveTarget() { return hwy::TargetName(HWY_TARGET); }

}  // namespace HWY_NAMESPACE
}  // namespace moe::kernels
HWY_AFTER_NAMESPACE();

#endif  // MOE_KERNELS_OPS_INL_H_
