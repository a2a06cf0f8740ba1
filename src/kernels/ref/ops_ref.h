// Scalar references for the vector, element-wise and product kernels of kernels.h, templated on
// the element type T (float or double) so tests can run them in double. They follow the
// mathematical definitions (theta = pos * base^(-2i/n_rot) by pow, exp in T, ...), not the
// fast code's operation order, so agreement is a real check; tolerances belong to the tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

#include "kernels/ref/quant_ref.h"
#include "tensor/dtype.h"

namespace moe::kernels::ref {

template <typename T>
T Dot(const float* a, const float* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<T>(a[i]) * static_cast<T>(b[i]);
  return s;
}

// sum |a_i b_i|: the scale of the rounding error of any summation order.
template <typename T>
T AbsDot(const float* a, const float* b, int64_t n) {
  T s = 0;
  for (int64_t i = 0; i < n; ++i) s += std::abs(static_cast<T>(a[i]) * static_cast<T>(b[i]));
  return s;
}

template <typename T>
void Axpy(T a, const float* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * static_cast<T>(x[i]);
}

template <typename T>
void Scale(T a, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= a;
}

template <typename T>
void Add(const float* a, const float* b, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = static_cast<T>(a[i]) + static_cast<T>(b[i]);
}

// out[i] = x[i] / sqrt(mean(x^2) + eps) * (w ? w[i] : 1).
template <typename T>
void RmsNorm(const float* x, const float* w, int64_t n, T eps, T* out) {
  T ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += static_cast<T>(x[i]) * static_cast<T>(x[i]);
  const T scale = T(1) / std::sqrt(ss / static_cast<T>(n) + eps);
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<T>(x[i]) * scale * (w ? static_cast<T>(w[i]) : T(1));
  }
}

// Rotary embedding of x = [n_heads][head_dim] (in/out, in T) at position pos.
// Scaled as kernels::RopeScaling says: freq_scale, ext_factor, attn_factor, corr_dims (in T).
template <typename T>
void Rope(T* x, int n_heads, int head_dim, int n_rot, int pos, T freq_base, bool neox,
          T freq_scale = 1, T ext_factor = 0, T attn_factor = 1, T corr0 = 0, T corr1 = 0) {
  const int half = n_rot / 2;
  T mscale = attn_factor;
  if (ext_factor != 0) mscale *= 1 + T(0.1) * std::log(1 / freq_scale);
  for (int h = 0; h < n_heads; ++h) {
    T* xh = x + static_cast<int64_t>(h) * head_dim;
    for (int i = 0; i < half; ++i) {
      const T t = static_cast<T>(pos) * std::pow(freq_base, T(-2) * i / n_rot);
      T theta = freq_scale * t;
      if (ext_factor != 0) {
        const T y = (i - corr0) / std::max(T(0.001), corr1 - corr0);
        const T ramp = (1 - std::min(T(1), std::max(T(0), y))) * ext_factor;
        theta = theta * (1 - ramp) + t * ramp;
      }
      const int i0 = neox ? i : 2 * i;
      const int i1 = neox ? i + half : 2 * i + 1;
      const T x0 = xh[i0], x1 = xh[i1];
      const T c = std::cos(theta) * mscale, s = std::sin(theta) * mscale;
      xh[i0] = x0 * c - x1 * s;
      xh[i1] = x0 * s + x1 * c;
    }
  }
}

template <typename T>
void Softmax(const float* x, T* out, int64_t n) {
  if (n <= 0) return;
  T max = static_cast<T>(x[0]);
  for (int64_t i = 1; i < n; ++i) max = std::max(max, static_cast<T>(x[i]));
  T sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += out[i] = std::exp(static_cast<T>(x[i]) - max);
  for (int64_t i = 0; i < n; ++i) out[i] /= sum;
}

template <typename T>
void SiluMul(const float* gate, const float* up, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const T g = static_cast<T>(gate[i]);
    out[i] = g / (T(1) + std::exp(-g)) * static_cast<T>(up[i]);
  }
}

// The k largest by a stable sort: descending value, ties by ascending index.
inline std::vector<int> TopK(const float* x, int n, int k) {
  std::vector<int> idx(n);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [x](int a, int b) { return x[a] > x[b]; });
  idx.resize(k);
  return idx;
}

// ---- products ----

struct DotResult {
  double value;  // dot of the dequantized row and activation
  double basis;  // sum over elements of the magnitudes that are rounded: the error scale
};

