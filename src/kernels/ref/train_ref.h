// Scalar references for the training kernels of kernels/train_ops.h, templated on the element
// type T (float or double). Plain loops following the definitions; the trainer's double path
// (whole-model gradient checks, PyTorch goldens) runs on these, and the tests check the fast
// float kernels against them and these against central differences in double.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace moe::kernels::ref {

// y = x * rstd * w; returns rstd = 1 / sqrt(mean(x^2) + eps). w may be nullptr.
template <typename T>
T RmsNormTrain(const T* x, const T* w, int64_t n, T eps, T* y) {
  T ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += x[i] * x[i];
  const T rstd = T(1) / std::sqrt(ss / static_cast<T>(n) + eps);
  for (int64_t i = 0; i < n; ++i) y[i] = x[i] * rstd * (w ? w[i] : T(1));
  return rstd;
}

// dx = rstd * g - x * rstd^3 / n * sum(g x), g = dy * w (written); dw += dy * x * rstd (added).
template <typename T>
void RmsNormBackward(const T* x, const T* w, T rstd, const T* dy, int64_t n, T* dx, T* dw) {
  T dot = 0;
  for (int64_t i = 0; i < n; ++i) dot += dy[i] * (w ? w[i] : T(1)) * x[i];
  const T c = dot * rstd * rstd * rstd / static_cast<T>(n);
  for (int64_t i = 0; i < n; ++i) {
    if (dw) dw[i] += dy[i] * x[i] * rstd;
    dx[i] = dy[i] * (w ? w[i] : T(1)) * rstd - x[i] * c;
  }
}

// Rotation of the first n_rot dims of each head of x [n_heads][head_dim] at position pos by
// theta_i = pos * base^(-2i/n_rot) (computed exactly, with pow); inverse rotates by -theta.
template <typename T>
void Rope(T* x, int n_heads, int head_dim, int n_rot, int pos, T freq_base, bool neox, bool inverse) {
  const int half = n_rot / 2;
  for (int i = 0; i < half; ++i) {
    const T theta = static_cast<T>(pos) * std::pow(freq_base, T(-2) * i / n_rot);
    const T c = std::cos(theta), s = inverse ? -std::sin(theta) : std::sin(theta);
    for (int h = 0; h < n_heads; ++h) {
      T* xh = x + static_cast<int64_t>(h) * head_dim;
      const int i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
      const T x0 = xh[i0], x1 = xh[i1];
      xh[i0] = x0 * c - x1 * s;
      xh[i1] = x0 * s + x1 * c;
    }
  }
}

// Causal attention of one sequence and head (layouts as train_ops.h).
template <typename T>
void CausalAttentionForward(int L, int dh, T scale, const T* q, int ldq, const T* k, int ldk,
                            const T* v, int ldv, T* probs, T* out, int ldo) {
  for (int i = 0; i < L; ++i) {
    T* p = probs + static_cast<size_t>(i) * L;
    T mx = -std::numeric_limits<T>::infinity();
    for (int j = 0; j < L; ++j) {
      if (j > i) {
        p[j] = 0;
        continue;
      }
      T s = 0;
      for (int d = 0; d < dh; ++d) s += q[static_cast<size_t>(i) * ldq + d] * k[static_cast<size_t>(j) * ldk + d];
      p[j] = s * scale;
      mx = std::max(mx, p[j]);
    }
    T sum = 0;
    for (int j = 0; j <= i; ++j) sum += p[j] = std::exp(p[j] - mx);
    for (int j = 0; j <= i; ++j) p[j] /= sum;
    for (int d = 0; d < dh; ++d) {
      T o = 0;
      for (int j = 0; j <= i; ++j) o += p[j] * v[static_cast<size_t>(j) * ldv + d];
      out[static_cast<size_t>(i) * ldo + d] = o;
    }
  }
}

// dq written; dk, dv added.
template <typename T>
void CausalAttentionBackward(int L, int dh, T scale, const T* q, int ldq, const T* k, int ldk,
                             const T* v, int ldv, const T* probs, const T* dout, int ldo, T* dq,
                             int lddq, T* dk, int lddk, T* dv, int lddv) {
  std::vector<T> dp(L);
  for (int i = 0; i < L; ++i) {
    const T* p = probs + static_cast<size_t>(i) * L;
    const T* g = dout + static_cast<size_t>(i) * ldo;
    T dot = 0;
    for (int j = 0; j <= i; ++j) {
      T a = 0;
      for (int d = 0; d < dh; ++d) a += g[d] * v[static_cast<size_t>(j) * ldv + d];
      dp[j] = a;
      dot += a * p[j];
    }
    for (int d = 0; d < dh; ++d) dq[static_cast<size_t>(i) * lddq + d] = 0;
    for (int j = 0; j <= i; ++j) {
      const T ds = p[j] * (dp[j] - dot) * scale;
      for (int d = 0; d < dh; ++d) {
        dv[static_cast<size_t>(j) * lddv + d] += p[j] * g[d];
        dq[static_cast<size_t>(i) * lddq + d] += ds * k[static_cast<size_t>(j) * ldk + d];
        dk[static_cast<size_t>(j) * lddk + d] += ds * q[static_cast<size_t>(i) * ldq + d];
      }
    }
  }
}

template <typename T>
void EmbeddingBackward(const int32_t* tokens, int n, const T* dx, int d, T* dE) {
  for (int t = 0; t < n; ++t) {
    for (int i = 0; i < d; ++i) dE[static_cast<int64_t>(tokens[t]) * d + i] += dx[static_cast<int64_t>(t) * d + i];
  }
}

// logsumexp(logits) - logits[target]; dlogits = scale * (softmax - onehot) (may alias logits).
template <typename T>
double CrossEntropyRow(const T* logits, int64_t V, int32_t target, T scale, T* dlogits) {
  T mx = logits[0];
  for (int64_t i = 1; i < V; ++i) mx = std::max(mx, logits[i]);
  const T lt = logits[target];
  T sum = 0;
  for (int64_t i = 0; i < V; ++i) sum += std::exp(logits[i] - mx);
  const T lse = mx + std::log(sum);
  for (int64_t i = 0; i < V; ++i) dlogits[i] = scale * std::exp(logits[i] - lse);
  dlogits[target] -= scale;
  return static_cast<double>(lse - lt);
}

// AdamW on n elements (train_ops.h), in T.
template <typename T>
void AdamWUpdate(T* w, const T* g, T* m, T* v, int64_t n, T b1, T b2, T step_size, T inv_bc2, T eps, T decay,
                 T grad_scale) {
  for (int64_t i = 0; i < n; ++i) {
    const T gi = g[i] * grad_scale;
    m[i] = b1 * m[i] + (1 - b1) * gi;
    v[i] = b2 * v[i] + (1 - b2) * gi * gi;
    w[i] -= decay * w[i];
    w[i] -= step_size * m[i] / (std::sqrt(v[i] * inv_bc2) + eps);
  }
}

}  // namespace moe::kernels::ref
