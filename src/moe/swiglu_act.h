// SwiGLU's element-wise part for the training paths (the MoE layer's experts and the dense FFN of
// deepseek2's leading blocks): float through the vectorised kernels (kernels/swiglu.h, each
// element's result depends on its inputs only), double as the plain formulas (references).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "kernels/swiglu.h"

namespace moe {

template <typename T>
T Sigmoid(T v) { return T(1) / (T(1) + std::exp(-v)); }

// act = silu(g) * u element-wise.
template <typename T>
void SwigluAct(const T* g, const T* u, T* act, size_t n) {
  if constexpr (std::is_same_v<T, float>) {
    kernels::SwigluForward(g, u, act, static_cast<int64_t>(n));
  } else {
    for (size_t i = 0; i < n; ++i) act[i] = g[i] * Sigmoid(g[i]) * u[i];
  }
}

// dg, du from dact: silu(g) = g s, d silu / dg = s (1 + g (1 - s)), s = sigmoid(g).
template <typename T>
void SwigluGrads(const T* g, const T* u, const T* dact, T* dg, T* du, size_t n) {
  if constexpr (std::is_same_v<T, float>) {
    kernels::SwigluBackward(g, u, dact, nullptr, dg, du, static_cast<int64_t>(n));
  } else {
    for (size_t i = 0; i < n; ++i) {
      const T s = Sigmoid(g[i]);
      dg[i] = dact[i] * u[i] * s * (T(1) + g[i] * (T(1) - s));
      du[i] = dact[i] * g[i] * s;
    }
  }
}

}  // namespace moe
