// SwigluForward / SwigluBackward (swiglu-inl.h) on every compiled Highway target, against a
// double-precision reference written here (itself checked by central differences): counts
// 0..2N+3 around the vector size plus odd large ones, misaligned pointers, special values
// (huge, tiny, denormal, +-inf, NaN), act == nullptr, in-place calls, and position
// independence: an element's bits do not depend on n, its position or its batch-mates.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/swiglu_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/tests/hwy_gtest.h"
#include "kernels/swiglu-inl.h"

#ifndef MOE_TESTS_KERNELS_SWIGLU_TEST_HELPERS_
#define MOE_TESTS_KERNELS_SWIGLU_TEST_HELPERS_
namespace moe::kernels::swiglu_test {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kMax = std::numeric_limits<float>::max();
constexpr float kDenorm = std::numeric_limits<float>::denorm_min();

// Float results: exp (~1 ulp) and a handful of roundings, i.e. well under 1e-6 relative. The
// floor covers silu(g) and dsilu/dg in or below the denormal range (g below ~-85, where both
// are under 3e-37), which the float kernel may round to few bits or to zero: it is 1e-36 times
// the factor (u, dact or both) that multiplies them.
constexpr double kRel = 4e-6;
constexpr double kFloor = 1e-36;

// dL/dg, dL/du and act in double, with s = sigmoid(g) and 1 - s = sigmoid(-g) evaluated
// separately (no cancellation). Infinite g takes the limits: silu(+inf) = +inf, silu(-inf) = 0,
// dsilu/dg = 1 at +inf and 0 at -inf.
struct RefOut {
  double act, dg, du;
  double dg_mag;  // |dact u| s (1 + |g| (1 - s)): the size of dg's terms, its error scale
};

inline double RefSilu(double g) { return g / (1.0 + std::exp(-g)); }

inline RefOut Ref(float gf, float uf, float dactf) {
  const double g = gf, u = uf, dact = dactf;
  double s, oms, silu, dsilu, dmag;
  if (std::isnan(g)) {
    s = oms = silu = dsilu = dmag = std::nan("");
  } else if (std::isinf(g)) {
    s = g > 0 ? 1.0 : 0.0;
    silu = g > 0 ? g : 0.0;
    dsilu = dmag = s;
  } else {
    s = 1.0 / (1.0 + std::exp(-g));
    oms = 1.0 / (1.0 + std::exp(g));
    silu = g * s;
    dsilu = s * (1.0 + g * oms);
    dmag = s * (1.0 + std::abs(g) * oms);
  }
  return {silu * u, dact * u * dsilu, dact * silu, std::abs(dact * u) * dmag};
}

inline bool SameBits(float a, float b) {
  uint32_t x, y;
  std::memcpy(&x, &a, 4);
  std::memcpy(&y, &b, 4);
  return x == y;
}

// got within the tolerance of want relative to mag (floor scaled by floor_scale); NaN and inf
// must match exactly, and a want beyond the float range must come out as inf of its sign.
inline ::testing::AssertionResult Near(float got, double want, double mag, double floor_scale) {
  if (std::isnan(want)) {
    if (std::isnan(got)) return ::testing::AssertionSuccess();
  } else if (std::abs(want) > kMax) {
    if (std::isinf(got) && std::signbit(got) == std::signbit(want)) {
      return ::testing::AssertionSuccess();
    }
  } else if (std::abs(got - want) <= kRel * std::max(std::abs(mag), 1e-30) + kFloor * std::abs(floor_scale)) {
    return ::testing::AssertionSuccess();
  }
  return ::testing::AssertionFailure() << "got " << got << " want " << want << " (scale "
                                       << mag << ")";
}

inline std::vector<int64_t> Counts(size_t N) {
  std::vector<int64_t> c;
  for (int64_t n = 0; n <= static_cast<int64_t>(2 * N + 3); ++n) c.push_back(n);
  for (int64_t n : {31, 64, 100, 257, 1000, 4097}) c.push_back(n);
  return c;
}

// n floats starting `offset` floats into a fresh buffer (misalignment), plus one guard float.
struct Buf {
  std::vector<float> storage;
  float* p;
  Buf(int64_t n, size_t offset, float fill = 0.0f)
      : storage(static_cast<size_t>(n) + offset + 1, fill), p(storage.data() + offset) {}
};

inline void Fill(std::mt19937& rng, float* p, int64_t n, float lo, float hi) {
  std::uniform_real_distribution<float> dist(lo, hi);
  for (int64_t i = 0; i < n; ++i) p[i] = dist(rng);
}

inline std::vector<float> SpecialG() {
  std::vector<float> v = {0.0f, -0.0f, kDenorm, -kDenorm, 1e-30f, -1e-30f, kNaN};
  for (float m : {0.5f, 1.0f, 1.2784645f, 5.0f, 17.0f, 20.0f, 40.0f, 80.0f, 85.0f, 87.5f, 88.5f,
                  88.8f, 89.0f, 95.0f, 100.0f, 103.9f, 104.5f, 150.0f, 200.0f, 1e4f, 1e30f,
                  1e38f, kMax, kInf}) {
    v.push_back(m);
    v.push_back(-m);
  }
  return v;
}

}  // namespace moe::kernels::swiglu_test
#endif  // MOE_TESTS_KERNELS_SWIGLU_TEST_HELPERS_

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {
namespace {

using namespace swiglu_test;  // NOLINT(build/namespaces): test helpers

size_t FloatLanes() { return hwy::HWY_NAMESPACE::Lanes(hwy::HWY_NAMESPACE::ScalableTag<float>()); }

// Checks act / dg / du of n elements against Ref; `what` names the case.
void CheckAll(const float* g, const float* u, const float* dact, const float* act,
              const float* dg, const float* du, int64_t n, const char* what) {
  for (int64_t i = 0; i < n; ++i) {
    const float d = dact ? dact[i] : 0.0f;
    const RefOut r = Ref(g[i], u[i], d);
    if (act) {
      ASSERT_TRUE(Near(act[i], r.act, r.act, u[i]))
          << what << " act n=" << n << " i=" << i << " g=" << g[i] << " u=" << u[i];
    }
    if (dg) {
      ASSERT_TRUE(Near(dg[i], r.dg, r.dg_mag, d * u[i]))
          << what << " dg n=" << n << " i=" << i << " g=" << g[i] << " u=" << u[i] << " dact=" << d;
    }
    if (du) {
      ASSERT_TRUE(Near(du[i], r.du, r.du, d))
          << what << " du n=" << n << " i=" << i << " g=" << g[i] << " dact=" << d;
    }
  }
}

void TestRandom() {
  std::mt19937 rng(11);
  const float kGuard = 12345.0f;
  for (int64_t n : Counts(FloatLanes())) {
    for (size_t off = 0; off < 4; ++off) {
      Buf g(n, off), u(n, 3 - off), dact(n, (off + 1) % 4);
      Buf act(n, (off + 2) % 4, kGuard), act2(n, off, kGuard), dg(n, 3 - off, kGuard),
          du(n, (off + 3) % 4, kGuard), dg2(n, off, kGuard), du2(n, off, kGuard);
      Fill(rng, g.p, n, -20.0f, 20.0f);
      Fill(rng, u.p, n, -3.0f, 3.0f);
      Fill(rng, dact.p, n, -2.0f, 2.0f);
      SwigluForward(g.p, u.p, act.p, n);
      CheckAll(g.p, u.p, nullptr, act.p, nullptr, nullptr, n, "forward");
      ASSERT_EQ(act.p[n], kGuard) << "forward wrote past n=" << n;

      SwigluBackward(g.p, u.p, dact.p, act2.p, dg.p, du.p, n);
      CheckAll(g.p, u.p, dact.p, act2.p, dg.p, du.p, n, "backward");
      ASSERT_EQ(act2.p[n], kGuard) << "n=" << n;
      ASSERT_EQ(dg.p[n], kGuard) << "n=" << n;
      ASSERT_EQ(du.p[n], kGuard) << "n=" << n;
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_TRUE(SameBits(act2.p[i], act.p[i])) << "backward act != forward act, i=" << i;
      }

      // act == nullptr: nothing else changes.
      SwigluBackward(g.p, u.p, dact.p, nullptr, dg2.p, du2.p, n);
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_TRUE(SameBits(dg2.p[i], dg.p[i])) << "act=nullptr dg, n=" << n << " i=" << i;
        ASSERT_TRUE(SameBits(du2.p[i], du.p[i])) << "act=nullptr du, n=" << n << " i=" << i;
      }
      ASSERT_EQ(dg2.p[n], kGuard);
      ASSERT_EQ(du2.p[n], kGuard);
    }
  }
}

