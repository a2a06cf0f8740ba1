// MatMul (matmul-inl.h) for every weight type against ref::DotRow (double dot of the
// dequantized weight row and activation row), on every compiled Highway target: n_tok 1..9,
// partial row ranges, y_stride larger than the row count (cells outside the written range must
// stay untouched), weights and activations at odd byte offsets, padded activation strides.
// Random blocks are made directly (any bit pattern is a valid block), independently of the
// quantizers. An "exact" mode sets every scale to 1 and keeps the integers small, so the result
// is an integer below 2^24 and must equal the reference exactly: this checks the integer dot
// structure (nibble order, scale unpacking, bsums) with no tolerance at all.
// DISABLED_DecodeBandwidth measures single-thread decode GB/s (run it explicitly).

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <cstdlib>
#include <ctime>
#include <string>
#include <limits>
#include <utility>
#include <random>
#include <vector>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/matmul_test.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "hwy/tests/hwy_gtest.h"
#include "kernels/kernels.h"
#include "kernels/matmul-inl.h"
#include "kernels/ref/ops_ref.h"
#include "kernels/weight_types.h"
#include "tensor/dtype.h"

#ifndef MOE_TESTS_KERNELS_MATMUL_TEST_HELPERS_
#define MOE_TESTS_KERNELS_MATMUL_TEST_HELPERS_
namespace moe::kernels::test {

constexpr double kEpsF32 = std::numeric_limits<float>::epsilon();

inline uint16_t RandomHalf(std::mt19937& rng, int exp_lo, int exp_hi, bool allow_negative) {
  std::uniform_int_distribution<int> e(exp_lo, exp_hi), m(0, 1023), s(0, 1);
  const int sign = allow_negative ? s(rng) : 0;
  return static_cast<uint16_t>((sign << 15) | (e(rng) << 10) | m(rng));
}

inline int8_t RandomI8(std::mt19937& rng, int lo, int hi) {
  return static_cast<int8_t>(std::uniform_int_distribution<int>(lo, hi)(rng));
}

inline void RandomBytes(std::mt19937& rng, uint8_t* p, size_t n) {
  std::uniform_int_distribution<int> u(0, 255);
  for (size_t i = 0; i < n; ++i) p[i] = static_cast<uint8_t>(u(rng));
}

template <typename Block>
void PutBlock(uint8_t* row, int64_t b, const Block& blk) {
  std::memcpy(row + b * static_cast<int64_t>(sizeof(Block)), &blk, sizeof(Block));
}

constexpr uint16_t kHalfOne = 0x3C00;

// q4_1, q5_0, q5_1 blocks: random quants and high bits; exact: unit scale, minimum -1..1.
template <typename Block>
void RandomNibbleBlocks(std::mt19937& rng, int64_t n, uint8_t* dst, bool exact) {
  for (int64_t b = 0; b < n / kQK4_0; ++b) {
    Block blk;
    RandomBytes(rng, reinterpret_cast<uint8_t*>(&blk), sizeof(blk));
    blk.d = exact ? kHalfOne : RandomHalf(rng, 8, 14, true);
    if constexpr (!std::is_same_v<Block, BlockQ5_0>) {
      blk.m = exact ? static_cast<uint16_t>(std::uniform_int_distribution<int>(0, 2)(rng) == 0
                                                ? 0xBC00
                                                : kHalfOne)
                    : RandomHalf(rng, 8, 14, true);
    }
    PutBlock(dst, b, blk);
  }
}

// One row of n elements of type t at dst (any alignment). exact: unit scales, small integers.
inline void RandomRow(std::mt19937& rng, DType t, int64_t n, uint8_t* dst, bool exact) {
  switch (t) {
    case DType::kF32: {
      std::uniform_real_distribution<float> u(-1.0f, 1.0f);
      for (int64_t i = 0; i < n; ++i) {
        const float v = u(rng);
        std::memcpy(dst + 4 * i, &v, 4);
      }
      return;
    }
    case DType::kF16: {
      for (int64_t i = 0; i < n; ++i) {
        // Mostly normal values, some subnormals (exponent field 0) to test the conversion.
        const uint16_t h = (i % 13 == 5) ? RandomHalf(rng, 0, 0, true) : RandomHalf(rng, 10, 17, true);
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    }
    case DType::kBF16: {
      std::uniform_int_distribution<int> e(118, 130), m(0, 127), s(0, 1);
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = static_cast<uint16_t>((s(rng) << 15) | (e(rng) << 7) | m(rng));
        std::memcpy(dst + 2 * i, &h, 2);
      }
      return;
    }
    case DType::kQ8_0: {
      for (int64_t b = 0; b < n / kQK8_0; ++b) {
        BlockQ8_0 blk;
        blk.d = exact ? kHalfOne : RandomHalf(rng, 8, 14, true);
        for (int8_t& q : blk.qs) q = exact ? RandomI8(rng, -16, 16) : RandomI8(rng, -128, 127);
        PutBlock(dst, b, blk);
      }
      return;
    }
    case DType::kQ4_0: {
      for (int64_t b = 0; b < n / kQK4_0; ++b) {
        BlockQ4_0 blk;
        blk.d = exact ? kHalfOne : RandomHalf(rng, 8, 14, true);
        RandomBytes(rng, blk.qs, sizeof(blk.qs));
        PutBlock(dst, b, blk);
      }
      return;
    }
    case DType::kQ4_1: RandomNibbleBlocks<BlockQ4_1>(rng, n, dst, exact); return;
    case DType::kQ5_0: RandomNibbleBlocks<BlockQ5_0>(rng, n, dst, exact); return;
    case DType::kQ5_1: RandomNibbleBlocks<BlockQ5_1>(rng, n, dst, exact); return;
    case DType::kQ8_1: {
      for (int64_t b = 0; b < n / kQK8_0; ++b) {
        BlockQ8_1 blk;
        blk.d = exact ? kHalfOne : RandomHalf(rng, 8, 14, true);
        int sum = 0;
        for (int8_t& q : blk.qs) {
          q = exact ? RandomI8(rng, -16, 16) : RandomI8(rng, -128, 127);
          sum += q;
        }
        blk.s = moe::kernels::F32ToF16(ref::HalfValue<float>(blk.d) * static_cast<float>(sum));
        PutBlock(dst, b, blk);
      }
      return;
    }
    case DType::kMXFP4: {
      for (int64_t b = 0; b < n / kQK4_0; ++b) {
        BlockMXFP4 blk;
        // exact: 2^(e-128) = 1/2 with the doubled e2m1 values gives the true e2m1 values x 1.
        blk.e = exact ? 127 : static_cast<uint8_t>(std::uniform_int_distribution<int>(100, 140)(rng));
        RandomBytes(rng, blk.qs, sizeof(blk.qs));
        PutBlock(dst, b, blk);
      }
      return;
    }
    case DType::kIQ4_NL:
    case DType::kIQ4_XS:
    case DType::kQ2_K:
    case DType::kQ3_K:
    case DType::kQ4_K:
    case DType::kQ5_K:
    case DType::kIQ1_S:
    case DType::kIQ1_M:
    case DType::kIQ2_XXS:
    case DType::kIQ2_XS:
    case DType::kIQ2_S:
    case DType::kIQ3_XXS:
    case DType::kIQ3_S: {
      // Any bytes are a valid block of these types; the f16 scales get finite values (exact:
      // 1), so every quant, sub-block scale and grid index is exercised.
      const size_t bytes = Traits(t).block_bytes;
      for (int64_t b = 0; b < n / Traits(t).block_size; ++b) {
        uint8_t* blk = dst + b * bytes;
        RandomBytes(rng, blk, bytes);
        moe::test::SetHalfScales(t, blk, [&] { return exact ? kHalfOne : RandomHalf(rng, 5, 11, true); });
      }
      return;
    }
    case DType::kQ6_K: {
      for (int64_t b = 0; b < n / kQK_K; ++b) {
        BlockQ6_K blk;
        blk.d = exact ? kHalfOne : RandomHalf(rng, 5, 11, true);
        RandomBytes(rng, blk.ql, sizeof(blk.ql));
        RandomBytes(rng, blk.qh, sizeof(blk.qh));
        for (int8_t& s : blk.scales) s = exact ? RandomI8(rng, -31, 31) : RandomI8(rng, -128, 127);
        PutBlock(dst, b, blk);
      }
      return;
    }
    case DType::kQ8_K: {
      std::uniform_real_distribution<float> u(1e-3f, 1e-1f);
      std::uniform_int_distribution<int> s(0, 1);
      for (int64_t b = 0; b < n / kQK_K; ++b) {
        BlockQ8_K blk;
        blk.d = exact ? 1.0f : (s(rng) ? -1.0f : 1.0f) * u(rng);
        for (int8_t& q : blk.qs) q = exact ? RandomI8(rng, -16, 16) : RandomI8(rng, -128, 127);
        for (int g = 0; g < kQK_K / 16; ++g) {
          int sum = 0;
          for (int l = 0; l < 16; ++l) sum += blk.qs[16 * g + l];
          blk.bsums[g] = static_cast<int16_t>(sum);
        }
        PutBlock(dst, b, blk);
      }
      return;
    }
    default: return;
  }
}

inline bool IsFloatType(DType t) {
  return t == DType::kF32 || t == DType::kF16 || t == DType::kBF16;
}

inline std::vector<int64_t> InSizes(DType w, size_t float_lanes) {
  if (IsFloatType(w)) {
    std::vector<int64_t> s = {0, 1, 3, 15, 16, 17, 33, 64, 100, 257};
    for (int64_t d : {-1, 0, 1}) s.push_back(static_cast<int64_t>(4 * float_lanes) + d);
    return s;
  }
  if (Traits(w).block_size == 32) return {32, 64, 96, 224, 1056, 4160};
  return {256, 512, 768, 1280};
}

}  // namespace moe::kernels::test
#endif  // MOE_TESTS_KERNELS_MATMUL_TEST_HELPERS_

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {
namespace {

using test::kEpsF32;

// Runs MatMul on rows [r0, r1) of a random n_rows x n_in matrix of type w with n_tok random
// activations and checks every written cell against the reference and every other cell of y
// against its sentinel.
void CheckMatMul(DType w, int64_t n_in, int64_t n_rows, int64_t r0, int64_t r1, int64_t n_tok,
                 size_t w_offset, size_t x_offset, size_t x_pad, bool exact, std::mt19937& rng,
                 WeightLayout layout = WeightLayout::kRows) {
  const DType xt = VecDotType(w);
  const size_t w_row = RowBytes(w, n_in);
  const size_t x_row = RowBytes(xt, n_in);
  const size_t x_stride = x_row + x_pad;
  std::vector<uint8_t> wbuf(w_row * n_rows + w_offset + 1);
  std::vector<uint8_t> xbuf(x_stride * n_tok + x_offset + 1);
  uint8_t* W = wbuf.data() + w_offset;
  uint8_t* X = xbuf.data() + x_offset;
  for (int64_t r = 0; r < n_rows; ++r) test::RandomRow(rng, w, n_in, W + r * w_row, exact);
  for (int64_t t = 0; t < n_tok; ++t) test::RandomRow(rng, xt, n_in, X + t * x_stride, exact);

  const int64_t y_stride = (r1 - r0) + 5;
  constexpr float kSentinel = -12345.25f;
  std::vector<float> y(static_cast<size_t>(y_stride * n_tok + 3), kSentinel);
  if (layout == WeightLayout::kRows) {
    MatMul(w, W, n_in, r0, r1, X, x_stride, n_tok, y.data(), y_stride);
  } else {  // the same matrix repacked (64-byte aligned, as the model's copies are)
    const size_t bytes = w_row * static_cast<size_t>(n_rows);
    std::vector<uint8_t> tiles(bytes + 64);
    uint8_t* T = tiles.data() + (64 - reinterpret_cast<uintptr_t>(tiles.data()) % 64) % 64;
    Repack(w, layout, W, T, n_in, n_rows);
    MatMul(w, T, n_in, r0, r1, X, x_stride, n_tok, y.data(), y_stride, layout);
  }

  const size_t lanes = hwy::HWY_NAMESPACE::Lanes(hwy::HWY_NAMESPACE::ScalableTag<float>());
  const int64_t block = Traits(w).block_size;
  // Terms accumulated per float lane, plus the horizontal sum and scale products.
  const double n_terms = test::IsFloatType(w) ? static_cast<double>(n_in) / lanes + 16
                                        : static_cast<double>(n_in / block) + 16;
  for (int64_t t = 0; t < n_tok; ++t) {
    for (int64_t j = 0; j < y_stride; ++j) {
      const float got = y[t * y_stride + j];
      const int64_t r = r0 + j;
      if (r >= r1) {
        ASSERT_EQ(got, kSentinel) << "wrote outside [r0, r1): t=" << t << " j=" << j;
        continue;
      }
      const ref::DotResult want = ref::DotRow(w, W + r * w_row, X + t * x_stride, n_in);
      if (exact) {
        ASSERT_LT(want.basis, 16777216.0) << "exact-mode data too large to be exact in float";
        ASSERT_EQ(static_cast<double>(got), want.value)
            << DTypeName(w) << " exact n_in=" << n_in << " r=" << r << " t=" << t;
      } else {
        ASSERT_NEAR(got, want.value, n_terms * kEpsF32 * want.basis + 1e-30)
            << DTypeName(w) << " n_in=" << n_in << " r=" << r << " t=" << t << " n_tok=" << n_tok
            << " r0=" << r0 << " r1=" << r1 << " offsets " << w_offset << "," << x_offset;
      }
    }
  }
  for (size_t k = static_cast<size_t>(y_stride * n_tok); k < y.size(); ++k) {
    ASSERT_EQ(y[k], kSentinel) << "wrote past the last token's row";
  }
}

void TestMatMulType(DType w) {
  std::mt19937 rng(static_cast<uint32_t>(w) * 7919u + 1);
  const size_t lanes = hwy::HWY_NAMESPACE::Lanes(hwy::HWY_NAMESPACE::ScalableTag<float>());
  const int64_t n_rows = 9;
  int variant = 0;
  for (int64_t n_in : test::InSizes(w, lanes)) {
    for (int64_t n_tok = 1; n_tok <= 9; ++n_tok) {
      ++variant;
      const size_t w_off = variant % 4;          // 0..3 bytes
      const size_t x_off = (variant / 4) % 3;    // 0..2 bytes
      const size_t x_pad = (variant % 5) * 3;    // strides that break alignment
      CheckMatMul(w, n_in, n_rows, 0, n_rows, n_tok, w_off, x_off, x_pad, false, rng);
      CheckMatMul(w, n_in, n_rows, 2, 7, n_tok, x_off, w_off, x_pad + 1, false, rng);
      if (::testing::Test::HasFailure()) return;
    }
  }
  if (!test::IsFloatType(w)) {
    const int64_t block = Traits(w).block_size;
    for (int64_t nb : {1, 2}) {
      for (int64_t n_tok : {1, 3, 4, 5, 9, 16, 17, 33}) {
        CheckMatMul(w, nb * block, n_rows, 1, 8, n_tok, 1, 3, 1, true, rng);
        if (::testing::Test::HasFailure()) return;
      }
    }
  }
  // Empty ranges write nothing.
  CheckMatMul(w, test::InSizes(w, lanes)[1], n_rows, 4, 4, 3, 0, 0, 0, false, rng);
}

void TestMatMulF32() { TestMatMulType(DType::kF32); }
void TestMatMulF16() { TestMatMulType(DType::kF16); }
void TestMatMulBF16() { TestMatMulType(DType::kBF16); }
void TestMatMulQ8_0() { TestMatMulType(DType::kQ8_0); }
void TestMatMulQ4_0() { TestMatMulType(DType::kQ4_0); }
void TestMatMulQ4_1() { TestMatMulType(DType::kQ4_1); }
void TestMatMulQ5_0() { TestMatMulType(DType::kQ5_0); }
void TestMatMulQ5_1() { TestMatMulType(DType::kQ5_1); }
void TestMatMulQ2_K() { TestMatMulType(DType::kQ2_K); }
void TestMatMulIQ4_NL() { TestMatMulType(DType::kIQ4_NL); }
void TestMatMulIQ4_XS() { TestMatMulType(DType::kIQ4_XS); }
void TestMatMulMXFP4() { TestMatMulType(DType::kMXFP4); }
void TestMatMulIQ2_XXS() { TestMatMulType(DType::kIQ2_XXS); }
void TestMatMulIQ3_XXS() { TestMatMulType(DType::kIQ3_XXS); }
void TestMatMulIQ3_S() { TestMatMulType(DType::kIQ3_S); }
void TestMatMulIQ2_XS() { TestMatMulType(DType::kIQ2_XS); }
void TestMatMulIQ2_S() { TestMatMulType(DType::kIQ2_S); }
void TestMatMulIQ1_S() { TestMatMulType(DType::kIQ1_S); }
void TestMatMulIQ1_M() { TestMatMulType(DType::kIQ1_M); }
void TestMatMulQ3_K() { TestMatMulType(DType::kQ3_K); }
void TestMatMulQ4_K() { TestMatMulType(DType::kQ4_K); }
void TestMatMulQ5_K() { TestMatMulType(DType::kQ5_K); }
void TestMatMulQ6_K() { TestMatMulType(DType::kQ6_K); }

// Rows longer than the row tile (n_tok > 4 tiles the row range), many token groups, and row
// ranges longer than the 16-row batches of the single-token path.
void TestMatMulRowTiles() {
  std::mt19937 rng(99);
  CheckMatMul(DType::kF32, 70000, 5, 0, 5, 11, 1, 2, 4, false, rng);
  CheckMatMul(DType::kQ8_0, 32 * 256, 40, 3, 37, 6, 3, 1, 2, false, rng);
  for (DType w : moe::test::AllWeightTypes()) {
    const int64_t n_in = 2 * Traits(w).block_size * (test::IsFloatType(w) ? 37 : 1);
    for (int64_t n_tok : {1, 2, 5, 16, 17, 33}) {
      CheckMatMul(w, n_in, 40, 3, 36, n_tok, 1, 0, 3, false, rng);
      CheckMatMul(w, n_in, 40, 0, 32, n_tok, 0, 1, 0, false, rng);
    }
  }
}

// q8_0, q4_0, q2_K, q3_K, q4_K, q5_K, iq4_xs and q6_K repacked in tiles of 16 rows (WeightLayout::kTiles16) against the same
// reference, on the targets that have the layout: whole and cut tiles, 1..9 tokens, exact
// integers too.
void TestMatMulTiles() {
  std::mt19937 rng(1234);
  if (RepackLayout(DType::kQ8_0, 64, 16) != WeightLayout::kTiles16) return;  // not this target
  EXPECT_EQ(RepackLayout(DType::kQ8_0, 96, 16), WeightLayout::kRows);  // blocks not in pairs
  EXPECT_EQ(RepackLayout(DType::kQ4_0, 64, 24), WeightLayout::kRows);  // rows not in tiles
  EXPECT_EQ(RepackLayout(DType::kQ4_1, 64, 16), WeightLayout::kRows);
  const WeightLayout tiles = WeightLayout::kTiles16;
  EXPECT_EQ(RepackLayout(DType::kQ4_K, 128, 16), WeightLayout::kRows);  // half a super-block
  for (DType w : {DType::kQ8_0, DType::kQ4_0, DType::kQ2_K, DType::kQ3_K, DType::kQ4_K, DType::kQ5_K, DType::kIQ4_XS, DType::kQ6_K}) {
    ASSERT_EQ(RepackLayout(w, 256, 48), tiles);
    const bool k = Traits(w).block_size == 256;
    const std::vector<int64_t> sizes = k ? std::vector<int64_t>{256, 512, 256 * 11}
                                                         : std::vector<int64_t>{64, 128, 64 * 37};
    for (int64_t n_in : sizes) {
      // (iq4_xs's exact-mode values pass float's exact integers beyond one super-block)
      const bool exact = w != DType::kIQ4_XS || n_in <= 256;
      for (int64_t n_tok : {1, 2, 3, 4, 5, 6, 7, 8, 9, 17}) {  // passes of 4 or 8, and several
        CheckMatMul(w, n_in, 48, 0, 48, n_tok, 0, n_tok % 3, n_tok, false, rng, tiles);
        CheckMatMul(w, n_in, 48, 3, 37, n_tok, 0, 1, 0, false, rng, tiles);
        CheckMatMul(w, n_in, 48, 16, 32, n_tok, 0, 0, 2, exact, rng, tiles);
        CheckMatMul(w, n_in, 16, 5, 6, n_tok, 0, 2, 1, exact, rng, tiles);
        if (::testing::Test::HasFailure()) return;
      }
    }
  }
}

// A row's product in the tile layout is bitwise the same however MatMul groups rows and tokens:
// whole matrix or any row range (tiles taken in pairs, alone, or cut), alone or among other
// tokens (batch invariance of the server rests on this).
void TestMatMulTilesGrouping() {
  std::mt19937 rng(4321);
  if (RepackLayout(DType::kQ8_0, 64, 16) != WeightLayout::kTiles16) return;  // not this target
  const int64_t rows = 112, n_tok = 19;  // 7 tiles: pairs and a single one; 3 passes or 5
  for (DType w : {DType::kQ8_0, DType::kQ4_0, DType::kQ2_K, DType::kQ3_K, DType::kQ4_K, DType::kQ5_K, DType::kIQ4_XS, DType::kQ6_K}) {
    const int64_t n_in = Traits(w).block_size == 256 ? 512 : 192;
    const DType xt = VecDotType(w);
    const size_t w_row = RowBytes(w, n_in), x_row = RowBytes(xt, n_in);
    std::vector<uint8_t> wbuf(w_row * rows), xbuf(x_row * n_tok), tiles(w_row * rows + 64);
    for (int64_t r = 0; r < rows; ++r) test::RandomRow(rng, w, n_in, wbuf.data() + r * w_row, false);
    for (int64_t t = 0; t < n_tok; ++t) test::RandomRow(rng, xt, n_in, xbuf.data() + t * x_row, false);
    uint8_t* T = tiles.data() + (64 - reinterpret_cast<uintptr_t>(tiles.data()) % 64) % 64;
    Repack(w, WeightLayout::kTiles16, wbuf.data(), T, n_in, rows);
    std::vector<float> all(rows * n_tok);
    MatMul(w, T, n_in, 0, rows, xbuf.data(), x_row, n_tok, all.data(), rows, WeightLayout::kTiles16);
    const int64_t ranges[][2] = {{16, 112}, {0, 80}, {32, 64}, {16, 48}, {48, 64}, {5, 101}, {40, 72}};
    for (const auto& rr : ranges) {
      // All tokens, token 3 alone, or tokens 5..13 (a pass of 8 and one of 1, or 4 + 4 + 1).
      for (const auto& [t0, nt] : {std::pair<int64_t, int64_t>{0, n_tok}, {3, 1}, {5, 9}}) {
        const int64_t n = rr[1] - rr[0];
        std::vector<float> y(n * nt);
        MatMul(w, T, n_in, rr[0], rr[1], xbuf.data() + t0 * x_row, x_row, nt, y.data(), n, WeightLayout::kTiles16);
        for (int64_t t = 0; t < nt; ++t) {
          for (int64_t r = 0; r < n; ++r) {
            const float want = all[(t0 + t) * rows + rr[0] + r];
            ASSERT_EQ(std::memcmp(&y[t * n + r], &want, sizeof(float)), 0)
                << DTypeName(w) << " rows [" << rr[0] << ", " << rr[1] << ") token " << t0 + t << " row " << rr[0] + r
                << ": " << y[t * n + r] << " vs " << want;
          }
        }
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
HWY_BEFORE_TEST(MatMulTest);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulF32);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulF16);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulBF16);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulQ8_0);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulQ4_0);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulQ4_1);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulQ5_0);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulQ5_1);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulQ2_K);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulIQ4_NL);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulIQ4_XS);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulMXFP4);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulIQ2_XXS);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulIQ3_XXS);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulIQ3_S);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulIQ2_XS);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulIQ2_S);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulIQ1_S);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulIQ1_M);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulQ3_K);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulQ4_K);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulQ5_K);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulQ6_K);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulRowTiles);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulTiles);
HWY_EXPORT_AND_TEST_P(MatMulTest, TestMatMulTilesGrouping);

