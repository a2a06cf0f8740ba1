// Dispatched entry points for SwigluForward / SwigluBackward (swiglu.h): one dispatch per call;
// the per-target bodies are in swiglu-inl.h.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/swiglu.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kernels/swiglu-inl.h"

#if HWY_ONCE
#include "kernels/swiglu.h"

namespace moe::kernels {

HWY_EXPORT(SwigluForward);
HWY_EXPORT(SwigluBackward);

void SwigluForward(const float* g, const float* u, float* act, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SwigluForward)(g, u, act, n);
}

void SwigluBackward(const float* g, const float* u, const float* dact, float* act, float* dg,
                    float* du, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SwigluBackward)(g, u, dact, act, dg, du, n);
}

}  // namespace moe::kernels
#endif  // HWY_ONCE