// Every special g against u / dact of both signs (including 0), packed into one array so they
// land both in full vectors and in the tail.
void TestSpecialValues() {
  std::vector<float> g, u, dact;
  for (float gv : SpecialG()) {
    for (float uv : {1.0f, -2.5f, 0.0f, 1000.0f}) {
      for (float dv : {1.0f, -0.75f}) {
        g.push_back(gv);
        u.push_back(uv);
        dact.push_back(dv);
      }
    }
  }
  for (size_t start : {size_t{0}, size_t{3}}) {
    const int64_t n = static_cast<int64_t>(g.size() - start);
    std::vector<float> act(n), act2(n), dg(n), du(n);
    SwigluForward(g.data() + start, u.data() + start, act.data(), n);
    SwigluBackward(g.data() + start, u.data() + start, dact.data() + start, act2.data(),
                   dg.data(), du.data(), n);
    CheckAll(g.data() + start, u.data() + start, dact.data() + start, act.data(), dg.data(),
             du.data(), n, "special");
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_TRUE(SameBits(act2[i], act[i])) << "i=" << i;
    }
  }
  // Explicit saturation facts (also implied by the reference check above).
  const float gs[] = {kInf, -kInf, 1e30f, -1e30f, 100.0f, -100.0f};
  const float us[] = {2.0f, 2.0f, 1.0f, 1.0f, 1.0f, 1.0f};
  const float ds[] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
  float act[6], dg[6], du[6];
  SwigluBackward(gs, us, ds, act, dg, du, 6);
  EXPECT_EQ(act[0], kInf);
  EXPECT_EQ(dg[0], 2.0f);  // dsilu/dg -> 1
  EXPECT_EQ(du[0], kInf);
  EXPECT_EQ(act[1], 0.0f);
  EXPECT_EQ(dg[1], 0.0f);
  EXPECT_EQ(du[1], 0.0f);
  EXPECT_EQ(act[2], 1e30f);
  EXPECT_EQ(dg[2], 1.0f);
  EXPECT_EQ(act[3], 0.0f);
  EXPECT_EQ(dg[3], 0.0f);
  EXPECT_EQ(act[4], 100.0f);
  EXPECT_EQ(dg[4], 1.0f);
  for (int i = 0; i < 6; ++i) {
    EXPECT_FALSE(std::isnan(act[i]) || std::isnan(dg[i]) || std::isnan(du[i])) << "i=" << i;
  }
}

