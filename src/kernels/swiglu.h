// SwiGLU activation forward and backward for the MoE layer's training path (vectorized with
// Highway's exp; the scalar std::exp loop cost about a tenth of a layer's forward + backward).
// Plain API, no Highway include; per-target code in swiglu-inl.h, dispatched once per call
// from swiglu.cc. Inference keeps kernels.h's SiluMul (llama.cpp conformance depends on its
// exact rounding); these kernels round differently and are meant for training.
#pragma once

#include <cstdint>

namespace moe::kernels {

// g, u, act: [n]. act[i] = silu(g[i]) * u[i], silu(v) = v * sigmoid(v).
// act may be the same array as g or as u (in place); no partial overlap. n <= 0: no-op.
void SwigluForward(const float* g, const float* u, float* act, int64_t n);

// g, u, dact, act, dg, du: [n]. From dact = dL/dact, with s = sigmoid(g[i]) computed once:
//   act[i] = silu(g[i]) * u[i]                (recomputed; bitwise equal to SwigluForward)
//   dg[i]  = dact[i] * u[i] * s * (1 + g[i] (1 - s))
//   du[i]  = dact[i] * silu(g[i])
// act may be nullptr (not written). Each output may be the same array as one input (in
// place); the outputs are distinct arrays; no partial overlap.
void SwigluBackward(const float* g, const float* u, const float* dact, float* act, float* dg,
                    float* du, int64_t n);

// Numerics (both kernels):
// - Position independence: element i depends only on g[i], u[i], dact[i], never on n, on its
//   position or on its neighbours. The tail of a call goes through the same vector code as the
//   body (on a zero-padded copy), so a token's result is bitwise the same whatever its
//   batch-mates are. Bits may differ between SIMD targets.
// - Accuracy: a few float ulps relative to each result (Highway's Exp is about 1 ulp); 1 - s is
//   computed as exp(-g) * s for g >= 0, so dg keeps its relative accuracy for large g. dg near
//   the root of 1 + g (1 - s) (g ~ -1.28) is accurate relative to the size of its terms only.
// - Large |g| saturates to the limits: s = 1 and silu(g) = g for g >= ~104 (also g = +inf, so
//   act = +-inf there); s = 0, silu(g) = -0 and dg = -0 for g <= ~-88.7 (also g = -inf, for
//   which silu = 0 is the limit); dsilu/dg = 1 at +inf. Results smaller than ~1e-37 (g < ~-85)
//   may lose bits or flush to zero through the denormal range. No NaN comes out of finite or
//   infinite g with finite u and dact (except inf * 0, e.g. g = +inf with u = 0); NaN in g
//   gives NaN in every output.
}  // namespace moe::kernels
