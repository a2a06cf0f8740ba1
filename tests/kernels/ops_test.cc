// Vector and element-wise kernels (ops-inl.h) against the double references of
// kernels/ref/ops_ref.h, on every compiled Highway target: counts 0..2N+3 around the vector
// size plus odd large ones, pointers misaligned by 0..3 floats, aliasing where allowed.
// Tolerances are derived from the data and the operation's rounding error.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/ops_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/tests/hwy_gtest.h"
#include "kernels/ops-inl.h"
#include "kernels/ref/ops_ref.h"

#ifndef MOE_TESTS_KERNELS_OPS_TEST_HELPERS_
#define MOE_TESTS_KERNELS_OPS_TEST_HELPERS_
namespace moe::kernels::test {

constexpr double kEpsF = std::numeric_limits<float>::epsilon();

// Counts worth testing for a vector of N floats: every count up to 2N+3, then odd large ones.
inline std::vector<int64_t> Counts(size_t N) {
  std::vector<int64_t> c;
  for (int64_t n = 0; n <= static_cast<int64_t>(2 * N + 3); ++n) c.push_back(n);
  for (int64_t n : {31, 64, 100, 257, 1000, 4097}) c.push_back(n);
  return c;
}

// n floats uniform in [lo, hi) starting `offset` floats into a fresh buffer (misalignment).
struct Buf {
  std::vector<float> storage;
  float* p;
  Buf(int64_t n, size_t offset) : storage(static_cast<size_t>(n) + offset + 1), p(storage.data() + offset) {}
};

inline void Fill(std::mt19937& rng, float* p, int64_t n, float lo, float hi) {
  std::uniform_real_distribution<float> u(lo, hi);
  for (int64_t i = 0; i < n; ++i) p[i] = u(rng);
}

}  // namespace moe::kernels::test
#endif  // MOE_TESTS_KERNELS_OPS_TEST_HELPERS_

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {
namespace {

using test::Buf;
using test::Counts;
using test::Fill;
using test::kEpsF;

size_t FloatLanes() { return hwy::HWY_NAMESPACE::Lanes(hwy::HWY_NAMESPACE::ScalableTag<float>()); }

void TestDotF32() {
  std::mt19937 rng(1);
  const size_t N = FloatLanes();
  for (int64_t n : Counts(N)) {
    for (size_t off = 0; off < 4; ++off) {
      Buf a(n, off), b(n, 3 - off);
      Fill(rng, a.p, n, -1.0f, 1.0f);
      Fill(rng, b.p, n, -2.0f, 2.0f);
      const double want = ref::Dot<double>(a.p, b.p, n);
      // Each lane sums about n/N products, then lanes are combined.
      const double tol = (static_cast<double>(n) / N + 16) * kEpsF * ref::AbsDot<double>(a.p, b.p, n);
      EXPECT_NEAR(DotF32(a.p, b.p, n), want, tol) << "n=" << n << " off=" << off;
    }
  }
}

void TestAxpyScaleAdd() {
  std::mt19937 rng(2);
  for (int64_t n : Counts(FloatLanes())) {
    for (size_t off = 0; off < 4; ++off) {
      Buf x(n, off), y(n, (off + 1) % 4), b(n, (off + 2) % 4);
      Fill(rng, x.p, n, -1.0f, 1.0f);
      Fill(rng, y.p, n, -1.0f, 1.0f);
      Fill(rng, b.p, n, -1.0f, 1.0f);
      const float a = 0.37f;
      // Axpy: at most two roundings (fused or not) of a*x + y.
      std::vector<double> want(y.p, y.p + n);
      ref::Axpy<double>(a, x.p, want.data(), n);
      std::vector<float> y0(y.p, y.p + n);
      Axpy(a, x.p, y.p, n);
      for (int64_t i = 0; i < n; ++i) {
        const double tol = 2 * kEpsF * (std::abs(a * x.p[i]) + std::abs(y0[i]));
        ASSERT_NEAR(y.p[i], want[i], tol) << "Axpy n=" << n << " i=" << i;
      }
      // Scale: one rounding.
      std::vector<double> ws(y.p, y.p + n);
      ref::Scale<double>(-1.75, ws.data(), n);
      Scale(-1.75f, y.p, n);
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_NEAR(y.p[i], ws[i], kEpsF * std::abs(ws[i])) << "Scale n=" << n << " i=" << i;
      }
      // Add, out of place and aliased with either input.
      std::vector<double> wa(n);
      ref::Add<double>(x.p, b.p, wa.data(), n);
      Add(x.p, b.p, y.p, n);
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_NEAR(y.p[i], wa[i], kEpsF * std::abs(wa[i])) << "Add n=" << n << " i=" << i;
      }
      std::vector<float> x0(x.p, x.p + n);
      Add(x.p, b.p, x.p, n);  // y aliases a
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(x.p[i], y.p[i]) << "Add alias a, i=" << i;
      std::copy(x0.begin(), x0.end(), x.p);
      Add(x.p, b.p, b.p, n);  // y aliases b
      for (int64_t i = 0; i < n; ++i) ASSERT_EQ(b.p[i], y.p[i]) << "Add alias b, i=" << i;
    }
  }
}

