// Per-target vector and element-wise kernels (Highway). Included once per target by ops.cc
// (through foreach_target.h) and by tests/kernels/ops_test.cc, which calls these per-target
// functions directly so every compiled target is tested. The public, dispatched entry points
// are in kernels.h.
//
// Numerics follow ggml's CPU backend where it matters for agreement with llama.cpp:
//   RmsNorm: float squares summed in double, scale = 1/sqrtf(mean + eps) in float.
//   Softmax: max subtracted, exp in float (Highway's Exp, within 1 ulp of expf, as ggml's
//   vectorised expf is), each vector's sum added in double, scale by float(1/sum).
//   RoPE (ops.cc RopeTables): theta_scale = powf(base, -2/n_rot), theta *= theta_scale
//   iteratively from pos.

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
#include <cstring>

#include "hwy/cache_control.h"
#include "hwy/contrib/math/math-inl.h"
#include "hwy/highway.h"
#include "kernels/kernels.h"

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

// x = [n_heads][head_dim] of one position: the first n_rot dims of each head rotated by a
// RopeTables row (pairs (2i, 2i+1) or, neox, (i, i + n_rot/2)); inverse: by -theta. Scalar: not
// hot (per token and layer, a few hundred pairs).
HWY_NOINLINE inline void RopeApply(float* x, int n_heads, int head_dim, int n_rot, const float* cos_row,
                                   const float* sin_row, bool neox, bool inverse) {
  const int half = n_rot / 2;
  for (int i = 0; i < half; ++i) {
    const int i0 = neox ? i : 2 * i;
    const int i1 = neox ? i + half : 2 * i + 1;
    const float c = cos_row[i], s = inverse ? -sin_row[i] : sin_row[i];
    for (int h = 0; h < n_heads; ++h) {
      float* xh = x + static_cast<int64_t>(h) * head_dim;
      const float x0 = xh[i0];
      const float x1 = xh[i1];
      xh[i0] = x0 * c - x1 * s;
      xh[i1] = x0 * s + x1 * c;
    }
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

// Attention of a.rows queries over the same n keys and values (the heads of one GQA group, or
// MLA's heads over the shared latent; rows k_stride / v_stride floats apart, V may alias K), in
// one pass over the cache: blocks of kAttendKeys keys, each block's scores for every row, an
// online softmax (running maximum m and sum l, what was summed rescaled by e^(m_old - m_new)
// when the maximum grows), then the block's values, while the block is in L1. Every score is one
// chain of fused multiply-adds over Dk in vector chunks, reduced across lanes, then a scalar
// fused tail; every output element one fused chain over the keys in order, rescaled where the
// maximum grew, and divided by l at the end. None of it depends on a row's row-mates, so each
// row's result is bitwise the same alone or in any group. Rows are taken two at a time against
// four keys (each key row loaded once for both queries), values four vectors wide.
// A cached key or value row element: F32, or F16 (a half-size cache) widened on load.
template <class DF>
HWY_INLINE hn::Vec<DF> LoadKv(DF df, const float* p) {
  return hn::LoadU(df, p);
}
template <class DF>
HWY_INLINE hn::Vec<DF> LoadKv(DF df, const hwy::float16_t* p) {
  const hn::Rebind<hwy::float16_t, DF> dh;
  return hn::PromoteTo(df, hn::LoadU(dh, p));
}
HWY_INLINE float KvScalar(float x) { return x; }
HWY_INLINE float KvScalar(hwy::float16_t x) {
  uint16_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return F16ToF32(bits);
}

template <int R, class T>  // query rows handled together: 1 or 2
HWY_INLINE void AttendScores(const float* HWY_RESTRICT q, int64_t q_stride, const T* K, int64_t k_stride,
                             int64_t n, int64_t D, float scale, float* HWY_RESTRICT s, int64_t s_stride) {
  const hn::ScalableTag<float> df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const int64_t Dv = D / N * N;  // the vector part of each dot product
  const float* q1 = q + (R == 2 ? q_stride : 0);
  const auto tail = [&](const float* qr, const T* k, float acc) {
    for (int64_t i = Dv; i < D; ++i) acc = std::fma(qr[i], KvScalar(k[i]), acc);
    return acc * scale;
  };
  int64_t j = 0;
  for (; j + 4 <= n; j += 4) {
    const T* k0 = K + j * k_stride;
    const T* k1 = k0 + k_stride;
    const T* k2 = k1 + k_stride;
    const T* k3 = k2 + k_stride;
    auto a0 = hn::Zero(df), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (int64_t i = 0; i < Dv; i += N) {
      const auto v0 = LoadKv(df, k0 + i), v1 = LoadKv(df, k1 + i);
      const auto v2 = LoadKv(df, k2 + i), v3 = LoadKv(df, k3 + i);
      const auto x = hn::LoadU(df, q + i);
      a0 = hn::MulAdd(x, v0, a0);
      a1 = hn::MulAdd(x, v1, a1);
      a2 = hn::MulAdd(x, v2, a2);
      a3 = hn::MulAdd(x, v3, a3);
      if constexpr (R == 2) {
        const auto y = hn::LoadU(df, q1 + i);
        b0 = hn::MulAdd(y, v0, b0);
        b1 = hn::MulAdd(y, v1, b1);
        b2 = hn::MulAdd(y, v2, b2);
        b3 = hn::MulAdd(y, v3, b3);
      }
    }
    s[j] = tail(q, k0, ReduceLanes(df, a0));
    s[j + 1] = tail(q, k1, ReduceLanes(df, a1));
    s[j + 2] = tail(q, k2, ReduceLanes(df, a2));
    s[j + 3] = tail(q, k3, ReduceLanes(df, a3));
    if constexpr (R == 2) {
      float* s1 = s + s_stride;
      s1[j] = tail(q1, k0, ReduceLanes(df, b0));
      s1[j + 1] = tail(q1, k1, ReduceLanes(df, b1));
      s1[j + 2] = tail(q1, k2, ReduceLanes(df, b2));
      s1[j + 3] = tail(q1, k3, ReduceLanes(df, b3));
    }
  }
  for (; j < n; ++j) {
    const T* k = K + j * k_stride;
    auto a = hn::Zero(df), b = a;
    for (int64_t i = 0; i < Dv; i += N) {
      const auto v = LoadKv(df, k + i);
      a = hn::MulAdd(hn::LoadU(df, q + i), v, a);
      if constexpr (R == 2) b = hn::MulAdd(hn::LoadU(df, q1 + i), v, b);
    }
    s[j] = tail(q, k, ReduceLanes(df, a));
    if constexpr (R == 2) s[s_stride + j] = tail(q1, k, ReduceLanes(df, b));
  }
}

// acc: continue the chains from out (the keys before these), else start from zero.
template <int R, class T>  // probability rows handled together: 1 or 2
HWY_INLINE void AttendValues(const float* HWY_RESTRICT s, int64_t s_stride, const T* V, int64_t v_stride,
                             int64_t n, int64_t D, bool acc, float* HWY_RESTRICT out, int64_t out_stride) {
  const hn::ScalableTag<float> df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  const float* s1 = s + (R == 2 ? s_stride : 0);
  float* out1 = out + (R == 2 ? out_stride : 0);
  int64_t c = 0;
  const auto init = [&](const float* o) { return acc ? hn::LoadU(df, o) : hn::Zero(df); };
  for (; c + 4 * N <= D; c += 4 * N) {
    auto a0 = init(out + c), a1 = init(out + c + N), a2 = init(out + c + 2 * N), a3 = init(out + c + 3 * N);
    auto b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    if constexpr (R == 2) {
      b0 = init(out1 + c), b1 = init(out1 + c + N), b2 = init(out1 + c + 2 * N), b3 = init(out1 + c + 3 * N);
    }
    for (int64_t j = 0; j < n; ++j) {
      const T* v = V + j * v_stride + c;
      const auto v0 = LoadKv(df, v), v1 = LoadKv(df, v + N);
      const auto v2 = LoadKv(df, v + 2 * N), v3 = LoadKv(df, v + 3 * N);
      const auto x = hn::Set(df, s[j]);
      a0 = hn::MulAdd(x, v0, a0);
      a1 = hn::MulAdd(x, v1, a1);
      a2 = hn::MulAdd(x, v2, a2);
      a3 = hn::MulAdd(x, v3, a3);
      if constexpr (R == 2) {
        const auto y = hn::Set(df, s1[j]);
        b0 = hn::MulAdd(y, v0, b0);
        b1 = hn::MulAdd(y, v1, b1);
        b2 = hn::MulAdd(y, v2, b2);
        b3 = hn::MulAdd(y, v3, b3);
      }
    }
    hn::StoreU(a0, df, out + c);
    hn::StoreU(a1, df, out + c + N);
    hn::StoreU(a2, df, out + c + 2 * N);
    hn::StoreU(a3, df, out + c + 3 * N);
    if constexpr (R == 2) {
      hn::StoreU(b0, df, out1 + c);
      hn::StoreU(b1, df, out1 + c + N);
      hn::StoreU(b2, df, out1 + c + 2 * N);
      hn::StoreU(b3, df, out1 + c + 3 * N);
    }
  }
  for (; c + N <= D; c += N) {
    auto a = init(out + c), b = a;
    if constexpr (R == 2) b = init(out1 + c);
    for (int64_t j = 0; j < n; ++j) {
      const auto v = LoadKv(df, V + j * v_stride + c);
      a = hn::MulAdd(hn::Set(df, s[j]), v, a);
      if constexpr (R == 2) b = hn::MulAdd(hn::Set(df, s1[j]), v, b);
    }
    hn::StoreU(a, df, out + c);
    if constexpr (R == 2) hn::StoreU(b, df, out1 + c);
  }
  for (; c < D; ++c) {  // the tail rounds like the body (fused)
    float a = acc ? out[c] : 0.0f, b = acc && R == 2 ? out1[c] : 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      a = std::fma(s[j], KvScalar(V[j * v_stride + c]), a);
      if constexpr (R == 2) b = std::fma(s1[j], KvScalar(V[j * v_stride + c]), b);
    }
    out[c] = a;
    if constexpr (R == 2) out1[c] = b;
  }
}

// A block of kAttendKeys rows never straddles a page (pages hold a multiple of them), so each
// block is rows `stride` apart from its first.
template <class T>
HWY_INLINE void AttendT(const AttendRows& a, const KvRows& Kr, int64_t Dk, const KvRows& Vr, int64_t Dv, int64_t n,
                        float scale, float* HWY_RESTRICT s) {
  const T* K = static_cast<const T*>(Kr.base);
  const T* V = static_cast<const T*>(Vr.base);
  const int64_t k_stride = Kr.stride, v_stride = Vr.stride;
  const hn::ScalableTag<float> df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  constexpr int64_t B = kAttendKeys;
  constexpr int kRows = 64;  // rows per pass (their running state lives on the stack)
  for (int r0 = 0; r0 < a.rows; r0 += kRows) {
    const int rows = std::min(kRows, a.rows - r0);
    const float* q = a.q + r0 * a.q_stride;
    float* out = a.out + r0 * a.out_stride;
    float m[kRows];   // running maximum of each row's scores
    double l[kRows];  // running sum of exp(score - m)
    for (int64_t j = 0; j < n; j += B) {
      const int64_t nb = std::min(B, n - j);
      const T* Kj = K + Kr.Offset(j);
      const T* Vj = V + Vr.Offset(j);
      // The next block's lines, so one pass over a cold cache does not wait on memory: into L2
      // only (locality 2: prefetcht1), as into L1 each would hold one of its few miss buffers
      // until the line came and the arithmetic of this block stalled on them (session 19, Zen 4
      // host, one thread, the 1024 keys-and-values items of a 16-sequence decode step from
      // memory: 4.1-4.3 ms into L1, 3.6-3.7 with no prefetch, 2.9 into L2; two or more blocks
      // ahead 3.2-3.7).
      if (j + B < n) {
        const int64_t nn = std::min(B, n - j - B);
        const T* Kn = K + Kr.Offset(j + B);
        const T* Vn = V + Vr.Offset(j + B);
        constexpr int64_t kLine = 64 / sizeof(T);
        for (int64_t i = 0; i < nn; ++i) {
          for (int64_t c = 0; c < Dk; c += kLine) __builtin_prefetch(Kn + i * k_stride + c, 0, 2);
          if (V != K)
            for (int64_t c = 0; c < Dv; c += kLine) __builtin_prefetch(Vn + i * v_stride + c, 0, 2);
        }
      }
      int r = 0;
      for (; r + 2 <= rows; r += 2) AttendScores<2>(q + r * a.q_stride, a.q_stride, Kj, k_stride, nb, Dk, scale, s + r * B, B);
      if (r < rows) AttendScores<1>(q + r * a.q_stride, a.q_stride, Kj, k_stride, nb, Dk, scale, s + r * B, B);
      for (r = 0; r < rows; ++r) {
        float* sr = s + r * B;
        float mb = sr[0];
        for (int64_t i = 1; i < nb; ++i) mb = sr[i] > mb ? sr[i] : mb;
        if (j == 0) {
          m[r] = mb;
          l[r] = 0.0;
        } else if (mb > m[r]) {  // a new maximum: what was summed so far shrinks by e^(m_old - m_new)
          const float c = std::exp(m[r] - mb);
          l[r] *= c;
          Scale(c, out + r * a.out_stride, Dv);
          m[r] = mb;
        }
        const auto vmax = hn::Set(df, m[r]);
        for (int64_t i = 0; i < nb; i += N) {  // the block's tail through a masked load and store
          const auto k = hn::FirstN(df, static_cast<size_t>(std::min(N, nb - i)));
          const auto e = hn::IfThenElseZero(k, hn::Exp(df, hn::Sub(hn::MaskedLoad(k, df, sr + i), vmax)));
          hn::BlendedStore(e, k, df, sr + i);
          l[r] += static_cast<double>(hn::GetLane(hn::SumOfLanes(df, e)));
        }
      }
      for (r = 0; r + 2 <= rows; r += 2)
        AttendValues<2>(s + r * B, B, Vj, v_stride, nb, Dv, j > 0, out + r * a.out_stride, a.out_stride);
      if (r < rows) AttendValues<1>(s + r * B, B, Vj, v_stride, nb, Dv, j > 0, out + r * a.out_stride, a.out_stride);
    }
    for (int r = 0; r < rows; ++r) Scale(static_cast<float>(1.0 / l[r]), out + r * a.out_stride, Dv);
  }
}

HWY_NOINLINE inline void Attend(const AttendRows& a, DType kv, const KvRows& K, int64_t Dk, const KvRows& V,
                                int64_t Dv, int64_t n, float scale, float* HWY_RESTRICT s) {
  if (kv == DType::kF16) {
    AttendT<hwy::float16_t>(a, K, Dk, V, Dv, n, scale, s);
  } else {
    AttendT<float>(a, K, Dk, V, Dv, n, scale, s);
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