// Outputs written over inputs give the same bits as separate outputs.
void TestInPlace() {
  std::mt19937 rng(12);
  for (int64_t n : Counts(FloatLanes())) {
    std::vector<float> g(n), u(n), dact(n);
    Fill(rng, g.data(), n, -20.0f, 20.0f);
    Fill(rng, u.data(), n, -3.0f, 3.0f);
    Fill(rng, dact.data(), n, -2.0f, 2.0f);
    std::vector<float> act(n), dg(n), du(n);
    SwigluForward(g.data(), u.data(), act.data(), n);
    SwigluBackward(g.data(), u.data(), dact.data(), nullptr, dg.data(), du.data(), n);

    std::vector<float> x = g;
    SwigluForward(x.data(), u.data(), x.data(), n);  // act over g
    for (int64_t i = 0; i < n; ++i) ASSERT_TRUE(SameBits(x[i], act[i])) << "act=g i=" << i;
    x = u;
    SwigluForward(g.data(), x.data(), x.data(), n);  // act over u
    for (int64_t i = 0; i < n; ++i) ASSERT_TRUE(SameBits(x[i], act[i])) << "act=u i=" << i;

    // dg over g, du over u, act over dact.
    std::vector<float> g2 = g, u2 = u, d2 = dact;
    SwigluBackward(g2.data(), u2.data(), d2.data(), d2.data(), g2.data(), u2.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_TRUE(SameBits(g2[i], dg[i])) << "dg=g i=" << i;
      ASSERT_TRUE(SameBits(u2[i], du[i])) << "du=u i=" << i;
      ASSERT_TRUE(SameBits(d2[i], act[i])) << "act=dact i=" << i;
    }
    // du over g, dg over dact.
    g2 = g;
    d2 = dact;
    SwigluBackward(g2.data(), u.data(), d2.data(), nullptr, d2.data(), g2.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_TRUE(SameBits(d2[i], dg[i])) << "dg=dact i=" << i;
      ASSERT_TRUE(SameBits(g2[i], du[i])) << "du=g i=" << i;
    }
  }
}