void TestRmsNorm() {
  std::mt19937 rng(3);
  for (int64_t n : Counts(FloatLanes())) {
    if (n == 0) continue;
    for (size_t off = 0; off < 4; ++off) {
      for (bool with_w : {false, true}) {
        for (bool in_place : {false, true}) {
          Buf x(n, off), w(n, 3 - off), out(n, (off + 2) % 4);
          Fill(rng, x.p, n, -3.0f, 3.0f);
          Fill(rng, w.p, n, 0.5f, 1.5f);
          const float eps = 1e-5f;
          std::vector<double> want(n);
          ref::RmsNorm<double>(x.p, with_w ? w.p : nullptr, n, eps, want.data());
          float* dst = in_place ? x.p : out.p;
          RmsNorm(x.p, with_w ? w.p : nullptr, n, eps, dst);
          // Roundings: mean, +eps, sqrt, 1/, x*scale, *w: a few eps relative per element.
          for (int64_t i = 0; i < n; ++i) {
            ASSERT_NEAR(dst[i], want[i], 8 * kEpsF * std::abs(want[i]) + 1e-30)
                << "n=" << n << " i=" << i << " w=" << with_w << " in_place=" << in_place;
          }
        }
      }
    }
  }
  // Zero input stays finite thanks to eps.
  std::vector<float> z(17, 0.0f), out(17, 1.0f);
  RmsNorm(z.data(), nullptr, 17, 1e-6f, out.data());
  for (float v : out) EXPECT_EQ(v, 0.0f);
}

void TestRope() {
  std::mt19937 rng(4);
  struct Shape {
    int n_heads, head_dim, n_rot;
  };
  for (const Shape s : {Shape{1, 2, 2}, Shape{3, 64, 64}, Shape{2, 128, 128}, Shape{4, 80, 32},
                        Shape{1, 6, 4}}) {
    for (bool neox : {false, true}) {
      for (int pos : {0, 1, 7, 300, 4095}) {
        for (float base : {10000.0f, 1000000.0f}) {
          const int64_t n = static_cast<int64_t>(s.n_heads) * s.head_dim;
          std::vector<float> x(n);
          Fill(rng, x.data(), n, -2.0f, 2.0f);
          std::vector<double> want(x.begin(), x.end());
          ref::Rope<double>(want.data(), s.n_heads, s.head_dim, s.n_rot, pos, base, neox);
          std::vector<float> got = x;
          Rope(got.data(), s.n_heads, s.head_dim, s.n_rot, pos, base, neox);
          // The kernel's float angle theta_i = pos * scale^i is off by about (2i+3) eps
          // relative (the recurrence and powf); the output error is that times |x0|+|x1|.
          const int half = s.n_rot / 2;
          for (int h = 0; h < s.n_heads; ++h) {
            for (int d = 0; d < s.head_dim; ++d) {
              const int64_t i = static_cast<int64_t>(h) * s.head_dim + d;
              if (d >= s.n_rot) {
                ASSERT_EQ(got[i], x[i]) << "dims past n_rot must not change";
                continue;
              }
              const int k = neox ? d % half : d / 2;  // pair index
              const int i0 = neox ? k : 2 * k, i1 = neox ? k + half : 2 * k + 1;
              const double mag = std::abs(x[h * s.head_dim + i0]) + std::abs(x[h * s.head_dim + i1]);
              const double theta = pos * std::pow(static_cast<double>(base), -2.0 * k / s.n_rot);
              const double tol = mag * (theta * (2 * k + 3) + 4) * kEpsF;
              ASSERT_NEAR(got[i], want[i], tol) << "pos=" << pos << " neox=" << neox << " d=" << d;
            }
          }
        }
      }
    }
  }
}

