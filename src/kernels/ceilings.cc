// Dispatched probes of ceilings.h: one Highway body per target (this file includes itself).

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/ceilings.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"

#if HWY_TARGET == HWY_AVX3_DL && HWY_COMPILER_GCC_ACTUAL
#include <immintrin.h>
#endif

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

#include "kernels/vnni-inl.h"  // MOE_VNNI: Int8Probe's vpdpbusd

uint64_t ReadStream(const uint8_t* p, size_t n) {
  const hn::ScalableTag<uint64_t> d;
  const size_t N = hn::Lanes(d);
  const auto* w = reinterpret_cast<const uint64_t*>(p);
  const size_t words = n / 8;
  auto a0 = hn::Zero(d), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  size_t i = 0;
  for (; i + 8 * N <= words; i += 8 * N) {
    a0 = hn::Xor(a0, hn::Load(d, w + i));
    a1 = hn::Xor(a1, hn::Load(d, w + i + N));
    a2 = hn::Xor(a2, hn::Load(d, w + i + 2 * N));
    a3 = hn::Xor(a3, hn::Load(d, w + i + 3 * N));
    a4 = hn::Xor(a4, hn::Load(d, w + i + 4 * N));
    a5 = hn::Xor(a5, hn::Load(d, w + i + 5 * N));
    a6 = hn::Xor(a6, hn::Load(d, w + i + 6 * N));
    a7 = hn::Xor(a7, hn::Load(d, w + i + 7 * N));
  }
  uint64_t s = 0;
  for (; i < words; ++i) s ^= w[i];
  const auto all = hn::Xor(hn::Xor(hn::Xor(a0, a1), hn::Xor(a2, a3)),
                           hn::Xor(hn::Xor(a4, a5), hn::Xor(a6, a7)));
  HWY_ALIGN uint64_t lanes[hn::MaxLanes(d)];
  hn::Store(all, d, lanes);
  for (size_t k = 0; k < N; ++k) s ^= lanes[k];
  return s;
}

// 12 chains: enough to cover the FMA latency (4-5 cycles) on two FMA pipes. Each chain starts
// from its own value: chains that start equal compute equal values, and GCC merged them into one
// (until session 18 both probes timed a single chain, the instruction's latency, and reported 12
// times its rate: about 3x the real rate on a Zen 4 host, about 1.35x on a Zen 5 one).
double FmaProbe(int64_t iters) {
  const hn::ScalableTag<float> d;
  const auto start = [&](int i) { return hn::Set(d, 1.0f + 0.0625f * static_cast<float>(i)); };
  auto a0 = start(0), a1 = start(1), a2 = start(2), a3 = start(3), a4 = start(4), a5 = start(5);
  auto a6 = start(6), a7 = start(7), a8 = start(8), a9 = start(9), a10 = start(10), a11 = start(11);
  const auto x = hn::Set(d, 0.999f), y = hn::Set(d, 1e-3f);
  for (int64_t i = 0; i < iters; ++i) {
    a0 = hn::MulAdd(a0, x, y);
    a1 = hn::MulAdd(a1, x, y);
    a2 = hn::MulAdd(a2, x, y);
    a3 = hn::MulAdd(a3, x, y);
    a4 = hn::MulAdd(a4, x, y);
    a5 = hn::MulAdd(a5, x, y);
    a6 = hn::MulAdd(a6, x, y);
    a7 = hn::MulAdd(a7, x, y);
    a8 = hn::MulAdd(a8, x, y);
    a9 = hn::MulAdd(a9, x, y);
    a10 = hn::MulAdd(a10, x, y);
    a11 = hn::MulAdd(a11, x, y);
  }
  const auto s = hn::Add(hn::Add(hn::Add(hn::Add(a0, a1), hn::Add(a2, a3)), hn::Add(hn::Add(a4, a5), hn::Add(a6, a7))),
                         hn::Add(hn::Add(a8, a9), hn::Add(a10, a11)));
  volatile float sink = hn::GetLane(s);
  (void)sink;
  return 2.0 * 12.0 * static_cast<double>(hn::Lanes(d)) * static_cast<double>(iters);
}

