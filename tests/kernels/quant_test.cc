// Tests of the data-type layer (kernels/quant.cc, kernels/ref/quant_ref.h): binary16/bfloat16
// conversions against double-precision rounding, quantize/dequantize error bounds derived from
// each block's scale, exact bytes of hand-computed blocks, bit packing of the k-quants, and the
// activation conversions against scalar restatements of ggml's formulas on every SIMD target.
// Identity with ggml itself (dequantization bit for bit, quantizers byte for byte, products) is
// checked against ggml's own libraries in ggml_oracle_test.cc.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "hwy/tests/hwy_gtest.h"
#include "kernels/kernels.h"
#include "kernels/ref/quant_ref.h"
#include "kernels/weight_types.h"
#include "tensor/dtype.h"

namespace moe::kernels {
namespace {

uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round |x| (finite, as double) to a binary format with `mant_bits` stored mantissa bits and
// smallest normal exponent `emin`, to nearest even; values at or beyond `overflow` are inf.
// Pure double arithmetic: x is a float, so x / ulp is exact and nearbyint does the rounding.
double RoundToFormat(double x, int mant_bits, int emin, double overflow) {
  const double a = std::fabs(x);
  if (a == 0) return x;
  int ex;
  std::frexp(a, &ex);  // a = m * 2^ex, m in [0.5, 1)
  const int e = std::max(ex - 1, emin);
  const double ulp = std::ldexp(1.0, e - mant_bits);
  double v = std::nearbyint(a / ulp) * ulp;
  if (v >= overflow) v = std::numeric_limits<double>::infinity();
  return std::copysign(v, x);
}
double RoundToHalf(float f) { return RoundToFormat(f, 10, -14, 65536.0); }
double RoundToBF16(float f) { return RoundToFormat(f, 7, -126, std::ldexp(1.0, 128)); }

// ---------------------------------------------------------------------------------------------
// binary16

TEST(QuantF16, DecodeAllPatternsMatchesArithmetic) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = F16ToF32(static_cast<uint16_t>(h));
    const double want = ref::HalfValue<double>(static_cast<uint16_t>(h));
    if (std::isnan(want)) {
      ASSERT_TRUE(std::isnan(f)) << h;
      // Payload and sign carried over (what the hardware conversion does as well).
      ASSERT_EQ(Bits(f), ((h & 0x8000u) << 16) | 0x7f800000u | ((h & 0x3ffu) << 13)) << h;
    } else {
      ASSERT_EQ(static_cast<double>(f), want) << h;
      ASSERT_EQ(std::signbit(f), (h & 0x8000) != 0) << h;
    }
  }
}

// DequantizeRow's vectorised widening (embeddings, F16 KV caches) gives the scalar decoding for
// every bit pattern, at every offset of a row (the vector body and the scalar tail).
TEST(QuantF16, WidenMatchesScalarAllPatterns) {
  std::vector<uint16_t> h(65536 + 7);
  for (size_t i = 0; i < h.size(); ++i) h[i] = static_cast<uint16_t>(i);
  for (DType t : {DType::kF16, DType::kBF16})
  for (size_t off : {size_t{0}, size_t{3}}) {
    const int64_t n = 65536 + 4 - static_cast<int64_t>(off);
    std::vector<float> y(static_cast<size_t>(n));
    DequantizeRow(t, h.data() + off, y.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      const float want = t == DType::kF16 ? F16ToF32(h[off + i]) : BF16ToF32(h[off + i]);
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(y[i])) << "pattern " << h[off + i];
      } else {
        uint32_t a, b;
        std::memcpy(&a, &want, 4);
        std::memcpy(&b, &y[i], 4);
        ASSERT_EQ(a, b) << "pattern " << h[off + i];
      }
    }
  }
}

TEST(QuantF16, RoundTripAllPatterns) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const uint16_t back = F32ToF16(F16ToF32(static_cast<uint16_t>(h)));
    const bool nan = (h & 0x7c00) == 0x7c00 && (h & 0x3ff) != 0;
    ASSERT_EQ(back, nan ? (h | 0x200) : h) << h;  // NaNs come back quiet
  }
}

void ExpectF16Rounding(float f) {
  const uint16_t h = F32ToF16(f);
  if (std::isnan(f)) {
    EXPECT_TRUE(std::isnan(F16ToF32(h))) << f;
    return;
  }
  const double want = RoundToHalf(f);
  const double got = F16ToF32(h);
  ASSERT_EQ(got, want) << "f=" << f << " bits=0x" << std::hex << Bits(f);
  ASSERT_EQ(std::signbit(got), std::signbit(f)) << f;
}

TEST(QuantF16, EncodeMatchesDoubleRounding) {
  // Halfway points between every pair of adjacent non-negative halves (exact in float: 12
  // significant bits), and the floats just either side of them.
  for (uint32_t h = 0; h < 0x7c00; ++h) {
    const double lo = F16ToF32(static_cast<uint16_t>(h));
    const double hi = h + 1 == 0x7c00 ? 65536.0 : F16ToF32(static_cast<uint16_t>(h + 1));
    const float mid = static_cast<float>((lo + hi) / 2);
    ASSERT_EQ(static_cast<double>(mid), (lo + hi) / 2);
    for (float f : {mid, std::nextafter(mid, 0.f), std::nextafter(mid, 1e30f)}) {
      ExpectF16Rounding(f);
      ExpectF16Rounding(-f);
    }
  }
  const float inf = std::numeric_limits<float>::infinity();
  for (float f : {0.f, -0.f, 65504.f, 65519.996f, 65520.f, 65536.f, 1e10f, inf, -inf,
                  std::numeric_limits<float>::max(), 0x1p-24f, 0x1p-25f,
                  std::nextafter(0x1p-25f, 1.f), 0x1p-26f, 0x1p-14f,
                  std::nextafter(0x1p-14f, 0.f), std::numeric_limits<float>::denorm_min(),
                  std::numeric_limits<float>::min(), std::numeric_limits<float>::quiet_NaN()}) {
    ExpectF16Rounding(f);
    ExpectF16Rounding(-f);
  }
  std::mt19937 rng(1);
  for (int i = 0; i < 1000000; ++i) ExpectF16Rounding(FromBits(rng()));  // all exponents
  std::uniform_real_distribution<float> log2mag(-27.f, 17.f);
  for (int i = 0; i < 1000000; ++i) {  // the range halves cover, log-uniform
    const float f = std::exp2(log2mag(rng));
    ExpectF16Rounding(i & 1 ? f : -f);
  }
  // NaN: quiet, sign and the top payload bits kept (vcvtps2ph behaviour).
  EXPECT_EQ(F32ToF16(FromBits(0x7f800001u)), 0x7e00);
  EXPECT_EQ(F32ToF16(FromBits(0xffa02000u)), 0xff01);  // values from _cvtss_sh on x86
  EXPECT_EQ(F32ToF16(FromBits(0x7fffffffu)), 0x7fff);
  EXPECT_EQ(F32ToF16(FromBits(0x7fc00000u)), 0x7e00);
}