// Scaled RoPE (linear and YaRN, as llama.cpp sets them up for a 4x / 40x context extension)
// against the double reference.
void TestRopeScaling() {
  std::mt19937 rng(14);
  struct Case {
    float freq_scale, ext_factor, attn_factor, corr0, corr1;
  };
  for (const Case cs : {Case{0.25f, 0.0f, 1.0f, 0, 0}, Case{1.0f / 40, 1.0f, 0.7305f, 10, 23},
                        Case{1.0f / 4, 1.0f, 1.0f, 0, 31}, Case{0.5f, 1.0f, 1.2f, 3, 3}}) {
    for (bool neox : {false, true}) {
      for (int pos : {0, 5, 1000}) {
        const int n_heads = 3, head_dim = 64, n_rot = 64;
        const float base = 10000.0f;
        std::vector<float> x(n_heads * head_dim);
        Fill(rng, x.data(), static_cast<int64_t>(x.size()), -2.0f, 2.0f);
        std::vector<double> want(x.begin(), x.end());
        ref::Rope<double>(want.data(), n_heads, head_dim, n_rot, pos, base, neox, cs.freq_scale, cs.ext_factor,
                          cs.attn_factor, cs.corr0, cs.corr1);
        RopeScaling sc;
        sc.freq_scale = cs.freq_scale;
        sc.ext_factor = cs.ext_factor;
        sc.attn_factor = cs.attn_factor;
        sc.corr_dims[0] = cs.corr0;
        sc.corr_dims[1] = cs.corr1;
        std::vector<float> got = x;
        Rope(got.data(), n_heads, head_dim, n_rot, pos, base, neox, sc);  // the dispatched entry
        for (size_t i = 0; i < x.size(); ++i)  // angles up to ~1000 rad: ~1e-4 absolute in float
          ASSERT_NEAR(got[i], want[i], 2e-4 * pos + 1e-5) << "pos=" << pos << " i=" << i;
      }
    }
  }
}

void TestSoftmax() {
  std::mt19937 rng(5);
  for (int64_t n : Counts(FloatLanes())) {
    if (n == 0) continue;
    for (float spread : {1.0f, 30.0f}) {
      Buf x(n, n % 4);
      Fill(rng, x.p, n, -spread, spread);
      if (n > 2) x.p[n / 2] = -std::numeric_limits<float>::infinity();  // masked entry
      std::vector<double> want(n);
      ref::Softmax<double>(x.p, want.data(), n);
      std::vector<float> x0(x.p, x.p + n);
      Softmax(x.p, n);
      const double max = *std::max_element(x0.begin(), x0.end());
      double sum = 0;
      for (int64_t i = 0; i < n; ++i) {
        // x - max rounds by eps*|x - max|, which expf turns into a relative error.
        const double tol =
            std::isinf(x0[i]) ? 0.0 : want[i] * (std::abs(x0[i] - max) + 8) * kEpsF + 1e-45;
        ASSERT_NEAR(x.p[i], want[i], tol) << "n=" << n << " i=" << i;
        sum += x.p[i];
      }
      EXPECT_NEAR(sum, 1.0, (n + 8) * kEpsF);
    }
  }
}

// A cache's rows (n rows, `stride` elements apart) laid out as KvRows r says: row j at
// r.Offset(j); the gaps between pages hold a poison value.
template <class T>
std::vector<T> PageRows(const std::vector<T>& rows, int64_t n, const KvRows& r, T poison) {
  const int64_t size = n == 0 ? 0 : r.Offset(n - 1) + r.stride;
  std::vector<T> out(static_cast<size_t>(size), poison);
  for (int64_t j = 0; j < n; ++j)
    std::copy(rows.begin() + j * r.stride, rows.begin() + (j + 1) * r.stride, out.begin() + r.Offset(j));
  return out;
}