// Single-thread decode (n_tok = 1) throughput in GB/s of weight bytes, through the dispatched
// entry point. "hot": one 2816 x 1024 matrix again and again (L2/L3 resident, like an expert
// reused across steps); "cold": 256 MB of copies cycled (streams from memory / remote cache).
// Run: test_kernels --gtest_also_run_disabled_tests --gtest_filter='*DecodeBandwidth*'
namespace {

double ThreadCpuSeconds() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// MOE_BENCH_TYPES=q8_0,q4_K limits the run to those weight types.
bool BenchSelected(DType w) {
  const char* sel = std::getenv("MOE_BENCH_TYPES");
  if (sel == nullptr) return true;
  const std::string list = std::string(",") + sel + ",";
  return list.find(std::string(",") + DTypeName(w) + ",") != std::string::npos;
}

}  // namespace

TEST(MatMulBench, DISABLED_DecodeBandwidth) {
  const int64_t rows = 2816, n_in = 1024;
  std::mt19937 rng(5);
  std::printf("target %s\n", ActiveTarget());
  for (DType w : moe::test::AllWeightTypes()) {
    if (!BenchSelected(w)) continue;
    const size_t w_row = RowBytes(w, n_in);
    const size_t mat_bytes = w_row * rows;
    const int copies = static_cast<int>(std::max<size_t>(1, (256u << 20) / mat_bytes));
    std::vector<uint8_t> wbuf(mat_bytes * copies);
    for (int64_t r = 0; r < rows; ++r) test::RandomRow(rng, w, n_in, wbuf.data() + r * w_row, false);
    for (int c = 1; c < copies; ++c) std::memcpy(wbuf.data() + c * mat_bytes, wbuf.data(), mat_bytes);
    const DType xt = VecDotType(w);
    std::vector<uint8_t> x(RowBytes(xt, n_in));
    test::RandomRow(rng, xt, n_in, x.data(), false);
    std::vector<float> y(rows);
    // The file's layout, then (where this CPU has one) the repacked layout the model loads.
    std::vector<uint8_t> tbuf;
    for (int pass = 0; pass < 2; ++pass) {
    const WeightLayout layout = pass ? RepackLayout(w, n_in, rows) : WeightLayout::kRows;
    if (pass && layout == WeightLayout::kRows) break;
    const uint8_t* base = wbuf.data();
    if (layout != WeightLayout::kRows) {
      tbuf.resize(wbuf.size() + 64);
      uint8_t* T = tbuf.data() + (64 - reinterpret_cast<uintptr_t>(tbuf.data()) % 64) % 64;
      for (int c = 0; c < copies; ++c) Repack(w, layout, wbuf.data() + c * mat_bytes, T + c * mat_bytes, n_in, rows);
      base = T;
    }
    for (int cold = 0; cold < 2; ++cold) {
      // Best of 5 runs of >= 0.2 s: the machine is shared, the best run is the kernel's speed.
      const int n_mats = cold ? copies : 1;
      double best = 0, best_cpu_us = 0;
      int iters = 0;
      for (int run = 0; run < 5; ++run) {
        const auto t0 = std::chrono::steady_clock::now();
        const double c0 = ThreadCpuSeconds();
        double secs = 0;
        int it = 0;
        do {
          MatMul(w, base + (iters % n_mats) * mat_bytes, n_in, 0, rows, x.data(),
                 x.size(), 1, y.data(), rows, layout);
          ++it;
          ++iters;
          secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        } while (secs < 0.2);
        const double gbs = mat_bytes * static_cast<double>(it) / secs * 1e-9;
        if (gbs > best) {
          best = gbs;
          best_cpu_us = (ThreadCpuSeconds() - c0) / it * 1e6;
        }
      }
      std::printf("%-5s%s %s: %7.2f GB/s  (%.1f us cpu per %zu KB matrix)\n", DTypeName(w),
                  pass ? " tiles" : "", cold ? "cold" : "hot ", best, best_cpu_us, mat_bytes >> 10);
    }
    }
  }
}
}  // namespace moe::kernels
#endif  // HWY_ONCE