// ---------------------------------------------------------------------------------------------
// bfloat16

TEST(QuantBF16, RoundTripAllPatterns) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = BF16ToF32(static_cast<uint16_t>(h));
    ASSERT_EQ(Bits(f), h << 16);
    const bool nan = (h & 0x7f80) == 0x7f80 && (h & 0x7f) != 0;
    ASSERT_EQ(F32ToBF16(f), nan ? (h | 0x40) : h) << h;
  }
}

void ExpectBF16Rounding(float f) {
  const uint16_t h = F32ToBF16(f);
  if (std::isnan(f)) {
    EXPECT_EQ(h, static_cast<uint16_t>((Bits(f) >> 16) | 0x40));  // ggml: quiet, truncated
    return;
  }
  const double want = RoundToBF16(f);
  ASSERT_EQ(static_cast<double>(BF16ToF32(h)), want) << "bits=0x" << std::hex << Bits(f);
  ASSERT_EQ(std::signbit(BF16ToF32(h)), std::signbit(f));
}

TEST(QuantBF16, EncodeMatchesDoubleRounding) {
  std::mt19937 rng(2);
  for (int i = 0; i < 2000000; ++i) ExpectBF16Rounding(FromBits(rng()));
  // Exact halfway cases (low 16 bits = 0x8000) with even and odd kept parts, incl. subnormals
  // (not flushed) and the overflow to inf.
  for (uint32_t top : {0x0000u, 0x0001u, 0x3f80u, 0x3f81u, 0x7f7eu, 0x7f7fu, 0x0080u, 0x007fu}) {
    for (uint32_t low : {0x7fffu, 0x8000u, 0x8001u}) {
      ExpectBF16Rounding(FromBits((top << 16) | low));
      ExpectBF16Rounding(FromBits(0x80000000u | (top << 16) | low));
    }
  }
  EXPECT_EQ(F32ToBF16(FromBits(0x3f808000u)), 0x3f80);  // tie, even kept part: down
  EXPECT_EQ(F32ToBF16(FromBits(0x3f818000u)), 0x3f82);  // tie, odd kept part: up
  EXPECT_EQ(F32ToBF16(FromBits(0x7f7f8000u)), 0x7f80);  // rounds to inf
  EXPECT_EQ(F32ToBF16(FromBits(0x00018000u)), 0x0002);  // subnormal, not flushed
  EXPECT_EQ(F32ToBF16(FromBits(0x7f800001u)), 0x7fc0);
  for (float f : {std::numeric_limits<float>::infinity(), -0.f,
                  std::numeric_limits<float>::quiet_NaN()}) {
    ExpectBF16Rounding(f);
  }
}

// ---------------------------------------------------------------------------------------------
// test data

enum class Dist { kNormal, kUniform, kOutliers, kZeros, kConstant, kNegConstant, kTiny, kWide };
const Dist kAllDists[] = {Dist::kNormal,   Dist::kUniform,     Dist::kOutliers, Dist::kZeros,
                          Dist::kConstant, Dist::kNegConstant, Dist::kTiny,     Dist::kWide};
const char* DistName(Dist d) {
  static const char* names[] = {"normal",   "uniform",     "outliers", "zeros",
                                "constant", "negconstant", "tiny",     "wide"};
  return names[static_cast<int>(d)];
}

std::vector<float> MakeRow(Dist dist, int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uni(-1.f, 1.f);
  std::vector<float> x(static_cast<size_t>(n));
  for (auto& v : x) {
    switch (dist) {
      case Dist::kNormal: v = normal(rng); break;
      case Dist::kUniform: v = uni(rng); break;
      case Dist::kOutliers: v = (rng() % 64 == 0) ? 40.f * normal(rng) : normal(rng); break;
      case Dist::kZeros: v = 0.f; break;
      case Dist::kConstant: v = 0.75f; break;
      case Dist::kNegConstant: v = -2.5f; break;
      case Dist::kTiny: v = 1e-3f * normal(rng); break;  // d stays a normal f16
      case Dist::kWide: v = std::exp2(8.f * uni(rng)) * (rng() & 1 ? 1.f : -1.f); break;
    }
  }
  return x;
}

// Quantizes then dequantizes with the row placed at a misaligned address.
std::vector<float> RoundTrip(DType t, const std::vector<float>& x, std::vector<uint8_t>* bytes) {
  const int64_t n = static_cast<int64_t>(x.size());
  const size_t nbytes = RowBytes(t, n);
  std::vector<uint8_t> buf(nbytes + 1);
  QuantizeRow(t, x.data(), buf.data() + 1, n);
  std::vector<float> y(x.size() + 1);
  DequantizeRow(t, buf.data() + 1, y.data() + 1, n);
  bytes->assign(buf.begin() + 1, buf.end());
  return std::vector<float>(y.begin() + 1, y.end());
}

double Rms(const float* x, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
  return n ? std::sqrt(s / n) : 0;
}

// ---------------------------------------------------------------------------------------------
// quantize -> dequantize error bounds

