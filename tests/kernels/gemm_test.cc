// Gemm (gemm-inl.h) on every compiled Highway target against a double-precision triple loop,
// for kNN / kNT / kTN over edge shapes (0, 1, primes, below and across the register tile and the
// m / n / k blocks), padded leading dimensions, accumulate on and off. Plus the numerics
// contract of gemm.h: kNN / kNT rows bitwise independent of their batch-mates, position and of
// the column range, and kTN deterministic.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/gemm_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/tests/hwy_gtest.h"
#include "kernels/gemm-inl.h"

#ifndef MOE_TESTS_KERNELS_GEMM_TEST_HELPERS_
#define MOE_TESTS_KERNELS_GEMM_TEST_HELPERS_
namespace moe::kernels::test {

constexpr double kGemmEpsF = std::numeric_limits<float>::epsilon();

inline const char* OpName(GemmOp op) {
  return op == GemmOp::kNN ? "NN" : op == GemmOp::kNT ? "NT" : "TN";
}

// One problem: operands stored with padded leading dimensions, as gemm.h lays them out.
struct GemmCase {
  GemmOp op;
  int m, n, k;
  int lda, ldb, ldc;
  std::vector<float> a, b, c0;  // c0: C before the call

  GemmCase(GemmOp op_, int m_, int n_, int k_, int pad, std::mt19937& rng)
      : op(op_), m(m_), n(n_), k(k_) {
    const int a_rows = op == GemmOp::kTN ? k : m, a_cols = op == GemmOp::kTN ? m : k;
    const int b_rows = op == GemmOp::kNT ? n : k, b_cols = op == GemmOp::kNT ? k : n;
    lda = a_cols + pad;
    ldb = b_cols + pad;
    ldc = n + pad;
    // Buffers cover the padded last row too, so reading past a row end stays inside them
    // (and a kernel that did read the padding would see NaN and fail).
    a.assign(static_cast<size_t>(std::max(a_rows, 1)) * std::max(lda, 1), NAN);
    b.assign(static_cast<size_t>(std::max(b_rows, 1)) * std::max(ldb, 1), NAN);
    c0.assign(static_cast<size_t>(std::max(m, 1)) * std::max(ldc, 1), NAN);
    std::uniform_real_distribution<float> u(-1.0f, 1.0f);
    for (int r = 0; r < a_rows; ++r) {
      for (int j = 0; j < a_cols; ++j) a[static_cast<size_t>(r) * lda + j] = u(rng);
    }
    for (int r = 0; r < b_rows; ++r) {
      for (int j = 0; j < b_cols; ++j) b[static_cast<size_t>(r) * ldb + j] = 2.0f * u(rng);
    }
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < n; ++j) c0[static_cast<size_t>(i) * ldc + j] = u(rng);
    }
  }

  float A(int i, int p) const {  // op(A)[i][p]
    return op == GemmOp::kTN ? a[static_cast<size_t>(p) * lda + i]
                             : a[static_cast<size_t>(i) * lda + p];
  }
  float B(int p, int j) const {  // op(B)[p][j]
    return op == GemmOp::kNT ? b[static_cast<size_t>(j) * ldb + p]
                             : b[static_cast<size_t>(p) * ldb + j];
  }
};

// Checks c (the kernel's output) against the double product; every element of a sequential
// float FMA chain of k terms is within k * eps/2 * sum_p |a||b| (+ eps/2 |c0| when
// accumulating) of the exact value: twice that is allowed. Padding columns must be untouched.
inline void ExpectGemmNear(const GemmCase& t, bool accumulate, const std::vector<float>& c,
                           const char* target) {
  for (int i = 0; i < t.m; ++i) {
    for (int j = 0; j < t.n; ++j) {
      double want = 0.0, abs_sum = 0.0;
      for (int p = 0; p < t.k; ++p) {
        const double prod = static_cast<double>(t.A(i, p)) * t.B(p, j);
        want += prod;
        abs_sum += std::abs(prod);
      }
      const double old = t.c0[static_cast<size_t>(i) * t.ldc + j];
      if (accumulate) want += old;
      const double tol = kGemmEpsF * ((t.k + 1) * abs_sum + (accumulate ? std::abs(old) : 0.0));
      const float got = c[static_cast<size_t>(i) * t.ldc + j];
      ASSERT_NEAR(got, want, tol) << target << " " << OpName(t.op) << " m=" << t.m << " n=" << t.n
                                  << " k=" << t.k << " ldc=" << t.ldc << " acc=" << accumulate
                                  << " at (" << i << "," << j << ")";
    }
    for (int j = t.n; j < t.ldc; ++j) {
      const size_t at = static_cast<size_t>(i) * t.ldc + j;
      ASSERT_TRUE(std::isnan(c[at]))
          << target << " " << OpName(t.op) << " wrote padding (" << i << "," << j << ")";
    }
  }
}

