// Per-target rotation of one RoPE pair over all heads, shared by inference's Rope (ops-inl.h)
// and training's RopeApply (train_ops-inl.h): both compile these same statements per target, so
// the compiler contracts the same products into FMAs and training rotates exactly as inference.

#if defined(MOE_KERNELS_ROPE_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef MOE_KERNELS_ROPE_INL_H_
#undef MOE_KERNELS_ROPE_INL_H_
#else
#define MOE_KERNELS_ROPE_INL_H_
#endif

#include <cstdint>

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {

// x = [n_heads][head_dim]: (x[i0], x[i1]) of every head rotated by the angle whose cosine and
// sine are c and s.
HWY_INLINE void RotatePair(float* x, int n_heads, int head_dim, int i0, int i1, float c, float s) {
  for (int h = 0; h < n_heads; ++h) {
    float* xh = x + static_cast<int64_t>(h) * head_dim;
    const float x0 = xh[i0];
    const float x1 = xh[i1];
    xh[i0] = x0 * c - x1 * s;
    xh[i1] = x0 * s + x1 * c;
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace moe::kernels
HWY_AFTER_NAMESPACE();

#endif  // MOE_KERNELS_ROPE_INL_H_