// An element computed alone (n = 1), inside long arrays at many positions (in full vectors and
// in the tail, at different misalignments) and among random batch-mates: bitwise identical.
void TestPositionIndependence() {
  std::mt19937 rng(13);
  const int64_t N = static_cast<int64_t>(FloatLanes());
  std::vector<float> probes = SpecialG();
  std::uniform_real_distribution<float> dist(-20.0f, 20.0f);
  for (int k = 0; k < 40; ++k) probes.push_back(dist(rng));
  const float pu = -1.375f, pd = 0.8125f;  // the probe's u and dact

  for (float pg : probes) {
    float a1, a2, dg1, du1;
    SwigluForward(&pg, &pu, &a1, 1);
    SwigluBackward(&pg, &pu, &pd, &a2, &dg1, &du1, 1);
    ASSERT_TRUE(SameBits(a1, a2)) << "g=" << pg;
    for (int64_t len : {N - 1, N, N + 1, 2 * N + 3, int64_t{1000}}) {
      if (len <= 0) continue;
      std::vector<int64_t> positions = {0, 1, N - 1, N, N + 1, len / 2, len - 2, len - 1};
      for (int64_t p : positions) {
        if (p < 0 || p >= len) continue;
        const size_t off = static_cast<size_t>(p % 3);
        Buf g(len, off), u(len, 2 - off), dact(len, off), act(len, off), act2(len, 1), dg(len, 2),
            du(len, 0);
        Fill(rng, g.p, len, -30.0f, 30.0f);
        Fill(rng, u.p, len, -3.0f, 3.0f);
        Fill(rng, dact.p, len, -2.0f, 2.0f);
        g.p[p] = pg;
        u.p[p] = pu;
        dact.p[p] = pd;
        SwigluForward(g.p, u.p, act.p, len);
        SwigluBackward(g.p, u.p, dact.p, act2.p, dg.p, du.p, len);
        ASSERT_TRUE(SameBits(act.p[p], a1)) << "fwd g=" << pg << " len=" << len << " p=" << p;
        ASSERT_TRUE(SameBits(act2.p[p], a1)) << "bwd act g=" << pg << " len=" << len << " p=" << p;
        ASSERT_TRUE(SameBits(dg.p[p], dg1)) << "dg g=" << pg << " len=" << len << " p=" << p;
        ASSERT_TRUE(SameBits(du.p[p], du1)) << "du g=" << pg << " len=" << len << " p=" << p;
      }
    }
  }
}

}  // namespace
// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace moe::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "kernels/swiglu.h"

namespace moe::kernels {
HWY_BEFORE_TEST(SwigluTest);
HWY_EXPORT_AND_TEST_P(SwigluTest, TestRandom);
HWY_EXPORT_AND_TEST_P(SwigluTest, TestSpecialValues);
HWY_EXPORT_AND_TEST_P(SwigluTest, TestInPlace);
HWY_EXPORT_AND_TEST_P(SwigluTest, TestPositionIndependence);

// The test's double reference: its dg / du agree with central differences of act = silu(g) u.
TEST(SwigluReference, MatchesCentralDifferences) {
  using swiglu_test::Ref;
  using swiglu_test::RefSilu;
  for (double g = -30.0; g <= 30.0; g += 0.37) {
    const float gf = static_cast<float>(g);
    const double gd = gf, h = 1e-5;
    const double fd = (RefSilu(gd + h) - RefSilu(gd - h)) / (2 * h);
    const swiglu_test::RefOut r = Ref(gf, 1.5f, 0.5f);
    EXPECT_NEAR(r.dg, 0.5 * 1.5 * fd, 1e-9) << "g=" << g;
    EXPECT_NEAR(r.du, 0.5 * RefSilu(gd), 1e-12) << "g=" << g;
    EXPECT_NEAR(r.act, 1.5 * RefSilu(gd), 1e-12) << "g=" << g;
  }
}

// The dispatched entry points (best target) match the reference too.
TEST(SwigluDispatch, MatchesReference) {
  std::mt19937 rng(14);
  const int64_t n = 1001;
  std::vector<float> g(n), u(n), dact(n), act(n), act2(n), dg(n), du(n);
  swiglu_test::Fill(rng, g.data(), n, -20.0f, 20.0f);
  swiglu_test::Fill(rng, u.data(), n, -3.0f, 3.0f);
  swiglu_test::Fill(rng, dact.data(), n, -2.0f, 2.0f);
  SwigluForward(g.data(), u.data(), act.data(), n);
  SwigluBackward(g.data(), u.data(), dact.data(), act2.data(), dg.data(), du.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    const swiglu_test::RefOut r = swiglu_test::Ref(g[i], u[i], dact[i]);
    ASSERT_TRUE(swiglu_test::Near(act[i], r.act, r.act, u[i])) << "i=" << i;
    ASSERT_TRUE(swiglu_test::SameBits(act2[i], act[i])) << "i=" << i;
    ASSERT_TRUE(swiglu_test::Near(dg[i], r.dg, r.dg_mag, dact[i] * u[i])) << "i=" << i;
    ASSERT_TRUE(swiglu_test::Near(du[i], r.du, r.du, dact[i])) << "i=" << i;
  }
}
}  // namespace moe::kernels
#endif  // HWY_ONCE