TEST(QuantRoundTrip, PlainTypes) {
  for (Dist dist : kAllDists) {
    const std::vector<float> x = MakeRow(dist, 77, 10);
    std::vector<uint8_t> bytes;
    std::vector<float> y = RoundTrip(DType::kF32, x, &bytes);
    EXPECT_EQ(0, std::memcmp(x.data(), y.data(), x.size() * 4));
    y = RoundTrip(DType::kF16, x, &bytes);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(static_cast<double>(y[i]), RoundToHalf(x[i]));
    y = RoundTrip(DType::kBF16, x, &bytes);
    for (size_t i = 0; i < x.size(); ++i) ASSERT_EQ(static_cast<double>(y[i]), RoundToBF16(x[i]));
  }
}

TEST(QuantRoundTrip, Q8_0WithinHalfStep) {
  for (Dist dist : kAllDists) {
    for (int nb : {0, 1, 2, 3, 7}) {
      const std::vector<float> x = MakeRow(dist, nb * 32, 100 + nb);
      std::vector<uint8_t> bytes;
      const std::vector<float> y = RoundTrip(DType::kQ8_0, x, &bytes);
      for (int b = 0; b < nb; ++b) {
        double amax = 0;
        for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(double(x[32 * b + j])));
        const double d = amax / 127;  // the exact step
        uint16_t dh;
        std::memcpy(&dh, &bytes[34 * b], 2);
        const double dq = F16ToF32(dh);
        // Half a step, plus what storing d in f16 moves the largest level, plus float rounding.
        const double bound = 0.5 * d * (1 + 1e-5) + 127 * std::fabs(dq - d) + 1e-7 * amax;
        for (int j = 0; j < 32; ++j) {
          const int i = 32 * b + j;
          ASSERT_LE(std::fabs(double(y[i]) - x[i]), bound)
              << DistName(dist) << " block " << b << " j " << j;
        }
      }
    }
  }
}

TEST(QuantRoundTrip, Q4_0WithinHalfStep) {
  for (Dist dist : kAllDists) {
    for (int nb : {0, 1, 2, 5}) {
      const std::vector<float> x = MakeRow(dist, nb * 32, 200 + nb);
      std::vector<uint8_t> bytes;
      const std::vector<float> y = RoundTrip(DType::kQ4_0, x, &bytes);
      for (int b = 0; b < nb; ++b) {
        double m = 0;  // signed value of largest magnitude
        for (int j = 0; j < 32; ++j) {
          if (std::fabs(x[32 * b + j]) > std::fabs(m)) m = x[32 * b + j];
        }
        const double d = m / -8;
        uint16_t dh;
        std::memcpy(&dh, &bytes[18 * b], 2);
        const double dq = F16ToF32(dh);
        for (int j = 0; j < 32; ++j) {
          const int i = 32 * b + j;
          // Levels cover t = x/d in [-8, 7]: half a step inside, up to 1 step at t in (7.5, 8].
          const double t = d != 0 ? x[i] / d : 0;
          const double bound = std::fabs(d) * (std::max(0.5, t - 7) + 1e-5) +
                               8 * std::fabs(dq - d) + 1e-7 * std::fabs(m);
          ASSERT_LE(std::fabs(double(y[i]) - x[i]), bound)
              << DistName(dist) << " block " << b << " j " << j;
        }
      }
    }
  }
}

// Relative RMSE bounds for the k-quants: a sanity check of the error's size (the bytes are ggml's,
// ggml_oracle_test.cc). Measured over 64 super-blocks per distribution (q4_K normal 0.072,
// uniform 0.055, outliers 0.096, wide 0.075; q5_K 0.040, 0.029, 0.052, 0.046; q6_K 0.018, 0.013,
// 0.034, 0.019), plus ~25% margin; q2_K and q3_K from 1..3 super-blocks (q2_K normal 0.31,
// uniform 0.26, outliers 0.30, wide 0.47; q3_K 0.152, 0.130, 0.099, 0.136; iq4_nl and iq4_xs
// 0.079 / 0.083, 0.065, 0.110, 0.077).
// Per-block bounds are 1.3x (worst single blocks measured within 1.15x).
struct KBound {
  Dist dist;
  double q2k, q3k, q4k, q5k, q6k, iq4nl, iq4xs;
};
const KBound kKBounds[] = {
    {Dist::kNormal, 0.37, 0.19, 0.09, 0.05, 0.023, 0.1, 0.1},
    {Dist::kUniform, 0.33, 0.16, 0.07, 0.036, 0.017, 0.082, 0.082},
    {Dist::kOutliers, 0.37, 0.125, 0.12, 0.065, 0.042, 0.14, 0.14},
    {Dist::kTiny, 0.37, 0.19, 0.09, 0.05, 0.023, 0.1, 0.1},
    {Dist::kWide, 0.55, 0.17, 0.095, 0.058, 0.024, 0.097, 0.097},
    {Dist::kConstant, 0.002, 0.002, 0.002, 0.002, 0.002, 0.002, 0.002},
    {Dist::kNegConstant, 0.002, 0.002, 0.002, 0.002, 0.002, 0.002, 0.002},
};

double KBoundFor(const KBound& kb, DType t) {
  switch (t) {
    case DType::kQ2_K: return kb.q2k;
    case DType::kQ3_K: return kb.q3k;
    case DType::kQ4_K: return kb.q4k;
    case DType::kQ5_K: return kb.q5k;
    case DType::kIQ4_NL: return kb.iq4nl;
    case DType::kIQ4_XS: return kb.iq4xs;
    default: return kb.q6k;
  }
}

void CheckKQuant(DType t) {
  for (const KBound& kb : kKBounds) {
    for (int nb : {1, 2, 3}) {
      const std::vector<float> x = MakeRow(kb.dist, nb * 256, 300 + nb);
      std::vector<uint8_t> bytes;
      const std::vector<float> y = RoundTrip(t, x, &bytes);
      std::vector<float> err(x.size());
      for (size_t i = 0; i < x.size(); ++i) err[i] = y[i] - x[i];
      const double rel = Rms(err.data(), err.size()) / Rms(x.data(), x.size());
      const double bound = KBoundFor(kb, t);
      EXPECT_LT(rel, bound) << DTypeName(t) << " " << DistName(kb.dist) << " nb=" << nb;
      // Per super-block too: one bad block must not hide in a row average.
      for (int b = 0; b < nb; ++b) {
        const double rb = Rms(err.data() + 256 * b, 256) / Rms(x.data() + 256 * b, 256);
        EXPECT_LT(rb, 1.3 * bound) << DTypeName(t) << " " << DistName(kb.dist) << " block " << b;
      }
    }
  }
  for (int nb : {0, 1, 2}) {  // zeros come back exactly
    const std::vector<float> x(static_cast<size_t>(nb) * 256, 0.f);
    std::vector<uint8_t> bytes;
    const std::vector<float> y = RoundTrip(t, x, &bytes);
    for (float v : y) ASSERT_EQ(v, 0.f);
  }
}