double Int8Probe(int64_t iters) {
#if MOE_VNNI
  // Distinct starts (see FmaProbe), and each chain's own bytes as its signed operand, so no
  // product is loop-invariant.
  const auto start = [](int i) { return _mm512_set1_epi32(0x01020304 * (i + 1)); };
  __m512i a0 = start(0), a1 = start(1), a2 = start(2), a3 = start(3), a4 = start(4), a5 = start(5);
  __m512i a6 = start(6), a7 = start(7), a8 = start(8), a9 = start(9), a10 = start(10), a11 = start(11);
  const __m512i x = _mm512_set1_epi8(3);
  for (int64_t i = 0; i < iters; ++i) {  // (named registers: an array would live in memory)
    a0 = _mm512_dpbusd_epi32(a0, x, a0);
    a1 = _mm512_dpbusd_epi32(a1, x, a1);
    a2 = _mm512_dpbusd_epi32(a2, x, a2);
    a3 = _mm512_dpbusd_epi32(a3, x, a3);
    a4 = _mm512_dpbusd_epi32(a4, x, a4);
    a5 = _mm512_dpbusd_epi32(a5, x, a5);
    a6 = _mm512_dpbusd_epi32(a6, x, a6);
    a7 = _mm512_dpbusd_epi32(a7, x, a7);
    a8 = _mm512_dpbusd_epi32(a8, x, a8);
    a9 = _mm512_dpbusd_epi32(a9, x, a9);
    a10 = _mm512_dpbusd_epi32(a10, x, a10);
    a11 = _mm512_dpbusd_epi32(a11, x, a11);
  }
  const __m512i s = _mm512_add_epi32(
      _mm512_add_epi32(_mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3)),
                       _mm512_add_epi32(_mm512_add_epi32(a4, a5), _mm512_add_epi32(a6, a7))),
      _mm512_add_epi32(_mm512_add_epi32(a8, a9), _mm512_add_epi32(a10, a11)));
  volatile int sink = _mm512_reduce_add_epi32(s);
  (void)sink;
  return 2.0 * 12.0 * 64.0 * static_cast<double>(iters);
#else
  // int8 values widened to int16 (as the int16 kernels do), pairs multiplied and added
  // (ReorderWidenMulAccumulate: vpmaddwd on x86).
  const hn::ScalableTag<int16_t> d16;
  const hn::RepartitionToWide<decltype(d16)> d32;
  // Distinct starts and each chain's own bits as one factor (see above): a product of two
  // loop-invariant vectors would be hoisted, leaving only the adds to time.
  const auto start = [&](int i) { return hn::Set(d32, 0x00030002 * (i + 1)); };
  auto a0 = start(0), a1 = start(1), a2 = start(2), a3 = start(3), a4 = start(4), a5 = start(5);
  auto a6 = start(6), a7 = start(7), a8 = start(8), a9 = start(9), a10 = start(10), a11 = start(11);
  auto b0 = hn::Zero(d32), b1 = b0, b2 = b0, b3 = b0, b4 = b0, b5 = b0;
  auto b6 = b0, b7 = b0, b8 = b0, b9 = b0, b10 = b0, b11 = b0;
  const auto x = hn::Set(d16, 3);
  const auto mac = [&](hn::Vec<decltype(d32)> a, hn::Vec<decltype(d32)>& b) {
    return hn::ReorderWidenMulAccumulate(d32, x, hn::BitCast(d16, a), a, b);
  };
  for (int64_t i = 0; i < iters; ++i) {
    a0 = mac(a0, b0);
    a1 = mac(a1, b1);
    a2 = mac(a2, b2);
    a3 = mac(a3, b3);
    a4 = mac(a4, b4);
    a5 = mac(a5, b5);
    a6 = mac(a6, b6);
    a7 = mac(a7, b7);
    a8 = mac(a8, b8);
    a9 = mac(a9, b9);
    a10 = mac(a10, b10);
    a11 = mac(a11, b11);
  }
  auto s = hn::Add(hn::Add(hn::Add(hn::Add(a0, a1), hn::Add(a2, a3)), hn::Add(hn::Add(a4, a5), hn::Add(a6, a7))),
                   hn::Add(hn::Add(a8, a9), hn::Add(a10, a11)));
  s = hn::Add(s, hn::Add(hn::Add(hn::Add(hn::Add(b0, b1), hn::Add(b2, b3)), hn::Add(hn::Add(b4, b5), hn::Add(b6, b7))),
                         hn::Add(hn::Add(b8, b9), hn::Add(b10, b11))));
  volatile int32_t sink = hn::GetLane(s);
  (void)sink;
  return 2.0 * 12.0 * static_cast<double>(hn::Lanes(d16)) * static_cast<double>(iters);
#endif
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace moe::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "kernels/ceilings.h"

namespace moe::kernels {

HWY_EXPORT(ReadStream);
HWY_EXPORT(FmaProbe);
HWY_EXPORT(Int8Probe);

uint64_t ReadStream(const uint8_t* p, size_t n) { return HWY_DYNAMIC_DISPATCH(ReadStream)(p, n); }
double FmaProbe(int64_t iters) { return HWY_DYNAMIC_DISPATCH(FmaProbe)(iters); }
double Int8Probe(int64_t iters) { return HWY_DYNAMIC_DISPATCH(Int8Probe)(iters); }

}  // namespace moe::kernels
#endif  // HWY_ONCE