inline bool RowsBitwiseEqual(const float* x, const float* y, int n) {
  return std::memcmp(x, y, static_cast<size_t>(n) * sizeof(float)) == 0;
}

}  // namespace moe::kernels::test
#endif  // MOE_TESTS_KERNELS_GEMM_TEST_HELPERS_

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {
namespace {

using test::ExpectGemmNear;
using test::GemmCase;
using test::OpName;
using test::RowsBitwiseEqual;

// Calls name HWY_NAMESPACE::Gemm: unqualified, argument-dependent lookup would also find the
// dispatched moe::kernels::Gemm.
constexpr GemmOp kOps[] = {GemmOp::kNN, GemmOp::kNT, GemmOp::kTN};

// Runs one case with accumulate off (C starts as NaN garbage, must not be read) and on.
void RunCase(GemmCase& t) {
  for (const bool accumulate : {false, true}) {
    std::vector<float> c = t.c0;
    if (!accumulate) {
      for (int i = 0; i < t.m; ++i) {
        for (int j = 0; j < t.n; ++j) c[static_cast<size_t>(i) * t.ldc + j] = NAN;
      }
    }
    HWY_NAMESPACE::Gemm(t.op, t.m, t.n, t.k, t.a.data(), t.lda, t.b.data(), t.ldb, c.data(), t.ldc,
                        accumulate);
    ExpectGemmNear(t, accumulate, c, hwy::TargetName(HWY_TARGET));
    if (::testing::Test::HasFatalFailure()) return;
  }
}

// Every combination of small and odd sizes: empty, single, below / at / above the register
// tile (kMR rows, 2 vectors of columns) and k not a multiple of anything.
void TestGemmSmallShapes() {
  std::mt19937 rng(11);
  const int N = static_cast<int>(hn::Lanes(hn::ScalableTag<float>()));
  const int mr = static_cast<int>(kGemmMR);
  const std::vector<int> ms = {0, 1, 2, mr - 1, mr, mr + 1, 2 * mr + 3, 37};
  const std::vector<int> ns = {0, 1, 3, N, 2 * N - 1, 2 * N, 2 * N + 1, 70};
  const std::vector<int> ks = {0, 1, 2, 7, 64, 263};
  for (GemmOp op : kOps) {
    for (int m : ms) {
      for (int n : ns) {
        for (int k : ks) {
          GemmCase t(op, m, n, k, (m + n + k) % 3 == 0 ? 0 : 3, rng);
          RunCase(t);
          if (::testing::Test::HasFatalFailure()) return;
        }
      }
    }
  }
}

// Shapes across the m (MC), n (NC) and k (KC) blocks, padded strides.
void TestGemmBlockedShapes() {
  std::mt19937 rng(12);
  struct Shape {
    int m, n, k, pad;
  };
  const Shape shapes[] = {
      {static_cast<int>(kGemmMC) + 7, 67, 2 * static_cast<int>(kGemmKC) + 1, 5},
      {13, static_cast<int>(kGemmNC) + 45, 40, 1},
      {static_cast<int>(kGemmMC) + 1, static_cast<int>(kGemmNC) + 1, 19, 0},
      {64, 128, static_cast<int>(kGemmKC), 16},
      {97, 101, static_cast<int>(kGemmKC) + 3, 2},
  };
  for (GemmOp op : kOps) {
    for (const Shape& s : shapes) {
      GemmCase t(op, s.m, s.n, s.k, s.pad, rng);
      RunCase(t);
      if (::testing::Test::HasFatalFailure()) return;
    }
  }
}

// kNN / kNT: a row of C is bitwise the same computed in a big batch, alone (m = 1), at another
// position among other rows, and for a sub-range of the columns (n-edge handling).
void TestGemmBatchInvariance() {
  std::mt19937 rng(13);
  const int m = static_cast<int>(kGemmMC) + 2 * static_cast<int>(kGemmMR) + 3;
  const int n = 2 * static_cast<int>(hn::Lanes(hn::ScalableTag<float>())) * 3 + 5;
  const int k = 2 * static_cast<int>(kGemmKC) + 37;
  for (GemmOp op : {GemmOp::kNN, GemmOp::kNT}) {
    for (const bool accumulate : {false, true}) {
      GemmCase t(op, m, n, k, 2, rng);
      std::vector<float> full = t.c0;
      HWY_NAMESPACE::Gemm(op, m, n, k, t.a.data(), t.lda, t.b.data(), t.ldb, full.data(), t.ldc,
                          accumulate);
      for (int i : {0, 1, static_cast<int>(kGemmMR) - 1, static_cast<int>(kGemmMR),
                    static_cast<int>(kGemmMC) - 1, static_cast<int>(kGemmMC), m - 1}) {
        const float* a_row = t.a.data() + static_cast<size_t>(i) * t.lda;
        const float* want = full.data() + static_cast<size_t>(i) * t.ldc;
        // Alone.
        std::vector<float> one(t.c0.begin() + static_cast<size_t>(i) * t.ldc,
                               t.c0.begin() + static_cast<size_t>(i) * t.ldc + n);
        HWY_NAMESPACE::Gemm(op, 1, n, k, a_row, t.lda, t.b.data(), t.ldb, one.data(), n,
                            accumulate);
        EXPECT_TRUE(RowsBitwiseEqual(one.data(), want, n))
            << OpName(op) << " row " << i << " alone, acc=" << accumulate;
        // At position pos of a batch of kMR + 2 rows whose other rows are different data.
        const int bm = static_cast<int>(kGemmMR) + 2;
        for (int pos : {0, bm / 2, bm - 1}) {
          std::vector<float> a2(static_cast<size_t>(bm) * k);
          std::uniform_real_distribution<float> u(-1.0f, 1.0f);
          for (float& x : a2) x = u(rng);
          std::copy(a_row, a_row + k, a2.begin() + static_cast<size_t>(pos) * k);
          std::vector<float> c2(static_cast<size_t>(bm) * n, 0.5f);
          std::copy(t.c0.begin() + static_cast<size_t>(i) * t.ldc,
                    t.c0.begin() + static_cast<size_t>(i) * t.ldc + n,
                    c2.begin() + static_cast<size_t>(pos) * n);
          HWY_NAMESPACE::Gemm(op, bm, n, k, a2.data(), k, t.b.data(), t.ldb, c2.data(), n,
                              accumulate);
          EXPECT_TRUE(RowsBitwiseEqual(c2.data() + static_cast<size_t>(pos) * n, want, n))
              << OpName(op) << " row " << i << " at position " << pos << ", acc=" << accumulate;
        }
        // Columns [j0, j0 + nn) only: B offset by j0 columns.
        for (int j0 : {1, 3, n / 2}) {
          const int nn = n - j0 - 1;
          const float* b_off =
              op == GemmOp::kNT ? t.b.data() + static_cast<size_t>(j0) * t.ldb : t.b.data() + j0;
          std::vector<float> part(t.c0.begin() + static_cast<size_t>(i) * t.ldc + j0,
                                  t.c0.begin() + static_cast<size_t>(i) * t.ldc + j0 + nn);
          HWY_NAMESPACE::Gemm(op, 1, nn, k, a_row, t.lda, b_off, t.ldb, part.data(), nn,
                              accumulate);
          EXPECT_TRUE(RowsBitwiseEqual(part.data(), want + j0, nn))
              << OpName(op) << " row " << i << " columns from " << j0 << ", acc=" << accumulate;
        }
      }
    }
  }
}

// kTN: the same inputs give the same bits, also after calls of other shapes reused the
// per-thread packing buffers.
void TestGemmTNDeterministic() {
  std::mt19937 rng(14);
  const int m = 2 * static_cast<int>(kGemmMR) + 5, n = 77, k = 3 * static_cast<int>(kGemmKC) + 11;
  GemmCase t(GemmOp::kTN, m, n, k, 1, rng);
  std::vector<float> c1 = t.c0, c2 = t.c0;
  HWY_NAMESPACE::Gemm(GemmOp::kTN, m, n, k, t.a.data(), t.lda, t.b.data(), t.ldb, c1.data(), t.ldc,
                      true);
  GemmCase other(GemmOp::kNT, 33, 300, 129, 0, rng);
  std::vector<float> junk = other.c0;
  HWY_NAMESPACE::Gemm(GemmOp::kNT, other.m, other.n, other.k, other.a.data(), other.lda,
                      other.b.data(), other.ldb, junk.data(), other.ldc, false);
  HWY_NAMESPACE::Gemm(GemmOp::kTN, m, n, k, t.a.data(), t.lda, t.b.data(), t.ldb, c2.data(), t.ldc,
                      true);
  for (int i = 0; i < m; ++i) {
    EXPECT_TRUE(RowsBitwiseEqual(c1.data() + static_cast<size_t>(i) * t.ldc,
                                 c2.data() + static_cast<size_t>(i) * t.ldc, n))
        << "row " << i;
  }
  ExpectGemmNear(t, true, c1, hwy::TargetName(HWY_TARGET));
}

// Rows past m (the tail of the last m block is computed in place in C) and the padding of the
// rows in range are never written, for row counts around the register tile and the m block.
void TestGemmLeavesRowsBelow() {
  std::mt19937 rng(16);
  const int mr = static_cast<int>(kGemmMR), mc = static_cast<int>(kGemmMC);
  const int n = 2 * static_cast<int>(hn::Lanes(hn::ScalableTag<float>())) * 2 + 3;
  for (GemmOp op : kOps) {
    for (int m : {1, mr - 1, mr + 1, 2 * mr + mr / 2, mc + 3}) {
      for (const bool accumulate : {false, true}) {
        GemmCase t(op, m, n, 37, 2, rng);
        const size_t in_range = static_cast<size_t>(m) * t.ldc;
        std::vector<float> c = t.c0;
        c.resize(in_range + 3 * static_cast<size_t>(t.ldc), -7.0f);  // 3 sentinel rows below
        if (!accumulate) std::fill(c.begin(), c.begin() + static_cast<long>(in_range), NAN);
        HWY_NAMESPACE::Gemm(op, m, n, t.k, t.a.data(), t.lda, t.b.data(), t.ldb, c.data(), t.ldc,
                            accumulate);
        for (size_t at = in_range; at < c.size(); ++at) {
          ASSERT_EQ(c[at], -7.0f) << OpName(op) << " m=" << m << " wrote below C at " << at;
        }
        c.resize(in_range);
        // Padding columns: NaN in c0 (never written); values checked against the reference.
        ExpectGemmNear(t, accumulate, c, hwy::TargetName(HWY_TARGET));
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
#include "kernels/gemm.h"

namespace moe::kernels {
HWY_BEFORE_TEST(GemmTest);
HWY_EXPORT_AND_TEST_P(GemmTest, TestGemmSmallShapes);
HWY_EXPORT_AND_TEST_P(GemmTest, TestGemmBlockedShapes);
HWY_EXPORT_AND_TEST_P(GemmTest, TestGemmBatchInvariance);
HWY_EXPORT_AND_TEST_P(GemmTest, TestGemmTNDeterministic);
HWY_EXPORT_AND_TEST_P(GemmTest, TestGemmLeavesRowsBelow);

// The dispatched entry point (best target) on one shape of each op.
TEST(GemmDispatch, MatchesReference) {
  std::mt19937 rng(15);
  for (GemmOp op : {GemmOp::kNN, GemmOp::kNT, GemmOp::kTN}) {
    test::GemmCase t(op, 45, 83, 301, 2, rng);
    std::vector<float> c = t.c0;
    Gemm(op, t.m, t.n, t.k, t.a.data(), t.lda, t.b.data(), t.ldb, c.data(), t.ldc, true);
    test::ExpectGemmNear(t, true, c, "dispatch");
  }
}
}  // namespace moe::kernels
#endif  // HWY_ONCE