TEST(QuantRoundTrip, Q2_KRelativeRmse) { CheckKQuant(DType::kQ2_K); }
TEST(QuantRoundTrip, Q3_KRelativeRmse) { CheckKQuant(DType::kQ3_K); }
TEST(QuantRoundTrip, Q4_KRelativeRmse) { CheckKQuant(DType::kQ4_K); }
TEST(QuantRoundTrip, Q5_KRelativeRmse) { CheckKQuant(DType::kQ5_K); }
TEST(QuantRoundTrip, Q6_KRelativeRmse) { CheckKQuant(DType::kQ6_K); }
TEST(QuantRoundTrip, IQ4_NLRelativeRmse) { CheckKQuant(DType::kIQ4_NL); }
TEST(QuantRoundTrip, IQ4_XSRelativeRmse) { CheckKQuant(DType::kIQ4_XS); }

// q4_K: every element within one step d*sc of its sub-block (levels 0..15 span the range
// [-dmin*m, d*sc*15 - dmin*m], which must cover the data up to rounding of the 6-bit scales).
TEST(QuantRoundTrip, Q4_KElementsNearGrid) {
  const std::vector<float> x = MakeRow(Dist::kNormal, 4 * 256, 42);
  std::vector<uint8_t> bytes;
  const std::vector<float> y = RoundTrip(DType::kQ4_K, x, &bytes);
  for (int b = 0; b < 4; ++b) {
    BlockQ4_K blk;
    std::memcpy(&blk, &bytes[144 * b], sizeof(blk));
    for (int j = 0; j < 8; ++j) {
      uint8_t sc, m;
      ref::GetScaleMinK4(j, blk.scales, &sc, &m);
      const double step = double(F16ToF32(blk.d)) * sc;
      for (int l = 0; l < 32; ++l) {
        const int i = 256 * b + 32 * j + l;
        ASSERT_LE(std::fabs(double(y[i]) - x[i]), 1.5 * step) << "block " << b << " sub " << j;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// exact bytes, hand-computed

std::vector<uint8_t> Q8_0Bytes(uint16_t d, const std::vector<int>& qs) {
  std::vector<uint8_t> out = {static_cast<uint8_t>(d & 0xff), static_cast<uint8_t>(d >> 8)};
  for (int q : qs) out.push_back(static_cast<uint8_t>(static_cast<int8_t>(q)));
  return out;
}

TEST(QuantExact, Q8_0HandBlock) {
  // amax = 127 gives d = 1 (f16 0x3c00) in both formulas; x * id is then x itself, so the
  // halves show the rounding rule: weights round half away from zero (roundf), activations
  // half to even (the AVX2 path's _mm256_round_ps).
  std::vector<float> x = {127.f, 2.5f, -3.5f, 0.5f, -0.5f, 1.49f, -126.5f, 64.f, 0.f, -0.f};
  x.resize(32, 10.5f);
  const std::vector<int> weight_q = {127, 3, -4, 1, -1, 1, -127, 64, 0, 0};
  const std::vector<int> act_q = {127, 2, -4, 0, 0, 1, -126, 64, 0, 0};
  std::vector<int> wq = weight_q, aq = act_q;
  wq.resize(32, 11);
  aq.resize(32, 10);
  std::vector<uint8_t> got(34);
  QuantizeRow(DType::kQ8_0, x.data(), got.data(), 32);
  EXPECT_EQ(got, Q8_0Bytes(0x3c00, wq));
  ConvertActivations(DType::kQ8_0, x.data(), got.data(), 32);
  EXPECT_EQ(got, Q8_0Bytes(0x3c00, aq));
  ConvertActivations(DType::kQ4_0, x.data(), got.data(), 32);  // same vec-dot type
  EXPECT_EQ(got, Q8_0Bytes(0x3c00, aq));
}

TEST(QuantExact, Q8_0GenericScaleFromFormula) {
  // A non-trivial scale: expected bytes from the formula, computed here in float as written in
  // ggml (d = amax / 127; weights: q = roundf(x * (1 / d)); activations: nearbyint(x * (127 /
  // amax))), with d stored by F32ToF16 (tested above).
  std::vector<float> x(32);
  for (int j = 0; j < 32; ++j) x[j] = 3.1f * std::sin(0.7f * j + 0.3f);
  float amax = 0;
  for (float v : x) amax = std::max(amax, std::fabs(v));
  const float d = amax / 127.f;
  std::vector<int> wq(32), aq(32);
  for (int j = 0; j < 32; ++j) {
    wq[j] = static_cast<int>(std::round(x[j] * (1.0f / d)));
    aq[j] = static_cast<int>(std::nearbyint(x[j] * (127.f / amax)));
  }
  std::vector<uint8_t> got(34);
  QuantizeRow(DType::kQ8_0, x.data(), got.data(), 32);
  EXPECT_EQ(got, Q8_0Bytes(F32ToF16(d), wq));
  ConvertActivations(DType::kQ8_0, x.data(), got.data(), 32);
  EXPECT_EQ(got, Q8_0Bytes(F32ToF16(d), aq));
}

TEST(QuantExact, Q4_0HandBlock) {
  // Largest magnitude is -8 -> d = -8 / -8 = 1 (0x3c00); level = min(15, floor(x + 8.5)).
  std::vector<float> x(32, 0.f);
  const float lo[16] = {-8.f, 7.4f, 7.6f, 0.f, 0.5f, -0.5f, 2.49f, -7.5f,
                        1.5f, -1.5f, 3.f, -2.f, 6.5f, -6.51f, 0.25f, 4.f};
  const float hi[16] = {3.f, -4.f, 5.f, 7.9f, -7.9f, 0.49f, 1.f, 2.f,
                        -3.f, 6.f, -5.f, 0.f, 2.5f, -2.5f, 7.f, -7.f};
  const int lo_q[16] = {0, 15, 15, 8, 9, 8, 10, 1, 10, 7, 11, 6, 15, 1, 8, 12};
  const int hi_q[16] = {11, 4, 13, 15, 0, 8, 9, 10, 5, 14, 3, 8, 11, 6, 15, 1};
  for (int j = 0; j < 16; ++j) {
    x[j] = lo[j];
    x[j + 16] = hi[j];
  }
  std::vector<uint8_t> want = {0x00, 0x3c};
  for (int j = 0; j < 16; ++j) want.push_back(static_cast<uint8_t>(lo_q[j] | (hi_q[j] << 4)));
  std::vector<uint8_t> got(18);
  QuantizeRow(DType::kQ4_0, x.data(), got.data(), 32);
  EXPECT_EQ(got, want);
  // Positive extreme: m = 4 -> d = -0.5 (0xb800); x = 4 -> level 0, x = -4 -> 16 -> 15.
  std::vector<float> y(32, 0.f);
  y[0] = 4.f;
  y[1] = -4.f;
  y[17] = 1.f;  // t = 1 / -0.5 = -2 -> 6
  QuantizeRow(DType::kQ4_0, y.data(), got.data(), 32);
  std::vector<uint8_t> want2 = {0x00, 0xb8, static_cast<uint8_t>(0 | (8 << 4)),
                                static_cast<uint8_t>(15 | (6 << 4))};
  for (int j = 2; j < 16; ++j) want2.push_back(0x88);
  EXPECT_EQ(got, want2);
}

// ---------------------------------------------------------------------------------------------
// k-quant packing

TEST(QuantPacking, Q4_KScaleMinRoundTrip) {
  std::mt19937 rng(5);
  for (int trial = 0; trial < 2000; ++trial) {
    uint8_t sc[8], m[8];
    for (int j = 0; j < 8; ++j) {
      sc[j] = rng() & 63;
      m[j] = rng() & 63;
    }
    if (trial == 0) std::fill(sc, sc + 8, 63), std::fill(m, m + 8, 63);
    uint8_t packed[12];
    ref::PackScaleMinK4(sc, m, packed);
    // The packing rule as GGUF-MOE.md §7 states it.
    uint8_t doc[12] = {};
    for (int j = 0; j < 8; ++j) {
      if (j < 4) {
        doc[j] = sc[j];
        doc[j + 4] = m[j];
      } else {
        doc[j + 4] = static_cast<uint8_t>((sc[j] & 0xF) | ((m[j] & 0xF) << 4));
        doc[j - 4] |= static_cast<uint8_t>((sc[j] >> 4) << 6);
        doc[j] |= static_cast<uint8_t>((m[j] >> 4) << 6);
      }
    }
    ASSERT_EQ(0, std::memcmp(packed, doc, 12));
    for (int j = 0; j < 8; ++j) {
      uint8_t s2, m2;
      ref::GetScaleMinK4(j, packed, &s2, &m2);
      ASSERT_EQ(s2, sc[j]);
      ASSERT_EQ(m2, m[j]);
    }
  }
}

TEST(QuantPacking, Q4_KQuantsAndDequantFormula) {
  std::mt19937 rng(6);
  uint8_t L[256], sc[8], m[8];
  for (auto& l : L) l = rng() & 15;
  for (int j = 0; j < 8; ++j) sc[j] = rng() & 63, m[j] = rng() & 63;
  BlockQ4_K blk;
  blk.d = F32ToF16(0.0123f);
  blk.dmin = F32ToF16(0.0456f);
  ref::PackScaleMinK4(sc, m, blk.scales);
  ref::PackQ4KQuants(L, blk.qs);
  float y[256];
  DequantizeRow(DType::kQ4_K, &blk, y, 256);
  const float d = F16ToF32(blk.d), dmin = F16ToF32(blk.dmin);
  for (int i = 0; i < 256; ++i) {
    const int j = i / 32;  // sub-block; chunk c = j / 2 holds it in the low (even j) nibbles
    const int nib = (j % 2 == 0) ? (blk.qs[32 * (j / 2) + i % 32] & 0xF)
                                 : (blk.qs[32 * (j / 2) + i % 32] >> 4);
    ASSERT_EQ(nib, L[i]);
    const float want = (d * sc[j]) * static_cast<float>(L[i]) - dmin * m[j];
    ASSERT_EQ(Bits(y[i]), Bits(want)) << i;
  }
}

TEST(QuantPacking, Q6_KQuantsAndDequantFormula) {
  std::mt19937 rng(7);
  uint8_t L[256];
  for (auto& l : L) l = rng() & 63;
  BlockQ6_K blk;
  ref::PackQ6KQuants(L, blk.ql, blk.qh);
  for (int j = 0; j < 16; ++j) blk.scales[j] = static_cast<int8_t>(rng() % 256 - 128);
  blk.d = F32ToF16(-0.00731f);
  float y[256];
  DequantizeRow(DType::kQ6_K, &blk, y, 256);
  const float d = F16ToF32(blk.d);
  for (int i = 0; i < 256; ++i) {
    // Element i: half h = i / 128, row r = (i % 128) / 32, lane l = i % 32; sub-block i / 16.
    const int h = i / 128, r = (i % 128) / 32, l = i % 32;
    const uint8_t qlb = blk.ql[64 * h + l + (r & 1) * 32];
    const int lo = r < 2 ? (qlb & 0xF) : (qlb >> 4);
    const int hi2 = (blk.qh[32 * h + l] >> (2 * r)) & 3;
    ASSERT_EQ(lo | (hi2 << 4), L[i]) << i;
    const float want = d * static_cast<float>(blk.scales[i / 16]) * static_cast<float>(L[i] - 32);
    ASSERT_EQ(Bits(y[i]), Bits(want)) << i;
  }
}

// ---------------------------------------------------------------------------------------------
// DequantizeRow: float vs double reference, and random (not quantizer-made) blocks

uint16_t RandomFiniteHalf(std::mt19937& rng) {
  for (;;) {
    const uint16_t h = static_cast<uint16_t>(rng());
    if ((h & 0x7c00) != 0x7c00) return h;
  }
}

std::vector<uint8_t> RandomBlocks(DType t, int nb, std::mt19937& rng) {
  const size_t bb = Traits(t).block_bytes;
  std::vector<uint8_t> buf(bb * nb);
  for (auto& v : buf) v = static_cast<uint8_t>(rng());
  for (int b = 0; b < nb; ++b) {  // make the scales finite
    uint8_t* p = buf.data() + bb * b;
    moe::test::SetHalfScales(t, p, [&] { return RandomFiniteHalf(rng); });
    switch (t) {
      case DType::kQ8_K: {
        const float d = std::ldexp(1.f, static_cast<int>(rng() % 40) - 30) * 1.37f;
        std::memcpy(p, &d, 4);
        break;
      }
      default: break;
    }
  }
  return buf;
}

TEST(QuantDequant, FloatMatchesDoubleReference) {
  std::mt19937 rng(8);
  std::vector<DType> types = moe::test::AllWeightTypes(/*include_f32=*/false);
  types.push_back(DType::kQ8_K);
  for (DType t : types) {
    const int64_t bs = Traits(t).block_size;
    for (int nb : {0, 1, 3}) {
      const int64_t n = (bs == 1 ? 64 : bs) * nb;
      std::vector<uint8_t> buf = RandomBlocks(t, static_cast<int>(RowBytes(t, n) /
                                                                  Traits(t).block_bytes), rng);
      if (t == DType::kF16) {
        for (int64_t i = 0; i < n; ++i) {
          const uint16_t h = RandomFiniteHalf(rng);
          std::memcpy(&buf[2 * i], &h, 2);
        }
      }
      if (t == DType::kBF16) {
        for (int64_t i = 0; i < n; ++i) buf[2 * i + 1] &= 0x7e;  // finite exponents
      }
      std::vector<uint8_t> shifted(buf.size() + 3);  // misaligned source
      if (!buf.empty()) std::memcpy(shifted.data() + 3, buf.data(), buf.size());
      std::vector<float> y(n);
      std::vector<double> yd(n);
      DequantizeRow(t, shifted.data() + 3, y.data(), n);
      ref::DequantizeRow<double>(t, buf.data(), yd.data(), n);
      // Float evaluates the same expression as double with at most 3 roundings; q4_K/q5_K's
      // d*sc*q - dmin*m can cancel, so its tolerance scales with both terms.
      std::vector<double> mag(n);
      for (int64_t i = 0; i < n; ++i) mag[i] = std::fabs(yd[i]);
      for (int64_t i = 0; i < n; ++i) {
        const double c = ref::OffsetTerm(t, buf.data(), i);
        mag[i] = std::fabs(yd[i] - c) + std::fabs(c);
      }
      for (int64_t i = 0; i < n; ++i) {
        const double tol = 3 * std::numeric_limits<float>::epsilon() * mag[i];
        ASSERT_LE(std::fabs(y[i] - yd[i]), tol) << DTypeName(t) << " i " << i;
        if (t == DType::kF16 || t == DType::kBF16) {
          ASSERT_EQ(double(y[i]), yd[i]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// activations, on every compiled SIMD target

// Scalar restatement of ggml's x86 quantize_row_q8_0 for finite rows whose 127/amax is finite.
std::vector<uint8_t> ExpectedActQ8_0(const float* x, int64_t n) {
  std::vector<uint8_t> out;
  for (int64_t b = 0; b < n / 32; ++b) {
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[32 * b + j]));
    const float id = amax != 0 ? 127.f / amax : 0.f;
    std::vector<int> q(32);
    for (int j = 0; j < 32; ++j) {
      q[j] = std::clamp(static_cast<int>(std::nearbyint(x[32 * b + j] * id)), -128, 127);
    }
    const std::vector<uint8_t> blk = Q8_0Bytes(F32ToF16(amax / 127.f), q);
    out.insert(out.end(), blk.begin(), blk.end());
  }
  return out;
}

// Scalar restatement of quantize_row_q8_K_ref for finite rows (nearest_int == nearbyint there).
std::vector<uint8_t> ExpectedActQ8_K(const float* x, int64_t n) {
  std::vector<uint8_t> out;
  for (int64_t b = 0; b < n / 256; ++b) {
    const float* xb = x + 256 * b;
    BlockQ8_K blk;
    std::memset(&blk, 0, sizeof(blk));
    int arg = -1;
    for (int j = 0; j < 256; ++j) {
      if (std::fabs(xb[j]) > (arg < 0 ? 0.f : std::fabs(xb[arg]))) arg = j;
    }
    if (arg >= 0) {
      const float iscale = -127.f / xb[arg];
      for (int j = 0; j < 256; ++j) {
        blk.qs[j] = static_cast<int8_t>(std::min(127, static_cast<int>(std::nearbyint(iscale * xb[j]))));
      }
      for (int g = 0; g < 16; ++g) {
        int s = 0;
        for (int l = 0; l < 16; ++l) s += blk.qs[16 * g + l];
        blk.bsums[g] = static_cast<int16_t>(s);
      }
      blk.d = 1 / iscale;
    }
    const uint8_t* p = reinterpret_cast<const uint8_t*>(&blk);
    out.insert(out.end(), p, p + sizeof(blk));
  }
  return out;
}

// q8_1: q8_0's quants plus s = f16(d * sum(q)) with the unrounded d = amax / 127.
std::vector<uint8_t> ExpectedActQ8_1(const float* x, int64_t n) {
  const std::vector<uint8_t> q8_0 = ExpectedActQ8_0(x, n);
  std::vector<uint8_t> out;
  for (int64_t b = 0; b < n / 32; ++b) {
    BlockQ8_0 blk0;
    std::memcpy(&blk0, &q8_0[b * sizeof(BlockQ8_0)], sizeof(blk0));
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[32 * b + j]));
    int sum = 0;
    for (int8_t q : blk0.qs) sum += q;
    BlockQ8_1 blk;
    blk.d = blk0.d;
    blk.s = F32ToF16(amax / 127.f * static_cast<float>(sum));
    std::memcpy(blk.qs, blk0.qs, sizeof(blk.qs));
    const uint8_t* p = reinterpret_cast<const uint8_t*>(&blk);
    out.insert(out.end(), p, p + sizeof(blk));
  }
  return out;
}

std::vector<uint8_t> ExpectedAct(DType w, const float* x, int64_t n) {
  switch (VecDotType(w)) {
    case DType::kQ8_0: return ExpectedActQ8_0(x, n);
    case DType::kQ8_1: return ExpectedActQ8_1(x, n);
    case DType::kQ8_K: return ExpectedActQ8_K(x, n);
    default: break;
  }
  std::vector<uint8_t> out;
  for (int64_t i = 0; i < n; ++i) {
    if (w == DType::kF32) {
      const uint8_t* p = reinterpret_cast<const uint8_t*>(x + i);
      out.insert(out.end(), p, p + 4);
    } else {
      const uint16_t h = w == DType::kF16 ? F32ToF16(x[i]) : F32ToBF16(x[i]);
      out.push_back(static_cast<uint8_t>(h & 0xff));
      out.push_back(static_cast<uint8_t>(h >> 8));
    }
  }
  return out;
}

// Converts x at misaligned input (x + 1 float) and output (+1 byte) addresses.
std::vector<uint8_t> Convert(DType w, const std::vector<float>& x) {
  const int64_t n = static_cast<int64_t>(x.size());
  std::vector<float> xin(x.size() + 1);
  std::copy(x.begin(), x.end(), xin.begin() + 1);
  const size_t nbytes = ActivationRowBytes(w, n);
  std::vector<uint8_t> buf(nbytes + 1, 0xcd);
  ConvertActivations(w, xin.data() + 1, buf.data() + 1, n);
  return std::vector<uint8_t>(buf.begin() + 1, buf.end());
}

class QuantActivations : public hwy::TestWithParamTarget {};
HWY_TARGET_INSTANTIATE_TEST_SUITE_P(QuantActivations);

TEST_P(QuantActivations, MatchScalarFormula) {
  for (DType w : moe::test::AllWeightTypes()) {
    const int64_t block = Traits(VecDotType(w)).block_size;
    const int64_t bs = block == 1 ? 32 : block;
    for (Dist dist : kAllDists) {
      for (int nb : {0, 1, 2, 3, 5}) {
        const int64_t n = bs * nb + (block == 1 ? 7 : 0);
        const std::vector<float> x = MakeRow(dist, n, 400 + nb);
        ASSERT_EQ(Convert(w, x), ExpectedAct(w, x.data(), n))
            << DTypeName(w) << " " << DistName(dist) << " nb=" << nb;
      }
    }
  }
}

TEST_P(QuantActivations, HalfwayCasesRoundToEven) {
  // amax = 127 -> multiplier 1 (q8_0) and -1 (q8_K: iscale = -127 / 127): every x.5 is a tie.
  std::vector<float> x(512);
  for (int i = 0; i < 512; ++i) x[i] = (i % 32 == 0) ? 127.f : static_cast<float>(i % 120) - 59.5f;
  EXPECT_EQ(Convert(DType::kQ8_0, x), ExpectedActQ8_0(x.data(), 512));
  EXPECT_EQ(Convert(DType::kQ6_K, x), ExpectedActQ8_K(x.data(), 512));
  std::vector<uint8_t> got = Convert(DType::kQ8_0, x);
  EXPECT_EQ(static_cast<int8_t>(got[2 + 1]), -58);  // x[1] = -58.5 -> -58 (even)
  EXPECT_EQ(static_cast<int8_t>(got[2 + 2]), -58);  // x[2] = -57.5 -> -58
  got = Convert(DType::kQ4_K, x);
  BlockQ8_K blk;
  std::memcpy(&blk, got.data(), sizeof(blk));
  EXPECT_EQ(blk.d, -1.f);
  EXPECT_EQ(blk.qs[0], -127);
  EXPECT_EQ(blk.qs[1], 58);  // -(-58.5) -> 58
  EXPECT_EQ(blk.qs[2], 58);  // 57.5 -> 58
  for (int g = 0; g < 16; ++g) {
    int s = 0;
    for (int l = 0; l < 16; ++l) s += blk.qs[16 * g + l];
    EXPECT_EQ(blk.bsums[g], s);
  }
}

TEST_P(QuantActivations, Q8_KFirstLargestMagnitudeSetsSign) {
  // Equal magnitudes of both signs: ggml takes the first (scan with '>'), so the scale's sign
  // follows it and that element maps to -127.
  std::vector<float> x(256, 0.25f);
  x[10] = -3.f;
  x[200] = 3.f;
  std::vector<uint8_t> got = Convert(DType::kQ4_K, x);
  EXPECT_EQ(got, ExpectedActQ8_K(x.data(), 256));
  BlockQ8_K blk;
  std::memcpy(&blk, got.data(), sizeof(blk));
  EXPECT_EQ(blk.qs[10], -127);
  EXPECT_EQ(blk.qs[200], 127);
  EXPECT_GT(blk.d, 0.f);
}

TEST_P(QuantActivations, SpecialValuesFollowX86Semantics) {
  const float inf = std::numeric_limits<float>::infinity();
  // q8_0 with an inf: amax = inf, d = inf, id = 127 / inf = 0; inf * 0 = NaN, which cvtps2dq
  // turns into 0x80000000 and the saturating packs into -128; the rest become 0.
  std::vector<float> x(64, 1.f);
  x[5] = inf;
  // Second block: amax = 1e-38, 127 / amax overflows to inf: nonzero x -> +-inf, 0 -> NaN,
  // all saturate to -128 except +inf -> 0x80000000 too (cvtps2dq has one "invalid" value).
  for (int j = 32; j < 64; ++j) x[j] = (j % 3 == 0) ? 0.f : 1e-38f;
  std::vector<uint8_t> got = Convert(DType::kQ8_0, x);
  std::vector<int> q0(32, 0), q1(32, -128);
  q0[5] = -128;
  std::vector<uint8_t> want = Q8_0Bytes(0x7c00, q0);
  const std::vector<uint8_t> want1 = Q8_0Bytes(F32ToF16(1e-38f / 127.f), q1);
  want.insert(want.end(), want1.begin(), want1.end());
  EXPECT_EQ(got, want);
  // q8_K with max = 1e-38: iscale = -inf; nearest_int's float trick maps +-inf and NaN to values
  // whose low byte is 0, so every qs is 0 and d = 1 / -inf = -0.
  std::vector<float> k(256, 0.f);
  for (int j = 0; j < 256; j += 2) k[j] = 1e-38f;
  got = Convert(DType::kQ6_K, k);
  BlockQ8_K blk;
  std::memcpy(&blk, got.data(), sizeof(blk));
  EXPECT_EQ(Bits(blk.d), 0x80000000u);
  for (int j = 0; j < 256; ++j) ASSERT_EQ(blk.qs[j], 0) << j;
  for (int g = 0; g < 16; ++g) ASSERT_EQ(blk.bsums[g], 0);
  // NaN inputs. q8_0, AVX2 lane semantics (maxps returns its second operand on NaN): a NaN in
  // the first of the four vectors is replaced by the next vector's lane, so amax is that of the
  // other values and the NaN itself becomes -128; a NaN in the last vector survives to amax,
  // making d = NaN (f16 0x7e00) and every q -128 (127 / NaN = NaN).
  const float qnan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> nanrow(256);
  for (int j = 0; j < 256; ++j) nanrow[j] = (j % 32 == 0) ? 127.f : float(j % 120) - 59.5f;
  nanrow[3] = qnan;
  nanrow[32 + 27] = qnan;
  got = Convert(DType::kQ8_0, nanrow);
  std::vector<float> clean(nanrow.begin(), nanrow.begin() + 32);
  clean[3] = 0.f;
  std::vector<uint8_t> want_nan = ExpectedActQ8_0(clean.data(), 32);
  want_nan[2 + 3] = 0x80;  // -128
  const std::vector<uint8_t> all_m128 = Q8_0Bytes(0x7e00, std::vector<int>(32, -128));
  want_nan.insert(want_nan.end(), all_m128.begin(), all_m128.end());
  EXPECT_EQ(std::vector<uint8_t>(got.begin(), got.begin() + 68), want_nan);
  // q8_K (reference semantics): the '>' scan skips NaN, and nearest_int's float trick turns a
  // NaN product into 0; the rest rounds half to even with the scale of the other values.
  got = Convert(DType::kQ4_K, nanrow);
  clean.assign(nanrow.begin(), nanrow.end());
  clean[3] = clean[32 + 27] = 0.f;
  want_nan = ExpectedActQ8_K(clean.data(), 256);
  EXPECT_EQ(got, want_nan);
  got = Convert(DType::kF16, nanrow);
  uint16_t h;
  std::memcpy(&h, &got[6], 2);
  EXPECT_TRUE(std::isnan(F16ToF32(h)));
  EXPECT_EQ(got, ExpectedAct(DType::kF16, nanrow.data(), 256));
  // NaN payloads, signs, infinities and f16 subnormals: the hardware conversion (vcvtps2ph on
  // AVX2/AVX-512) must agree with the scalar F32ToF16 lane for lane.
  const uint32_t specials[] = {0x7f800001u, 0xffa02000u, 0x7fffffffu, 0xff800000u, 0x7f800000u,
                               0x33000001u, 0x33800000u, 0x387fe000u, 0x477ff000u, 0x477fefffu};
  std::vector<float> sp(40);
  for (size_t i = 0; i < sp.size(); ++i) sp[i] = FromBits(specials[i % 10] ^ (i >= 20 ? 0x80000000u : 0));
  EXPECT_EQ(Convert(DType::kF16, sp), ExpectedAct(DType::kF16, sp.data(), 40));
  EXPECT_EQ(Convert(DType::kBF16, sp), ExpectedAct(DType::kBF16, sp.data(), 40));
}

TEST_P(QuantActivations, ConversionEqualsDequantizableBlocks) {
  // The converted row read back through DequantizeRow is within half a step of the input.
  const std::vector<float> x = MakeRow(Dist::kNormal, 1024, 77);
  for (DType w : {DType::kQ8_0, DType::kQ4_K}) {
    const std::vector<uint8_t> bytes = Convert(w, x);
    std::vector<float> y(x.size());
    DequantizeRow(VecDotType(w), bytes.data(), y.data(), 1024);
    const int bs = w == DType::kQ8_0 ? 32 : 256;
    for (int b = 0; b < 1024 / bs; ++b) {
      float amax = 0;
      for (int j = 0; j < bs; ++j) amax = std::max(amax, std::fabs(x[bs * b + j]));
      const double step = amax / 127.0;
      for (int j = 0; j < bs; ++j) {
        const int i = bs * b + j;
        ASSERT_LE(std::fabs(double(y[i]) - x[i]), 0.5 * step + 127 * step * 1e-3) << i;
      }
    }
  }
}

TEST(QuantActivationsBytes, RowBytes) {
  EXPECT_EQ(ActivationRowBytes(DType::kF32, 96), 96u * 4);
  EXPECT_EQ(ActivationRowBytes(DType::kF16, 96), 96u * 2);
  EXPECT_EQ(ActivationRowBytes(DType::kBF16, 96), 96u * 2);
  EXPECT_EQ(ActivationRowBytes(DType::kQ8_0, 96), 3u * 34);
  EXPECT_EQ(ActivationRowBytes(DType::kQ4_0, 96), 3u * 34);
  EXPECT_EQ(ActivationRowBytes(DType::kQ4_K, 512), 2u * 292);
  EXPECT_EQ(ActivationRowBytes(DType::kQ6_K, 512), 2u * 292);
  EXPECT_EQ(ActivationRowBytes(DType::kQ8_0, 0), 0u);
}

}  // namespace
}  // namespace moe::kernels
