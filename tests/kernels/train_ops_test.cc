// Training kernels (train_ops-inl.h) on every compiled Highway target against the scalar
// references of kernels/ref/train_ref.h run in double (counts 0..2N+3 and odd sizes, misaligned
// pointers, aliasing), and the references themselves against central differences in double.
// RoPE: the training tables rotate bit for bit as inference's kernels::Rope, and the inverse
// rotation is the transpose (the backward).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/train_ops_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/tests/hwy_gtest.h"
#include "kernels/train_ops-inl.h"

#ifndef MOE_TESTS_KERNELS_TRAIN_OPS_TEST_HELPERS_
#define MOE_TESTS_KERNELS_TRAIN_OPS_TEST_HELPERS_
#include "kernels/ref/train_ref.h"

namespace moe::kernels::train_test {

inline std::vector<float> Rand(std::mt19937& rng, size_t n, float lo, float hi) {
  std::uniform_real_distribution<float> u(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}
inline std::vector<double> ToD(const float* x, size_t n) { return std::vector<double>(x, x + n); }

// |a - b| <= tol * scale (float kernel vs double reference; scale from the data).
inline ::testing::AssertionResult Close(const float* a, const double* b, size_t n, double tol, double scale, const char* what) {
  for (size_t i = 0; i < n; ++i) {
    if (!(std::fabs(a[i] - b[i]) <= tol * scale)) {
      return ::testing::AssertionFailure() << what << "[" << i << "] = " << a[i] << ", reference " << b[i]
                                           << " (tolerance " << tol * scale << ")";
    }
  }
  return ::testing::AssertionSuccess();
}
inline double MaxAbs(const double* x, size_t n) {
  double m = 1e-30;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(x[i]));
  return m;
}

}  // namespace moe::kernels::train_test
#endif  // MOE_TESTS_KERNELS_TRAIN_OPS_TEST_HELPERS_

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {
namespace {

using namespace train_test;  // NOLINT(build/namespaces): test helpers

size_t FloatLanes() { return hwy::HWY_NAMESPACE::Lanes(hwy::HWY_NAMESPACE::ScalableTag<float>()); }

void TestRmsNorm() {
  std::mt19937 rng(1);
  const int64_t N = static_cast<int64_t>(FloatLanes());
  std::vector<int64_t> sizes;
  for (int64_t n = 1; n <= 2 * N + 3; ++n) sizes.push_back(n);
  for (int64_t n : {31, 64, 255, 1000}) sizes.push_back(n);
  for (int64_t n : sizes) {
    for (int off : {0, 1}) {
      std::vector<float> buf = Rand(rng, n + off, -2.f, 2.f), w = Rand(rng, n + off, 0.5f, 1.5f);
      std::vector<float> dy = Rand(rng, n + off, -1.f, 1.f);
      const float* x = buf.data() + off;
      std::vector<float> y(n + off), dx(n + off), dw(n + off, 0.25f);
      const float rstd = RmsNormTrain(x, w.data() + off, n, 1e-5f, y.data() + off);
      RmsNormBackward(x, w.data() + off, rstd, dy.data() + off, n, dx.data() + off, dw.data() + off);
      std::vector<double> xd = ToD(x, n), wd = ToD(w.data() + off, n), dyd = ToD(dy.data() + off, n);
      std::vector<double> yr(n), dxr(n), dwr(n, 0.25);
      const double rr = ref::RmsNormTrain(xd.data(), wd.data(), n, 1e-5, yr.data());
      ref::RmsNormBackward(xd.data(), wd.data(), rr, dyd.data(), n, dxr.data(), dwr.data());
      ASSERT_NEAR(rstd, rr, 1e-5 * rr) << "n=" << n;
      ASSERT_TRUE(Close(y.data() + off, yr.data(), n, 1e-5, MaxAbs(yr.data(), n), "y")) << "n=" << n;
      ASSERT_TRUE(Close(dx.data() + off, dxr.data(), n, 1e-5, MaxAbs(dxr.data(), n) + rr, "dx")) << "n=" << n;
      ASSERT_TRUE(Close(dw.data() + off, dwr.data(), n, 1e-5, MaxAbs(dwr.data(), n), "dw")) << "n=" << n;
      // Without a weight, in place (y aliases x, dx aliases dy).
      std::vector<float> xin(x, x + n), g(dy.data() + off, dy.data() + off + n);
      const float r2 = RmsNormTrain(xin.data(), nullptr, n, 1e-5f, xin.data());
      std::vector<float> xorig(x, x + n);
      RmsNormBackward(xorig.data(), nullptr, r2, g.data(), n, g.data(), nullptr);
      std::vector<double> yr2(n), dxr2(n);
      ref::RmsNormTrain(xd.data(), static_cast<const double*>(nullptr), n, 1e-5, yr2.data());
      ref::RmsNormBackward(xd.data(), static_cast<const double*>(nullptr), rr, dyd.data(), n, dxr2.data(),
                           static_cast<double*>(nullptr));
      ASSERT_TRUE(Close(xin.data(), yr2.data(), n, 1e-5, MaxAbs(yr2.data(), n), "y in place"));
      ASSERT_TRUE(Close(g.data(), dxr2.data(), n, 1e-5, MaxAbs(dxr2.data(), n) + rr, "dx in place"));
    }
  }
}

void TestAttention() {
  std::mt19937 rng(2);
  for (int L : {1, 2, 3, 7, 16, 33}) {
    for (int dh : {1, 4, 17, 64}) {
      const int ld = dh + 3;  // strided rows, as heads inside a [T][H*dh] matrix
      std::vector<float> q = Rand(rng, static_cast<size_t>(L) * ld + 1, -1.f, 1.f);
      std::vector<float> k = Rand(rng, static_cast<size_t>(L) * ld, -1.f, 1.f);
      std::vector<float> v = Rand(rng, static_cast<size_t>(L) * ld, -1.f, 1.f);
      std::vector<float> dout = Rand(rng, static_cast<size_t>(L) * ld, -1.f, 1.f);
      const float* qp = q.data() + 1;  // misaligned
      const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
      std::vector<float> probs(static_cast<size_t>(L) * L), out(static_cast<size_t>(L) * ld);
      CausalAttentionForward(L, dh, scale, qp, ld, k.data(), ld, v.data(), ld, probs.data(), out.data(), ld);
      std::vector<float> dq(static_cast<size_t>(L) * ld), dk(static_cast<size_t>(L) * ld, 0.5f),
          dv(static_cast<size_t>(L) * ld, -0.5f), scratch(static_cast<size_t>(L) * L);
      CausalAttentionBackward(L, dh, scale, qp, ld, k.data(), ld, v.data(), ld, probs.data(), dout.data(), ld,
                              dq.data(), ld, dk.data(), ld, dv.data(), ld, scratch.data());
      std::vector<double> qd = ToD(qp, static_cast<size_t>(L) * ld), kd = ToD(k.data(), k.size()),
                          vd = ToD(v.data(), v.size()), dod = ToD(dout.data(), dout.size());
      std::vector<double> pr(static_cast<size_t>(L) * L), outr(static_cast<size_t>(L) * ld);
      ref::CausalAttentionForward<double>(L, dh, scale, qd.data(), ld, kd.data(), ld, vd.data(), ld, pr.data(), outr.data(), ld);
      std::vector<double> dqr(static_cast<size_t>(L) * ld), dkr(static_cast<size_t>(L) * ld, 0.5),
          dvr(static_cast<size_t>(L) * ld, -0.5);
      ref::CausalAttentionBackward<double>(L, dh, scale, qd.data(), ld, kd.data(), ld, vd.data(), ld, pr.data(),
                                           dod.data(), ld, dqr.data(), ld, dkr.data(), ld, dvr.data(), ld);
      const double tol = 2e-6 * (L + dh);
      ASSERT_TRUE(Close(probs.data(), pr.data(), pr.size(), tol, 1.0, "probs")) << L << "x" << dh;
      for (int i = 0; i < L; ++i) {
        ASSERT_TRUE(Close(out.data() + i * ld, outr.data() + i * ld, dh, tol, 1.0, "out")) << L << "x" << dh;
        ASSERT_TRUE(Close(dq.data() + i * ld, dqr.data() + i * ld, dh, tol, 1.0, "dq")) << L << "x" << dh;
        ASSERT_TRUE(Close(dk.data() + i * ld, dkr.data() + i * ld, dh, tol, 1.0, "dk")) << L << "x" << dh;
        ASSERT_TRUE(Close(dv.data() + i * ld, dvr.data() + i * ld, dh, tol, 1.0, "dv")) << L << "x" << dh;
      }
      // Causal: row i puts no weight on j > i.
      for (int i = 0; i < L; ++i)
        for (int j = i + 1; j < L; ++j) ASSERT_EQ(probs[static_cast<size_t>(i) * L + j], 0.0f);
    }
  }
}

void TestCrossEntropy() {
  std::mt19937 rng(3);
  const int64_t N = static_cast<int64_t>(FloatLanes());
  std::vector<int64_t> sizes;
  for (int64_t n = 1; n <= 2 * N + 3; ++n) sizes.push_back(n);
  for (int64_t n : {100, 1000, 32000}) sizes.push_back(n);
  for (int64_t V : sizes) {
    std::vector<float> logits = Rand(rng, V + 1, -8.f, 8.f);
    if (V > 5) logits[3] = 60.0f;  // a dominant logit: exp of the others underflows far below it
    const int32_t target = static_cast<int32_t>(rng() % V);
    const float scale = 0.37f;
    std::vector<float> d(V + 1);
    const double loss = CrossEntropyRow(logits.data() + 1, V, target, scale, d.data() + 1);
    std::vector<double> ld = ToD(logits.data() + 1, V), dr(V);
    const double lr = ref::CrossEntropyRow<double>(ld.data(), V, target, scale, dr.data());
    ASSERT_NEAR(loss, lr, 1e-5 * (1 + std::fabs(lr))) << "V=" << V;
    ASSERT_TRUE(Close(d.data() + 1, dr.data(), V, 2e-6, scale, "dlogits")) << "V=" << V;
    ASSERT_NEAR(LogProbRow(logits.data() + 1, V, target), -lr, 1e-5 * (1 + std::fabs(lr)));
    // In place.
    std::vector<float> inplace(logits.begin() + 1, logits.end());
    const double loss2 = CrossEntropyRow(inplace.data(), V, target, scale, inplace.data());
    ASSERT_EQ(loss, loss2);
    ASSERT_EQ(0, std::memcmp(inplace.data(), d.data() + 1, V * sizeof(float)));
  }
}

void TestAdamW() {
  std::mt19937 rng(9);
  const int64_t N = static_cast<int64_t>(FloatLanes());
  std::vector<int64_t> sizes;
  for (int64_t n = 0; n <= 2 * N + 3; ++n) sizes.push_back(n);
  sizes.push_back(1001);
  for (int64_t n : sizes) {
    std::vector<float> w = Rand(rng, n + 1, -1.f, 1.f), g = Rand(rng, n + 1, -3.f, 3.f);
    std::vector<float> m = Rand(rng, n + 1, -0.5f, 0.5f), v = Rand(rng, n + 1, 0.f, 2.f);
    std::vector<double> wd = ToD(w.data() + 1, n), gd = ToD(g.data() + 1, n), md = ToD(m.data() + 1, n),
                        vd = ToD(v.data() + 1, n);
    AdamWParams p{0.9f, 0.95f, 3e-3f, 1.7f, 1e-8f, 1e-4f, 0.6f};
    HWY_NAMESPACE::AdamWUpdate(w.data() + 1, g.data() + 1, m.data() + 1, v.data() + 1, n, p);
    ref::AdamWUpdate<double>(wd.data(), gd.data(), md.data(), vd.data(), n, p.b1, p.b2, p.step_size, p.inv_bc2, p.eps,
                             p.decay, p.grad_scale);
    ASSERT_TRUE(Close(m.data() + 1, md.data(), n, 1e-6, 1.0, "m")) << n;
    ASSERT_TRUE(Close(v.data() + 1, vd.data(), n, 1e-6, 2.0, "v")) << n;
    ASSERT_TRUE(Close(w.data() + 1, wd.data(), n, 2e-6, 1.0, "w")) << n;
    double ss = 0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(g[i + 1]) * g[i + 1];
    ASSERT_NEAR(HWY_NAMESPACE::SumSquares(g.data() + 1, n), ss, 1e-6 * (ss + 1)) << n;
  }
}

}  // namespace
// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace moe::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
#include "kernels/kernels.h"
#include "kernels/train_ops.h"

namespace moe::kernels {
HWY_BEFORE_TEST(TrainOpsTest);
HWY_EXPORT_AND_TEST_P(TrainOpsTest, TestRmsNorm);
HWY_EXPORT_AND_TEST_P(TrainOpsTest, TestAttention);
HWY_EXPORT_AND_TEST_P(TrainOpsTest, TestCrossEntropy);
HWY_EXPORT_AND_TEST_P(TrainOpsTest, TestAdamW);

namespace {

// Central difference of f at x[i] in double.
template <typename F>
double Numeric(std::vector<double>& x, size_t i, F f, double h = 1e-6) {
  const double x0 = x[i];
  x[i] = x0 + h;
  const double fp = f();
  x[i] = x0 - h;
  const double fm = f();
  x[i] = x0;
  return (fp - fm) / (2 * h);
}

std::vector<double> RandD(std::mt19937& rng, size_t n, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<double> v(n);
  for (double& x : v) x = u(rng);
  return v;
}

double DotD(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

// The references' backward passes are the gradients of their forward passes.
TEST(TrainRefGradients, RmsNorm) {
  std::mt19937 rng(4);
  const int n = 13;
  std::vector<double> x = RandD(rng, n, -2, 2), w = RandD(rng, n, 0.5, 1.5), dy = RandD(rng, n, -1, 1);
  auto loss = [&] {
    std::vector<double> y(n);
    ref::RmsNormTrain(x.data(), w.data(), n, 1e-3, y.data());
    return DotD(y, dy);
  };
  std::vector<double> y(n), dx(n), dw(n, 0.0);
  const double rstd = ref::RmsNormTrain(x.data(), w.data(), n, 1e-3, y.data());
  ref::RmsNormBackward(x.data(), w.data(), rstd, dy.data(), n, dx.data(), dw.data());
  for (int i = 0; i < n; ++i) {
    EXPECT_NEAR(dx[i], Numeric(x, i, loss), 1e-8);
    EXPECT_NEAR(dw[i], Numeric(w, i, loss), 1e-8);
  }
}

TEST(TrainRefGradients, CausalAttention) {
  std::mt19937 rng(5);
  const int L = 6, dh = 5, ld = 7;
  const double scale = 0.45;
  std::vector<double> q = RandD(rng, L * ld, -1, 1), k = RandD(rng, L * ld, -1, 1), v = RandD(rng, L * ld, -1, 1);
  std::vector<double> dout = RandD(rng, L * ld, -1, 1);
  auto loss = [&] {
    std::vector<double> p(L * L), out(L * ld, 0.0);
    ref::CausalAttentionForward<double>(L, dh, scale, q.data(), ld, k.data(), ld, v.data(), ld, p.data(), out.data(), ld);
    double s = 0;
    for (int i = 0; i < L; ++i)
      for (int d = 0; d < dh; ++d) s += out[i * ld + d] * dout[i * ld + d];
    return s;
  };
  std::vector<double> p(L * L), out(L * ld), dq(L * ld), dk(L * ld, 0.0), dv(L * ld, 0.0);
  ref::CausalAttentionForward<double>(L, dh, scale, q.data(), ld, k.data(), ld, v.data(), ld, p.data(), out.data(), ld);
  ref::CausalAttentionBackward<double>(L, dh, scale, q.data(), ld, k.data(), ld, v.data(), ld, p.data(), dout.data(),
                                       ld, dq.data(), ld, dk.data(), ld, dv.data(), ld);
  for (int i = 0; i < L; ++i) {
    for (int d = 0; d < dh; ++d) {
      const size_t e = i * ld + d;
      EXPECT_NEAR(dq[e], Numeric(q, e, loss), 1e-8);
      EXPECT_NEAR(dk[e], Numeric(k, e, loss), 1e-8);
      EXPECT_NEAR(dv[e], Numeric(v, e, loss), 1e-8);
    }
  }
}

TEST(TrainRefGradients, CrossEntropy) {
  std::mt19937 rng(6);
  const int V = 11;
  std::vector<double> logits = RandD(rng, V, -3, 3), d(V);
  const int target = 4;
  auto loss = [&] {
    std::vector<double> tmp(V);
    return ref::CrossEntropyRow<double>(logits.data(), V, target, 1.0, tmp.data());
  };
  ref::CrossEntropyRow<double>(logits.data(), V, target, 0.5, d.data());
  for (int i = 0; i < V; ++i) EXPECT_NEAR(d[i], 0.5 * Numeric(logits, i, loss), 1e-8);
}

TEST(TrainRefGradients, RopeInverseIsTheTranspose) {
  // <Rope(x), y> = <x, Rope^-1(y)> for every position: the inverse rotation is the backward.
  std::mt19937 rng(7);
  for (bool neox : {false, true}) {
    const int H = 3, D = 8, R = 6;
    for (int pos : {0, 1, 17, 1000}) {
      std::vector<double> x = RandD(rng, H * D, -1, 1), y = RandD(rng, H * D, -1, 1);
      std::vector<double> rx = x, iy = y;
      ref::Rope(rx.data(), H, D, R, pos, 10000.0, neox, false);
      ref::Rope(iy.data(), H, D, R, pos, 10000.0, neox, true);
      EXPECT_NEAR(DotD(rx, y), DotD(x, iy), 1e-12);
      std::vector<double> back = rx;
      ref::Rope(back.data(), H, D, R, pos, 10000.0, neox, true);
      for (int i = 0; i < H * D; ++i) EXPECT_NEAR(back[i], x[i], 1e-12);
    }
  }
}

TEST(TrainOps, RopeTablesRotateLikeInference) {
  std::mt19937 rng(8);
  for (bool neox : {false, true}) {
    for (int R : {2, 8, 64}) {
      const int H = 2, D = R + 4, n_pos = 40, pos0 = 95;
      std::vector<float> cs(n_pos * R / 2), sn(n_pos * R / 2);
      RopeTables(R, 10000.0f, pos0, n_pos, cs.data(), sn.data());
      for (int p = 0; p < n_pos; ++p) {
        std::vector<float> x(H * D);
        std::uniform_real_distribution<float> u(-1, 1);
        for (float& v : x) v = u(rng);
        std::vector<float> a = x, b = x;
        RopeApply(a.data(), H, D, R, &cs[p * R / 2], &sn[p * R / 2], neox, false);
        Rope(b.data(), H, D, R, pos0 + p, 10000.0f, neox);  // inference (kernels.h)
        ASSERT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << "pos " << pos0 + p;
        // Against the exact rotation, and the inverse undoes it.
        std::vector<double> xd(x.begin(), x.end());
        ref::Rope(xd.data(), H, D, R, pos0 + p, 10000.0, neox, false);
        for (int i = 0; i < H * D; ++i) ASSERT_NEAR(a[i], xd[i], 2e-4) << i;
        RopeApply(a.data(), H, D, R, &cs[p * R / 2], &sn[p * R / 2], neox, true);
        for (int i = 0; i < H * D; ++i) ASSERT_NEAR(a[i], x[i], 1e-6);
      }
    }
  }
}

TEST(TrainOps, EmbeddingBackwardAddsRowsInTokenOrder) {
  const int32_t toks[] = {2, 0, 2, 1};
  const float dx[] = {1, 2, 3, 4, 5, 6, 7, 8};
  std::vector<float> dE(6, 0.5f);
  EmbeddingBackward(toks, 4, dx, 2, dE.data());
  const std::vector<float> want = {0.5f + 3, 0.5f + 4, 0.5f + 7, 0.5f + 8, 0.5f + 1 + 5, 0.5f + 2 + 6};
  EXPECT_EQ(dE, want);
  std::vector<double> dEd(6, 0.5);
  const double dxd[] = {1, 2, 3, 4, 5, 6, 7, 8};
  ref::EmbeddingBackward(toks, 4, dxd, 2, dEd.data());
  for (int i = 0; i < 6; ++i) EXPECT_EQ(dEd[i], want[i]);
}

}  // namespace moe::kernels
#endif  // HWY_ONCE