void TestAttend() {
  std::mt19937 rng(8);
  for (DType kv : {DType::kF32, DType::kF16}) {
  for (int64_t Dk : {1, 7, 16, 64, 72, 128, 200, 576}) {
    for (int64_t n : {1, 2, 5, 33, 200}) {
      for (int rows : {1, 2, 3, 8}) {
        // Dv < Dk with V inside K's rows (MLA) for the widest case; else separate V rows.
        const bool alias = Dk == 576;
        const int64_t Dv = alias ? 512 : Dk;
        const int64_t ks = Dk + 3, vs = alias ? ks : Dv + 5;  // rows further apart than D, unaligned
        const int64_t qs = Dk + 1, os = Dv + 2;
        std::vector<float> q(rows * qs), K(n * ks), Vs(n * vs), s(rows * kAttendKeys);
        Fill(rng, q.data(), rows * qs, -1.0f, 1.0f);
        Fill(rng, K.data(), n * ks, -1.0f, 1.0f);
        Fill(rng, Vs.data(), n * vs, -1.0f, 1.0f);
        // An F16 cache holds the rows rounded to half precision: the reference uses those values.
        std::vector<uint16_t> K16(K.size()), V16(Vs.size());
        if (kv == DType::kF16) {
          for (size_t i = 0; i < K.size(); ++i) K[i] = F16ToF32(K16[i] = F32ToF16(K[i]));
          for (size_t i = 0; i < Vs.size(); ++i) Vs[i] = F16ToF32(V16[i] = F32ToF16(Vs[i]));
        }
        const float* V = alias ? K.data() : Vs.data();
        const float scale = 1.0f / std::sqrt(static_cast<float>(Dk));
        // One run of rows, and pages of 16 and 32 rows with gaps between them: the same results.
        std::vector<float> first;
        for (int64_t page : {0, 16, 32}) {
          const KvRows kl{nullptr, ks, page, page * ks + 37}, vl{nullptr, vs, page, page * vs + 11};
          const uint16_t p16 = F32ToF16(1e4f);
          std::vector<float> Kp32 = PageRows(K, n, kl, 1e30f), Vp32 = PageRows(Vs, n, vl, 1e30f);
          std::vector<uint16_t> Kp16 = PageRows(K16, n, kl, p16), Vp16 = PageRows(V16, n, vl, p16);
          const bool f16 = kv == DType::kF16;
          KvRows Kr = kl, Vr = alias ? kl : vl;
          Kr.base = f16 ? static_cast<const void*>(Kp16.data()) : Kp32.data();
          Vr.base = alias ? Kr.base : f16 ? static_cast<const void*>(Vp16.data()) : Vp32.data();
          std::vector<float> out(rows * os, -7.0f);
          HWY_NAMESPACE::Attend(AttendRows{q.data(), qs, out.data(), os, rows}, kv, Kr, Dk, Vr, Dv, n, scale, s.data());
          if (page == 0) {
            first = out;
          } else {
            for (size_t i = 0; i < out.size(); ++i)
              ASSERT_EQ(out[i], first[i]) << DTypeName(kv) << " Dk=" << Dk << " n=" << n << " page=" << page << " i=" << i;
            continue;
          }
          for (int r = 0; r < rows; ++r) {
            // Double reference.
            const float* qr = q.data() + r * qs;
            std::vector<double> p(n);
            double max = -1e300, sum = 0;
            for (int64_t j = 0; j < n; ++j) {
              double d = 0;
              for (int64_t i = 0; i < Dk; ++i) d += double(qr[i]) * K[j * ks + i];
              p[j] = d * scale;
              max = std::max(max, p[j]);
            }
            for (double& v : p) sum += (v = std::exp(v - max));
            for (int64_t i = 0; i < Dv; ++i) {
              double want = 0;
              for (int64_t j = 0; j < n; ++j) want += p[j] / sum * V[j * vs + i];
              ASSERT_NEAR(out[r * os + i], want, (Dk + n + 8) * kEpsF)
                  << DTypeName(kv) << " Dk=" << Dk << " n=" << n << " r=" << r << " i=" << i;
            }
            for (int64_t i = Dv; i < os; ++i) ASSERT_EQ(out[r * os + i], -7.0f) << "wrote past Dv";
            // The row alone gives bitwise the same output (batch invariance rests on this).
            std::vector<float> s1(kAttendKeys), o1(Dv);
            HWY_NAMESPACE::Attend(AttendRows{qr, qs, o1.data(), Dv, 1}, kv, Kr, Dk, Vr, Dv, n, scale, s1.data());
            for (int64_t i = 0; i < Dv; ++i)
              ASSERT_EQ(o1[i], out[r * os + i]) << DTypeName(kv) << " Dk=" << Dk << " n=" << n << " r=" << r << " i=" << i;
          }
        }
      }
    }
  }
  }
}

