// Per-target SwiGLU forward and backward (Highway). Included once per target by swiglu.cc
// (through foreach_target.h) and by tests/kernels/swiglu_test.cc, which calls these per-target
// functions directly so every compiled target is tested. Contract and numerics: swiglu.h.
//
// Every element goes through the same per-vector function: full vectors straight from the
// arrays, the last partial vector through a zero-padded copy on the stack. Lanes never interact,
// so element i's bits depend on its inputs only (the MoE layer relies on this).

#if defined(MOE_KERNELS_SWIGLU_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef MOE_KERNELS_SWIGLU_INL_H_
#undef MOE_KERNELS_SWIGLU_INL_H_
#else
#define MOE_KERNELS_SWIGLU_INL_H_
#endif

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>

#include "hwy/highway.h"
#include "hwy/contrib/math/math-inl.h"

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Upper bound on Lanes(ScalableTag<float>) for this target, for the tail's stack copies.
constexpr size_t kSwigluMaxLanes = HWY_MAX_BYTES / sizeof(float);

// exp(-g), s = sigmoid(g) and silu(g) for one vector.
template <class D, class V = hn::Vec<D>>
struct SwigluParts {
  V e, s, silu;
};

template <class D, class V = hn::Vec<D>>
HWY_INLINE SwigluParts<D> SwigluCore(D d, V g) {
  const V one = hn::Set(d, 1.0f);
  // hn::Exp is only valid up to ~104 (its integer exponent wraps beyond), so clamp -g: exp(100)
  // already overflows to inf, which makes s exactly 0 for g <= ~-88.7, and below -104 hn::Exp
  // returns exactly 0, so s = 1 (and 1 - s = 0) for large g. -150 keeps the exponent arithmetic
  // in range for g = +inf / huge.
  const V x = hn::Min(hn::Max(hn::Neg(g), hn::Set(d, -150.0f)), hn::Set(d, 100.0f));
  SwigluParts<D> p;
  p.e = hn::Exp(d, x);
  p.s = hn::Div(one, hn::Add(one, p.e));
  // g * s is -inf * 0 = NaN at g = -inf; the limit there is 0. (NaN g stays NaN: NaN * s.)
  const V neg_inf = hn::Set(d, -std::numeric_limits<float>::infinity());
  p.silu = hn::IfThenZeroElse(hn::Eq(g, neg_inf), hn::Mul(g, p.s));
  return p;
}

// dsilu/dg = s (1 + g (1 - s)) from the parts of SwigluCore.
template <class D, class V = hn::Vec<D>>
HWY_INLINE V SwigluDerivative(D d, V g, const SwigluParts<D>& p) {
  const V one = hn::Set(d, 1.0f);
  // 1 - s = exp(-g) s: exact-ish for g >= 0, where 1 - s would cancel; for g < 0, s < 1/2 and
  // 1 - s is accurate (and exp(-g) may be inf).
  const V one_minus_s =
      hn::IfThenElse(hn::Lt(g, hn::Zero(d)), hn::Sub(one, p.s), hn::Mul(p.e, p.s));
  // +-inf -> +-FLT_MAX so that inf * 0 (g = +inf) and 0 * -inf (g = -inf) give the limits 1, 0.
  const V g_finite = hn::IfThenElse(
      hn::IsInf(g), hn::CopySign(hn::Set(d, std::numeric_limits<float>::max()), g), g);
  return hn::Mul(p.s, hn::MulAdd(g_finite, one_minus_s, one));
}

template <class D, class V = hn::Vec<D>>
HWY_INLINE V SwigluForwardVec(D d, V g, V u) {
  return hn::Mul(SwigluCore(d, g).silu, u);
}

template <class D, class V = hn::Vec<D>>
HWY_INLINE void SwigluBackwardVec(D d, V g, V u, V dact, V& act, V& dg, V& du) {
  const SwigluParts<D> p = SwigluCore(d, g);
  act = hn::Mul(p.silu, u);  // same operations as SwigluForwardVec: same bits
  dg = hn::Mul(hn::Mul(dact, u), SwigluDerivative(d, g, p));
  du = hn::Mul(dact, p.silu);
}

// Entry points are "inline" because this header is compiled into the tests too (one definition
// per target namespace across translation units).

HWY_NOINLINE inline void SwigluForward(const float* g, const float* u, float* act, int64_t n) {
  const hn::ScalableTag<float> d;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  for (; i + N <= n; i += N) {
    hn::StoreU(SwigluForwardVec(d, hn::LoadU(d, g + i), hn::LoadU(d, u + i)), d, act + i);
  }
  if (i < n) {
    const size_t rem = static_cast<size_t>(n - i);
    HWY_ALIGN float gb[kSwigluMaxLanes] = {};
    HWY_ALIGN float ub[kSwigluMaxLanes] = {};
    std::memcpy(gb, g + i, rem * sizeof(float));
    std::memcpy(ub, u + i, rem * sizeof(float));
    hn::Store(SwigluForwardVec(d, hn::Load(d, gb), hn::Load(d, ub)), d, gb);
    std::memcpy(act + i, gb, rem * sizeof(float));
  }
}

HWY_NOINLINE inline void SwigluBackward(const float* g, const float* u, const float* dact,
                                        float* act, float* dg, float* du, int64_t n) {
  const hn::ScalableTag<float> d;
  using V = hn::Vec<decltype(d)>;
  const int64_t N = static_cast<int64_t>(hn::Lanes(d));
  int64_t i = 0;
  V va, vdg, vdu;
  for (; i + N <= n; i += N) {
    SwigluBackwardVec(d, hn::LoadU(d, g + i), hn::LoadU(d, u + i), hn::LoadU(d, dact + i), va,
                      vdg, vdu);
    if (act != nullptr) hn::StoreU(va, d, act + i);
    hn::StoreU(vdg, d, dg + i);
    hn::StoreU(vdu, d, du + i);
  }
  if (i < n) {
    const size_t rem = static_cast<size_t>(n - i);
    const size_t bytes = rem * sizeof(float);
    HWY_ALIGN float gb[kSwigluMaxLanes] = {};
    HWY_ALIGN float ub[kSwigluMaxLanes] = {};
    HWY_ALIGN float db[kSwigluMaxLanes] = {};
    std::memcpy(gb, g + i, bytes);
    std::memcpy(ub, u + i, bytes);
    std::memcpy(db, dact + i, bytes);
    SwigluBackwardVec(d, hn::Load(d, gb), hn::Load(d, ub), hn::Load(d, db), va, vdg, vdu);
    hn::Store(va, d, gb);
    hn::Store(vdg, d, ub);
    hn::Store(vdu, d, db);
    if (act != nullptr) std::memcpy(act + i, gb, bytes);
    std::memcpy(dg + i, ub, bytes);
    std::memcpy(du + i, db, bytes);
  }
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace moe::kernels
HWY_AFTER_NAMESPACE();

#endif  // MOE_KERNELS_SWIGLU_INL_H_ include guard