// Reference for one output of MatMul: dot(dequant(weight row), dequant(activation row)) in
// double, where the activation is in VecDotType(w) (q8_1: the product uses its s, as ggml's).
// basis is sum |w_i x_i|, except for q2_K, q4_K and q5_K, whose two terms d*sc*q and dmin*m
// are summed separately and may cancel: there it is sum (|d sc q| + |dmin m|) |x_i|.
inline DotResult DotRow(DType w, const void* wrow, const void* xrow, int64_t n) {
  std::vector<double> wd(n), xd(n);
  DequantizeRow<double>(w, wrow, wd.data(), n);
  DequantizeRow<double>(VecDotType(w), xrow, xd.data(), n);
  DotResult r{0.0, 0.0};
  for (int64_t i = 0; i < n; ++i) {
    r.value += wd[i] * xd[i];
    r.basis += std::abs(wd[i] * xd[i]);
  }
  if (VecDotType(w) == DType::kQ8_1) {
    // q4_1 / q5_1 (ggml's formula): per block d_w d_x sum(q_w q_x) + m_w s_x, where s_x is the
    // activation block's f16 s = d_x * sum(q_x), not the sum of its dequantized values.
    r = DotResult{0.0, 0.0};
    for (int64_t b = 0; b < n / kQK8_0; ++b) {
      const BlockQ8_1 xb = LoadBlock<BlockQ8_1>(xrow, b);
      // d and m are the first two fields of both weight blocks.
      const BlockQ4_1 head = LoadBlock<BlockQ4_1>(
          static_cast<const uint8_t*>(wrow) + b * static_cast<int64_t>(Traits(w).block_bytes),
          0);
      const double m = HalfValue<double>(head.m), s = HalfValue<double>(xb.s);
      for (int64_t i = b * kQK8_0; i < (b + 1) * kQK8_0; ++i) {
        r.value += (wd[i] - m) * xd[i];  // wd - m = d q exactly
        r.basis += std::abs((wd[i] - m) * xd[i]);
      }
      r.value += m * s;
      r.basis += std::abs(m * s);
    }
  }
  if (w == DType::kIQ2_XXS || w == DType::kIQ2_XS || w == DType::kIQ2_S || w == DType::kIQ3_XXS ||
      w == DType::kIQ3_S || w == DType::kIQ1_S || w == DType::kIQ1_M) {
    // ggml's x86 kernels for the codebook types negate the 8-bit activations where the weight
    // is negative, and -(-128) wraps to -128: such a product counts as w * 128. iq1_s: the grid
    // part dl g only (its delta part dl delta multiplies the exact activation sums); iq1_m: the
    // grid part and, separately, the delta part (both are signs put on the activations).
    r = DotResult{0.0, 0.0};
    const auto wrapped = [](double part, bool d_neg, int8_t q, double x, float xd_scale) {
      const bool neg = part != 0 && ((part < 0) != d_neg);  // the encoded sign: that of part / d
      return neg && q == -128 ? 128.0 * xd_scale : x;
    };
    for (int64_t b = 0; b < n / kQK_K; ++b) {
      const BlockQ8_K xb = LoadBlock<BlockQ8_K>(xrow, b);
      const uint8_t* wb = static_cast<const uint8_t*>(wrow) + b * Traits(w).block_bytes;
      uint16_t dw;  // the weight block's d (the first field, but for iq1_m)
      if (w == DType::kIQ1_M) {
        dw = IQ1MScaleBits(wb + offsetof(BlockIQ1_M, scales));
      } else {
        std::memcpy(&dw, wb, sizeof(dw));
      }
      const bool d_neg = HalfValue<double>(dw) < 0;
      for (int i = 0; i < kQK_K; ++i) {
        const int64_t e = b * kQK_K + i;
        const double c = OffsetTerm(w, wrow, e), wg = wd[e] - c;
        const double xg = wrapped(wg, d_neg, xb.qs[i], xd[e], xb.d);
        const double xc = w == DType::kIQ1_M ? wrapped(c, d_neg, xb.qs[i], xd[e], xb.d) : xd[e];
        r.value += wg * xg + c * xc;
        r.basis += std::abs(wg * xg) + std::abs(c * xc);
      }
    }
  }
  if (w == DType::kQ2_K || w == DType::kQ4_K || w == DType::kQ5_K) {
    // w_i = (w_i - c_i) + c_i with c_i = -dmin m: both terms count.
    r.basis = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double c = OffsetTerm(w, wrow, i);
      r.basis += (std::abs(wd[i] - c) + std::abs(c)) * std::abs(xd[i]);
    }
  }
  return r;
}

}  // namespace moe::kernels::ref