void TestSiluMul() {
  std::mt19937 rng(6);
  for (int64_t n : Counts(FloatLanes())) {
    for (int alias = 0; alias < 3; ++alias) {
      Buf g(n, n % 4), u(n, (n + 1) % 4), out(n, 0);
      Fill(rng, g.p, n, -20.0f, 20.0f);
      Fill(rng, u.p, n, -2.0f, 2.0f);
      std::vector<double> want(n);
      ref::SiluMul<double>(g.p, u.p, want.data(), n);
      float* dst = alias == 0 ? out.p : alias == 1 ? g.p : u.p;
      SiluMul(g.p, u.p, dst, n);
      for (int64_t i = 0; i < n; ++i) {
        ASSERT_NEAR(dst[i], want[i], 8 * kEpsF * std::abs(want[i]) + 1e-37)
            << "n=" << n << " i=" << i << " alias=" << alias;
      }
    }
  }
}

void TestTopK() {
  std::mt19937 rng(7);
  for (int n : {1, 2, 3, 8, 60, 64, 128, 512}) {
    for (int k : {1, 2, 4, 6, 8, n}) {
      if (k > n) continue;
      for (int levels : {3, 1000000}) {  // few levels: many ties
        std::vector<float> x(n);
        std::uniform_int_distribution<int> u(0, levels - 1);
        for (float& v : x) v = static_cast<float>(u(rng)) * 0.25f - 1.0f;
        const std::vector<int> want = ref::TopK(x.data(), n, k);
        std::vector<int> got(k + 1, -7);
        TopK(x.data(), n, k, got.data());
        for (int j = 0; j < k; ++j) ASSERT_EQ(got[j], want[j]) << "n=" << n << " k=" << k << " j=" << j;
        ASSERT_EQ(got[k], -7) << "wrote past k";
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
#include "kernels/kernels.h"

namespace moe::kernels {
HWY_BEFORE_TEST(OpsTest);
HWY_EXPORT_AND_TEST_P(OpsTest, TestDotF32);
HWY_EXPORT_AND_TEST_P(OpsTest, TestAxpyScaleAdd);
HWY_EXPORT_AND_TEST_P(OpsTest, TestRmsNorm);
HWY_EXPORT_AND_TEST_P(OpsTest, TestRope);
HWY_EXPORT_AND_TEST_P(OpsTest, TestRopeScaling);
HWY_EXPORT_AND_TEST_P(OpsTest, TestSoftmax);
HWY_EXPORT_AND_TEST_P(OpsTest, TestSiluMul);
HWY_EXPORT_AND_TEST_P(OpsTest, TestAttend);
HWY_EXPORT_AND_TEST_P(OpsTest, TestTopK);

// The dispatched entry points reach the best target this CPU supports.
TEST(OpsDispatch, ActiveTargetIsBestSupported) {
  const int64_t supported = hwy::SupportedTargets() & HWY_TARGETS;
  const int64_t best = supported & -supported;  // lower bit = better target
  EXPECT_STREQ(ActiveTarget(), hwy::TargetName(best));
  std::vector<float> a(37, 1.5f), b(37, 2.0f);
  EXPECT_EQ(DotF32(a.data(), b.data(), 37), 3.0f * 37);
}
}  // namespace moe::kernels
#endif  // HWY_ONCE
