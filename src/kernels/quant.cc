// The data-type layer of the kernels: binary16/bfloat16 conversions, weight quantizers (the
// reference quantizers of ggml-quants.c, re-derived), dequantization, and the conversion of
// activation rows into the vec-dot type of a weight (the hot one: q8_0 / q8_K per token).
//
// Every result here is meant to equal llama.cpp's CPU backend bit for bit on finite inputs:
//  - activations -> q8_0 follow ggml's x86 SIMD quantize_row_q8_0 (id = 127/amax, round half to
//    even), not quantize_row_q8_0_ref (id = 1/d, round half away from zero);
//  - activations -> q8_K follow quantize_row_q8_K_ref (x86 uses the reference);
//  - QuantizeRow (weights in files) follows the *_ref quantizers llama-quantize uses without an
//    importance matrix.
// Blocks that contain NaN/inf or whose scale overflows take a scalar path that emulates the x86
// instruction semantics (cvtps2dq's 0x80000000, the nearest_int float trick) so even those
// agree; they never invoke undefined behaviour. Checked byte for byte against ggml-quants.c and
// ggml-cpu/arch/x86/quants.c of the oracle llama.cpp source (normal, uniform, outlier, wide,
// tiny, NaN/inf rows); the one deliberate difference: an all-zero q8_K block gets bsums = 0
// where ggml leaves them unwritten.
//
// Highway file pattern (DESIGN.md §2): this file is re-included once per SIMD target by
// foreach_target.h; the HWY_ONCE section holds the scalar code and the public API.

// The float sequences below (x * id, then + 1.5 * 2^23) must round twice, as ggml's code does;
// a fused multiply-add would round once and occasionally pick the other integer. GCC contracts
// by default in C++ (even with -std=c++20), and the AVX2/AVX-512 targets enable FMA.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/quant.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kernels/kernels.h"
#include "kernels/quant_iq.h"
#include "kernels/widen-inl.h"
#include "kernels/ref/quant_ref.h"
#include "tensor/dtype.h"
#include "util/error.h"

// ---- scalar helpers shared by every target (compiled once) ----
#ifndef MOE_KERNELS_QUANT_SCALAR_HELPERS_
#define MOE_KERNELS_QUANT_SCALAR_HELPERS_
namespace moe::kernels::quant_detail {

// 1.5 * 2^23: adding it to |v| < 2^22 leaves round-half-even(v) in the low mantissa bits.
constexpr float kRoundMagic = 12582912.f;

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

// ggml's nearest_int, bit for bit for every input (its assert |v| <= 4194303 is compiled out
// in release builds, so out-of-range and non-finite inputs give these wrapped values too).
inline int32_t NearestIntMagic(float v) {
  const uint32_t i = FloatBits(v + kRoundMagic);
  return static_cast<int32_t>(i & 0x007fffff) - 0x00400000;
}

// Round half to even for the weight quantizers; clamps first so a pathological input (inf,
// NaN, a scale that underflowed) saturates instead of wrapping. Equal to NearestIntMagic on
// |v| <= 4194303, the only range the quantizers produce from finite weights.
inline int NearestInt(float v) {
  if (!(std::fabs(v) <= 4194303.f)) v = v > 0 ? 4194303.f : -4194303.f;
  return NearestIntMagic(v);
}

// x86 cvt(t)ss2si / cvtps2dq semantics: out of range or NaN gives INT32_MIN. v must already be
// integral (or be truncated, as C's float-to-int conversion does on x86).
inline int32_t X86FloatToInt32(float v) {
  if (!(v >= -2147483648.f && v < 2147483648.f)) return INT32_MIN;
  return static_cast<int32_t>(v);
}

inline int8_t SaturateInt8(int32_t v) {
  return static_cast<int8_t>(v < -128 ? -128 : (v > 127 ? 127 : v));
}

// maxps semantics: returns b when either operand is NaN.
inline float X86Max(float a, float b) { return a > b ? a : b; }

// Activation q8_0 / q8_1 block exactly as ggml's AVX2 quantize_row_q8_0 / quantize_row_q8_1,
// including the lane order of the max reduction (which decides where a NaN ends up) and
// cvtps2dq + saturating packs. q8_1 adds s = d * (sum of the int32 quants before packing).
template <typename Block>
void ActQ8BlockScalar(const float* x, uint8_t* y) {  // x: [32], y: one block
  float acc[8];  // the 8 lanes of one __m256
  for (int l = 0; l < 8; ++l) acc[l] = std::fabs(x[l]);
  for (int k = 1; k < 4; ++k) {
    for (int l = 0; l < 8; ++l) acc[l] = X86Max(acc[l], std::fabs(x[8 * k + l]));
  }
  float m4[4];
  for (int l = 0; l < 4; ++l) m4[l] = X86Max(acc[4 + l], acc[l]);   // high128 vs low128
  const float m2_0 = X86Max(m4[0], m4[2]), m2_1 = X86Max(m4[1], m4[3]);  // movehl
  const float amax = X86Max(m2_0, m2_1);                                  // movehdup, max_ss
  const float d = amax / 127.f;
  const float id = amax != 0.0f ? 127.f / amax : 0.0f;
  Block b;
  b.d = F32ToF16(d);
  uint32_t sum = 0;  // int32 lanes, wrapping as the vector adds do
  for (int j = 0; j < kQK8_0; ++j) {
    const int32_t q = X86FloatToInt32(std::nearbyint(x[j] * id));
    sum += static_cast<uint32_t>(q);
    b.qs[j] = SaturateInt8(q);
  }
  if constexpr (std::is_same_v<Block, BlockQ8_1>) {
    b.s = F32ToF16(d * static_cast<float>(static_cast<int32_t>(sum)));
  }
  std::memcpy(y, &b, sizeof(b));
}

// Activation q8_K block: quantize_row_q8_K_ref, with its literal float trick and int8 store
// (MIN(127, v) then truncation), so special inputs agree as well.
inline void ActQ8_KBlockScalar(const float* x, uint8_t* y) {  // x: [256], y: one BlockQ8_K
  BlockQ8_K b;
  float amax = 0.f, max = 0.f;
  for (int j = 0; j < kQK_K; ++j) {
    const float ax = std::fabs(x[j]);
    if (ax > amax) {
      amax = ax;
      max = x[j];
    }
  }
  if (amax == 0.f) {
    // ggml leaves bsums unwritten here; zero is their value under any reading.
    std::memset(&b, 0, sizeof(b));
  } else {
    const float iscale = -127.f / max;
    for (int j = 0; j < kQK_K; ++j) {
      const int32_t v = NearestIntMagic(iscale * x[j]);
      b.qs[j] = static_cast<int8_t>(v < 127 ? v : 127);  // C++20: modular narrowing
    }
    for (int g = 0; g < kQK_K / 16; ++g) {
      int sum = 0;
      for (int l = 0; l < 16; ++l) sum += b.qs[16 * g + l];
      b.bsums[g] = static_cast<int16_t>(sum);
    }
    b.d = 1 / iscale;
  }
  std::memcpy(y, &b, sizeof(b));
}

}  // namespace moe::kernels::quant_detail
#endif  // MOE_KERNELS_QUANT_SCALAR_HELPERS_

// ---- per-target code ----
HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// At most 16 float lanes: a q8_K group of 16 (one bsum) is then a whole number of vectors.
using DF = hn::CappedTag<float, 16>;

// round-half-even(v) for |v| <= 2^22 via the float trick, as an int32 vector. Identical to
// _mm256_round_ps(_MM_ROUND_NEAREST) + cvtps2dq on that range, and to ggml's nearest_int.
template <class V>
HWY_INLINE hn::Vec<hn::RebindToSigned<DF>> RoundMagic(V v) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  const auto bits = hn::BitCast(di, hn::Add(v, hn::Set(df, quant_detail::kRoundMagic)));
  return hn::Sub(hn::And(bits, hn::Set(di, 0x007fffff)), hn::Set(di, 0x00400000));
}

// nb blocks of 32 floats -> q8_0 or q8_1 (ggml x86 SIMD semantics). y may be unaligned.
template <typename Block>
HWY_INLINE void ActivationsQ8(const float* HWY_RESTRICT x, uint8_t* HWY_RESTRICT y, int64_t nb) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<int8_t, DF> d8;
  const size_t N = hn::Lanes(df);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK8_0;        // [32]
    uint8_t* yb = y + b * sizeof(Block);     // one block
    if (kQK8_0 % N != 0) {
      quant_detail::ActQ8BlockScalar<Block>(xb, yb);
      continue;
    }
    auto vmax = hn::Zero(df);
    auto nan = hn::FirstN(df, 0);
    for (size_t j = 0; j < kQK8_0; j += N) {
      const auto v = hn::LoadU(df, xb + j);
      vmax = hn::Max(vmax, hn::Abs(v));
      nan = hn::Or(nan, hn::IsNaN(v));  // (Ne is ordered: false for NaN)
    }
    const float amax = hn::GetLane(hn::MaxOfLanes(df, vmax));
    const float id = amax != 0.0f ? 127.f / amax : 0.0f;
    if (!hn::AllFalse(df, nan) || !std::isfinite(amax) || !std::isfinite(id)) {
      quant_detail::ActQ8BlockScalar<Block>(xb, yb);  // NaN/inf, or 127/amax = inf
      continue;
    }
    const float d = amax / 127.f;
    const uint16_t dh = F32ToF16(d);
    std::memcpy(yb + offsetof(Block, d), &dh, sizeof(dh));
    const auto vid = hn::Set(df, id);
    int8_t* qs = reinterpret_cast<int8_t*>(yb + offsetof(Block, qs));
    auto sum = hn::Zero(di);
    for (size_t j = 0; j < kQK8_0; j += N) {
      // |x * id| <= 127 (+ rounding): the trick is exact and no saturation is needed.
      const auto q = RoundMagic(hn::Mul(hn::LoadU(df, xb + j), vid));
      sum = hn::Add(sum, q);
      hn::StoreU(hn::DemoteTo(d8, q), d8, qs + j);
    }
    if constexpr (std::is_same_v<Block, BlockQ8_1>) {
      const uint16_t sh =
          F32ToF16(d * static_cast<float>(hn::GetLane(hn::SumOfLanes(di, sum))));
      std::memcpy(yb + offsetof(BlockQ8_1, s), &sh, sizeof(sh));
    }
  }
}

void ActivationsQ8_0(const float* HWY_RESTRICT x, uint8_t* HWY_RESTRICT y, int64_t nb) {
  ActivationsQ8<BlockQ8_0>(x, y, nb);
}
void ActivationsQ8_1(const float* HWY_RESTRICT x, uint8_t* HWY_RESTRICT y, int64_t nb) {
  ActivationsQ8<BlockQ8_1>(x, y, nb);
}

// nb blocks of 256 floats -> q8_K (quantize_row_q8_K_ref semantics). y may be unaligned.
void ActivationsQ8_K(const float* HWY_RESTRICT x, uint8_t* HWY_RESTRICT y, int64_t nb) {
  const DF df;
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<int8_t, DF> d8;
  const size_t N = hn::Lanes(df);
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK_K;           // [256]
    uint8_t* yb = y + b * sizeof(BlockQ8_K);   // one block
    if (16 % N != 0) {
      quant_detail::ActQ8_KBlockScalar(xb, yb);
      continue;
    }
    auto vmax = hn::Zero(df);
    auto nan = hn::FirstN(df, 0);
    for (size_t j = 0; j < kQK_K; j += N) {
      const auto v = hn::LoadU(df, xb + j);
      vmax = hn::Max(vmax, hn::Abs(v));
      nan = hn::Or(nan, hn::IsNaN(v));  // (Ne is ordered: false for NaN)
    }
    const float amax = hn::GetLane(hn::MaxOfLanes(df, vmax));
    if (!hn::AllFalse(df, nan) || !std::isfinite(amax)) {
      quant_detail::ActQ8_KBlockScalar(xb, yb);
      continue;
    }
    BlockQ8_K blk;
    if (amax == 0.f) {
      std::memset(&blk, 0, sizeof(blk));
      std::memcpy(yb, &blk, sizeof(blk));
      continue;
    }
    // The signed value of the first element with the largest magnitude (ggml scans with '>').
    float max = 0.f;
    const auto vamax = hn::Set(df, amax);
    for (size_t j = 0; j < kQK_K; j += N) {
      const intptr_t k = hn::FindFirstTrue(df, hn::Eq(hn::Abs(hn::LoadU(df, xb + j)), vamax));
      if (k >= 0) {
        max = xb[j + static_cast<size_t>(k)];
        break;
      }
    }
    const float iscale = -127.f / max;
    if (!std::isfinite(iscale)) {
      quant_detail::ActQ8_KBlockScalar(xb, yb);
      continue;
    }
    const auto viscale = hn::Set(df, iscale);
    const auto v127 = hn::Set(di, 127);
    for (int g = 0; g < kQK_K / 16; ++g) {
      auto sum = hn::Zero(di);
      for (size_t j = 16 * g; j < static_cast<size_t>(16 * g + 16); j += N) {
        const auto q = hn::Min(RoundMagic(hn::Mul(hn::LoadU(df, xb + j), viscale)), v127);
        sum = hn::Add(sum, q);
        hn::StoreU(hn::DemoteTo(d8, q), d8, blk.qs + j);
      }
      blk.bsums[g] = static_cast<int16_t>(hn::GetLane(hn::SumOfLanes(di, sum)));
    }
    blk.d = 1 / iscale;
    std::memcpy(yb, &blk, sizeof(blk));
  }
}

// n floats -> binary16 (round to nearest even; NaN quietened with its top payload bits kept,
// as F16C does). y may be unaligned.
void ActivationsF16(const float* HWY_RESTRICT x, uint8_t* HWY_RESTRICT y, int64_t n) {
  int64_t i = 0;
#if HWY_ARCH_X86 && HWY_TARGET != HWY_EMU128 && HWY_TARGET != HWY_SCALAR
  // vcvtps2ph: hardware round-to-nearest-even, the instruction ggml_cpu_fp32_to_fp16 uses.
  const DF df;
  const hn::Rebind<hwy::float16_t, DF> dh;
  const size_t N = hn::Lanes(df);
  for (; i + static_cast<int64_t>(N) <= n; i += N) {
    hn::StoreU(hn::DemoteTo(dh, hn::LoadU(df, x + i)), dh,
               reinterpret_cast<hwy::float16_t*>(y + 2 * i));
  }
#endif
  for (; i < n; ++i) {
    const uint16_t h = F32ToF16(x[i]);
    std::memcpy(y + 2 * i, &h, sizeof(h));
  }
}

// Rows of F16 / BF16 elements widened to floats (exact), any alignment (WidenToF32).
void WidenF16(const uint8_t* HWY_RESTRICT x, float* HWY_RESTRICT y, int64_t n) {
  WidenToF32<hwy::float16_t>(x, y, n);
}
void WidenBF16(const uint8_t* HWY_RESTRICT x, float* HWY_RESTRICT y, int64_t n) {
  WidenToF32<hwy::bfloat16_t>(x, y, n);
}

// n floats -> bfloat16 with ggml's GGML_FP32_TO_BF16 (NaN -> (u >> 16) | 64). y may be unaligned.
void ActivationsBF16(const float* HWY_RESTRICT x, uint8_t* HWY_RESTRICT y, int64_t n) {
  const DF df;
  const hn::RebindToUnsigned<DF> du;
  const hn::RebindToSigned<DF> di;
  const hn::Rebind<uint16_t, DF> d16;
  const size_t N = hn::Lanes(df);
  int64_t i = 0;
  for (; i + static_cast<int64_t>(N) <= n; i += N) {
    const auto u = hn::BitCast(du, hn::LoadU(df, x + i));
    // Magnitude bits fit in int32, so a signed compare is exact.
    const auto mag = hn::BitCast(di, hn::And(u, hn::Set(du, 0x7fffffffu)));
    const auto is_nan = hn::RebindMask(du, hn::Gt(mag, hn::Set(di, 0x7f800000)));
    const auto odd = hn::And(hn::ShiftRight<16>(u), hn::Set(du, 1u));
    const auto rounded = hn::ShiftRight<16>(hn::Add(u, hn::Add(hn::Set(du, 0x7fffu), odd)));
    const auto quiet = hn::Or(hn::ShiftRight<16>(u), hn::Set(du, 64u));
    const auto r = hn::IfThenElse(is_nan, quiet, rounded);  // each lane < 2^16
    hn::StoreU(hn::DemoteTo(d16, hn::BitCast(di, r)), d16,
               reinterpret_cast<uint16_t*>(y + 2 * i));
  }
  for (; i < n; ++i) {
    const uint16_t h = F32ToBF16(x[i]);
    std::memcpy(y + 2 * i, &h, sizeof(h));
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace moe::kernels
HWY_AFTER_NAMESPACE();

#if HWY_ONCE
namespace moe::kernels {

HWY_EXPORT(ActivationsQ8_0);
HWY_EXPORT(ActivationsQ8_1);
HWY_EXPORT(ActivationsQ8_K);
HWY_EXPORT(ActivationsF16);
HWY_EXPORT(ActivationsBF16);
HWY_EXPORT(WidenF16);
HWY_EXPORT(WidenBF16);

using quant_detail::BitsFloat;
using quant_detail::FloatBits;
using quant_detail::NearestInt;

// ---- scalar conversions ----

float F16ToF32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t mant = h & 0x3ff;
  if (exp == 0x1f) return BitsFloat(sign | 0x7f800000u | (mant << 13));  // inf, NaN (payload kept)
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24, exact in float (a normal float unless mant == 0).
    const float v = static_cast<float>(mant) * 0x1p-24f;
    return sign ? -v : v;
  }
  return BitsFloat(sign | ((exp + 112) << 23) | (mant << 13));  // rebias 15 -> 127
}

uint16_t F32ToF16(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000);
  const uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) {  // NaN: quiet it, keep the top 9 payload bits (F16C behaviour)
    return static_cast<uint16_t>(sign | 0x7e00 | ((a >> 13) & 0x3ff));
  }
  // 65520 = 65504 + half an ulp: from there on round-to-nearest-even gives inf.
  if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00);
  if (a >= 0x38800000u) {  // >= 2^-14: normal half
    // Rebias the exponent (127 -> 15) in place, then round the 13 dropped bits to nearest
    // even; a mantissa carry rolls into the exponent, which is the correct result.
    uint32_t r = a - (112u << 23);
    r += 0x0fffu + ((r >> 13) & 1u);
    return static_cast<uint16_t>(sign | (r >> 13));
  }
  if (a <= 0x33000000u) return sign;  // <= 2^-25 (half of the smallest subnormal): ties to 0
  // Subnormal half: the value in units of 2^-24, rounded to nearest even. 1024 is correct
  // too: it encodes the smallest normal.
  const uint32_t e = a >> 23;                        // 102..112
  const uint32_t m = (a & 0x7fffffu) | 0x800000u;    // 24-bit significand
  const uint32_t shift = 126 - e;                    // 14..24
  uint32_t q = m >> shift;
  const uint32_t rem = m & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return static_cast<uint16_t>(sign | q);
}

float BF16ToF32(uint16_t h) { return BitsFloat(static_cast<uint32_t>(h) << 16); }

uint16_t F32ToBF16(float f) {
  const uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 64);  // quiet NaN
  return static_cast<uint16_t>((u + (0x7fffu + ((u >> 16) & 1u))) >> 16);
}

namespace {

// ---- weight quantizers (ggml-quants.c *_ref semantics) ----

void QuantizeQ8_0Ref(const float* x, uint8_t* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK8_0;  // [32]
    float amax = 0.f;
    for (int j = 0; j < kQK8_0; ++j) {  // ggml's MAX(a, b) macro: a > b ? a : b
      const float a = std::fabs(xb[j]);
      amax = amax > a ? amax : a;
    }
    const float d = amax / 127.f;
    const float id = d != 0.f ? 1.0f / d : 0.0f;
    BlockQ8_0 blk;
    blk.d = F32ToF16(d);
    for (int j = 0; j < kQK8_0; ++j) {
      // roundf: halves away from zero. The int8 store is C's conversion as x86 performs it.
      blk.qs[j] = static_cast<int8_t>(quant_detail::X86FloatToInt32(std::round(xb[j] * id)));
    }
    std::memcpy(y + b * sizeof(BlockQ8_0), &blk, sizeof(blk));
  }
}

// 32 5-bit levels into q5_0 / q5_1 qh and qs: nibbles as q4_0, bit 4 of L[j] at bit j of qh.
void PackQ5Levels(const uint8_t* L, uint8_t* qh, uint8_t* qs) {
  uint32_t h = 0;
  for (int j = 0; j < kQK4_0 / 2; ++j) {
    qs[j] = static_cast<uint8_t>((L[j] & 0xF) | ((L[j + kQK4_0 / 2] & 0xF) << 4));
    h |= static_cast<uint32_t>((L[j] >> 4) & 1) << j;
    h |= static_cast<uint32_t>((L[j + kQK4_0 / 2] >> 4) & 1) << (j + kQK4_0 / 2);
  }
  for (int k = 0; k < 4; ++k) qh[k] = static_cast<uint8_t>(h >> (8 * k));
}

void QuantizeQ4_0Ref(const float* x, uint8_t* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK4_0;  // [32]
    float amax = 0.f, max = 0.f;       // max: the signed value of largest magnitude
    for (int j = 0; j < kQK4_0; ++j) {
      if (amax < std::fabs(xb[j])) {
        amax = std::fabs(xb[j]);
        max = xb[j];
      }
    }
    // The extreme value maps to level 0 (-8 * d); levels run -8..7, so d carries its sign.
    const float d = max / -8;
    const float id = d != 0.f ? 1.0f / d : 0.0f;
    BlockQ4_0 blk;
    blk.d = F32ToF16(d);
    for (int j = 0; j < kQK4_0 / 2; ++j) {
      // (int8_t)(v + 8.5f): truncation, i.e. rounding half up since v + 8.5 >= 0.
      auto level = [&](float v) {
        const int q = static_cast<int8_t>(quant_detail::X86FloatToInt32(v * id + 8.5f));
        return static_cast<uint8_t>(q < 15 ? q : 15);
      };
      blk.qs[j] = static_cast<uint8_t>(level(xb[j]) | (level(xb[j + kQK4_0 / 2]) << 4));
    }
    std::memcpy(y + b * sizeof(BlockQ4_0), &blk, sizeof(blk));
  }
}

// q5_0: q4_0 with 5-bit levels (the extreme value maps to level 0, -16 * d).
void QuantizeQ5_0Ref(const float* x, uint8_t* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK4_0;  // [32]
    float amax = 0.f, max = 0.f;
    for (int j = 0; j < kQK4_0; ++j) {
      if (amax < std::fabs(xb[j])) {
        amax = std::fabs(xb[j]);
        max = xb[j];
      }
    }
    const float d = max / -16;
    const float id = d != 0.f ? 1.0f / d : 0.0f;
    uint8_t L[kQK4_0];
    for (int j = 0; j < kQK4_0; ++j) {  // (int8_t)(v + 16.5f), at most 31
      const int q = static_cast<int8_t>(quant_detail::X86FloatToInt32(xb[j] * id + 16.5f));
      L[j] = static_cast<uint8_t>(q < 31 ? q : 31);
    }
    BlockQ5_0 blk;
    blk.d = F32ToF16(d);
    PackQ5Levels(L, blk.qh, blk.qs);
    std::memcpy(y + b * sizeof(BlockQ5_0), &blk, sizeof(blk));
  }
}

// q4_1 / q5_1: x ~= d * L + min over the block's [min, max], L in 0..2^bits - 1.
template <typename Block>
void QuantizeMinRef(const float* x, uint8_t* y, int64_t nb) {
  constexpr bool kQ5 = std::is_same_v<Block, BlockQ5_1>;
  constexpr int kNmax = kQ5 ? 31 : 15;
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK4_0;  // [32]
    float min = std::numeric_limits<float>::max(), max = -std::numeric_limits<float>::max();
    for (int j = 0; j < kQK4_0; ++j) {
      if (xb[j] < min) min = xb[j];
      if (xb[j] > max) max = xb[j];
    }
    const float d = (max - min) / kNmax;
    const float id = d != 0.f ? 1.0f / d : 0.0f;
    uint8_t L[kQK4_0];
    for (int j = 0; j < kQK4_0; ++j) {
      // C's float-to-integer conversion of v + 0.5 (truncation) as x86 performs it; q4_1 also
      // caps at 15 after an int8 conversion, q5_1 keeps the low 8 bits.
      const int32_t t = quant_detail::X86FloatToInt32((xb[j] - min) * id + 0.5f);
      if constexpr (kQ5) {
        L[j] = static_cast<uint8_t>(t);
      } else {
        const int q = static_cast<int8_t>(t);
        L[j] = static_cast<uint8_t>(q < 15 ? q : 15);
      }
    }
    Block blk;
    blk.d = F32ToF16(d);
    blk.m = F32ToF16(min);
    if constexpr (kQ5) {
      PackQ5Levels(L, blk.qh, blk.qs);
    } else {
      for (int j = 0; j < kQK4_0 / 2; ++j) {
        blk.qs[j] = static_cast<uint8_t>((L[j] & 0xF) | (L[j + kQK4_0 / 2] << 4));
      }
    }
    std::memcpy(y + b * sizeof(Block), &blk, sizeof(blk));
  }
}

float FitScaleSymmetric(int n, int nmax, const float* x, int8_t* L, const float* qw);
float FitScaleMin(int n, int nmax, const float* x, const float* w, uint8_t* L, float* neg_min,
                  float rmin, float rdelta, int nstep, bool use_mad = false);

// Importance weights of a block: qw[j] * sqrt(sigma2 + x[j]^2), sigma2 the mean square of the
// row (block-32 types) or twice that of the super-block (the 256-block types), as ggml's
// quantize_row_*_impl weigh the error with an importance matrix.
float MeanSquare(const float* x, int64_t n, float factor) {
  float sum_x2 = 0;
  for (int64_t j = 0; j < n; ++j) sum_x2 += x[j] * x[j];
  return factor * sum_x2 / static_cast<float>(n);
}
void ImportanceWeights(const float* x, const float* qw, float sigma2, int n, float* w) {
  for (int j = 0; j < n; ++j) w[j] = qw[j] * std::sqrt(sigma2 + x[j] * x[j]);
}

// The block-32 types with importance weights (ggml's quantize_row_{q4_0,q4_1,q5_0,q5_1}_impl):
// q4_0 / q5_0 the weighted symmetric fit of each block, q4_1 / q5_1 the weighted
// scale-and-offset fit (make_qkx3_quants: 37 grids from nmax - 0.9 levels up).
template <typename Block>
void QuantizeBlock32Weighted(const float* x, uint8_t* y, int64_t n, const float* qw) {
  constexpr bool kMin = std::is_same_v<Block, BlockQ4_1> || std::is_same_v<Block, BlockQ5_1>;
  constexpr bool kQ5 = std::is_same_v<Block, BlockQ5_0> || std::is_same_v<Block, BlockQ5_1>;
  const float sigma2 = MeanSquare(x, n, 1.0f);
  for (int64_t b = 0; b < n / kQK4_0; ++b) {
    const float* xb = x + b * kQK4_0;
    float w[kQK4_0];
    ImportanceWeights(xb, qw + b * kQK4_0, sigma2, kQK4_0, w);
    uint8_t L[kQK4_0];
    Block blk;
    if constexpr (kMin) {
      float neg_min;
      blk.d = F32ToF16(FitScaleMin(kQK4_0, kQ5 ? 31 : 15, xb, w, L, &neg_min, -0.9f, 0.05f, 36));
      blk.m = F32ToF16(-neg_min);
    } else {
      int8_t Ls[kQK4_0];  // level + nmax: 0..15 or 0..31
      blk.d = F32ToF16(FitScaleSymmetric(kQK4_0, kQ5 ? 16 : 8, xb, Ls, w));
      std::memcpy(L, Ls, sizeof(L));
    }
    if constexpr (kQ5) {
      PackQ5Levels(L, blk.qh, blk.qs);
    } else {
      for (int j = 0; j < kQK4_0 / 2; ++j) blk.qs[j] = static_cast<uint8_t>(L[j] | (L[j + 16] << 4));
    }
    std::memcpy(y + b * sizeof(Block), &blk, sizeof(blk));
  }
}

// Fit of non-negative x[i] ~= scale * L[i], L in 0..nmax, weighted by w (ggml's make_qp_quants:
// the q4_K / q5_K sub-block scales and mins under an importance matrix): the best of 9 grids
// near nmax / max, then up to 5 passes moving single levels where that raises
// (sum w x l)^2 / sum w l^2.
float FitScalePositive(int n, int nmax, const float* x, uint8_t* L, const float* w) {
  float max = 0;
  for (int i = 0; i < n; ++i) max = std::max(max, x[i]);
  if (max < 1e-15f) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  float iscale = nmax / max;
  const float scale = 1 / iscale;
  float best_mse = 0;
  for (int i = 0; i < n; ++i) {  // (levels unclamped here, as ggml's first grid)
    const float diff = x[i] - scale * static_cast<float>(NearestInt(iscale * x[i]));
    best_mse += w[i] * diff * diff;
  }
  for (int k = -4; k <= 4; ++k) {
    if (k == 0) continue;
    const float iscale_k = (0.1f * k + nmax) / max;
    const float scale_k = 1 / iscale_k;
    float mse = 0;
    for (int i = 0; i < n; ++i) {
      const int l = std::min(nmax, NearestInt(iscale_k * x[i]));
      const float diff = x[i] - scale_k * l;
      mse += w[i] * diff * diff;
    }
    if (mse < best_mse) {
      best_mse = mse;
      iscale = iscale_k;
    }
  }
  float sumlx = 0, suml2 = 0;
  int Li[32];  // n <= 32
  for (int i = 0; i < n; ++i) {
    Li[i] = std::min(nmax, NearestInt(iscale * x[i]));
    sumlx += w[i] * x[i] * Li[i];
    suml2 += w[i] * Li[i] * Li[i];
  }
  for (int pass = 0; pass < 5; ++pass) {
    int changed = 0;
    for (int i = 0; i < n; ++i) {
      float slx = sumlx - w[i] * x[i] * Li[i];
      float sl2 = suml2 - w[i] * Li[i] * Li[i];
      if (slx > 0 && sl2 > 0) {
        const int l = std::min(nmax, NearestInt(x[i] * sl2 / slx));
        if (l != Li[i]) {
          slx += w[i] * x[i] * l;
          sl2 += w[i] * l * l;
          if (slx * slx * suml2 > sumlx * sumlx * sl2) {
            Li[i] = l;
            sumlx = slx;
            suml2 = sl2;
            ++changed;
          }
        }
      }
    }
    if (!changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = static_cast<uint8_t>(Li[i]);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// Weighted fit of x[i] ~= scale * L[i] - neg_min with L[i] in 0..nmax and neg_min >= 0 (ggml's
// make_qkx2_quants; use_mad: the error of a candidate is the weighted absolute, not squared,
// difference). Starts from the min/max grid, then tries nstep+1
// grids whose step maps (max - min) onto nmax + rmin + rdelta * k levels (min = the best offset
// so far); for each it solves the
// 2x2 weighted least-squares problem for (scale, min) given the levels (falling back to a fit
// through zero when the optimal min would be positive) and keeps the lowest weighted squared
// error. Returns the scale; *neg_min receives -min. L receives the chosen levels.
float FitScaleMin(int n, int nmax, const float* x, const float* w, uint8_t* L, float* neg_min,
                  float rmin, float rdelta, int nstep, bool use_mad) {
  auto loss = [use_mad](float diff) { return use_mad ? std::fabs(diff) : diff * diff; };
  float lo = x[0], hi = x[0];
  float sum_w = w[0];
  float sum_x = sum_w * x[0];
  for (int i = 1; i < n; ++i) {
    lo = x[i] < lo ? x[i] : lo;
    hi = x[i] > hi ? x[i] : hi;
    sum_w += w[i];
    sum_x += w[i] * x[i];
  }
  if (lo > 0) lo = 0;  // the offset only ever subtracts: a grid of all-positive values starts at 0
  if (hi == lo) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    *neg_min = -lo;
    return 0.f;
  }
  float iscale = nmax / (hi - lo);
  float scale = 1 / iscale;
  float min = lo;
  float best_err = 0;
  for (int i = 0; i < n; ++i) {
    const int l = NearestInt(iscale * (x[i] - lo));
    L[i] = static_cast<uint8_t>(l < 0 ? 0 : (l > nmax ? nmax : l));
    const float diff = scale * L[i] + lo - x[i];
    best_err += w[i] * loss(diff);
  }
  uint8_t trial[32];  // n <= 32 (q4_K sub-blocks)
  for (int k = 0; k <= nstep; ++k) {
    // The grid is anchored at the best offset found so far (not at the data minimum): after an
    // improvement the later candidates start from the fitted min, as ggml's search does.
    iscale = (rmin + rdelta * k + nmax) / (hi - min);
    float sum_l = 0, sum_l2 = 0, sum_xl = 0;
    for (int i = 0; i < n; ++i) {
      int l = NearestInt(iscale * (x[i] - min));
      l = l < 0 ? 0 : (l > nmax ? nmax : l);
      trial[i] = static_cast<uint8_t>(l);
      sum_l += w[i] * l;
      sum_l2 += w[i] * l * l;
      sum_xl += w[i] * l * x[i];
    }
    const float det = sum_w * sum_l2 - sum_l * sum_l;
    if (!(det > 0)) continue;
    float s = (sum_w * sum_xl - sum_x * sum_l) / det;
    float m = (sum_l2 * sum_x - sum_l * sum_xl) / det;
    if (m > 0) {  // a positive offset is not representable: refit through zero
      m = 0;
      s = sum_xl / sum_l2;
    }
    float err = 0;
    for (int i = 0; i < n; ++i) {
      const float diff = s * trial[i] + m - x[i];
      err += w[i] * loss(diff);
    }
    if (err < best_err) {
      std::memcpy(L, trial, static_cast<size_t>(n));
      best_err = err;
      scale = s;
      min = m;
    }
  }
  *neg_min = -min;
  return scale;
}

// q4_K and q5_K: 8 sub-blocks of 32 with x ~= d*sc[j] * L - dmin*m[j], L in 0..nmax (15 or 31),
// 6-bit sub-block scales and mins under two f16 super-scales (ggml's quantize_row_q{4,5}_K_ref).
// The levels of a q4_K / q5_K block re-derived against its scales as stored (6 bits and f16),
// packed with them into out. A sub-block whose scale is 0 keeps the fit's levels.
template <typename Block>
void FinishScaleMinK(const float* xb, uint8_t* L, Block& blk, uint8_t* out) {
  constexpr int kNmax = std::is_same_v<Block, BlockQ5_K> ? 31 : 15;
  const float d_all = F16ToF32(blk.d), dmin_all = F16ToF32(blk.dmin);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    ref::GetScaleMinK4(j, blk.scales, &sc, &m);
    const float d = d_all * sc;
    if (d == 0.f) continue;
    const float dm = dmin_all * m;
    for (int l = 0; l < 32; ++l) {
      const int q = NearestInt((xb[32 * j + l] + dm) / d);
      L[32 * j + l] = static_cast<uint8_t>(q < 0 ? 0 : (q > kNmax ? kNmax : q));
    }
  }
  if constexpr (std::is_same_v<Block, BlockQ5_K>) {
    ref::PackQ5KQuants(L, blk.qh, blk.qs);
  } else {
    ref::PackQ4KQuants(L, blk.qs);
  }
  std::memcpy(out, &blk, sizeof(blk));
}

// qw: importance weights per column of the row (ggml's quantize_row_q{4,5}_K_impl: each
// sub-block's fit weighted by them, the 6-bit scales and mins fitted by FitScalePositive), or
// null.
template <typename Block>
void QuantizeScaleMinK(const float* x, uint8_t* y, int64_t nb, const float* qw) {
  constexpr bool kQ5 = std::is_same_v<Block, BlockQ5_K>;
  constexpr int kNmax = kQ5 ? 31 : 15;
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK_K;  // [256] = 8 sub-blocks of 32
    uint8_t L[kQK_K];                 // levels 0..kNmax
    float scales[8], mins[8];         // per sub-block: x ~= scale * L - min
    float max_scale = 0, max_min = 0;
    if (qw) {
      const float sigma2 = MeanSquare(xb, kQK_K, 2.0f);
      float sw[8];
      for (int j = 0; j < 8; ++j) {
        float w[32];
        ImportanceWeights(xb + 32 * j, qw + b * kQK_K + 32 * j, sigma2, 32, w);
        sw[j] = 0;
        for (int l = 0; l < 32; ++l) sw[j] += w[l];
        scales[j] = FitScaleMin(32, kNmax, xb + 32 * j, w, L + 32 * j, &mins[j], -0.9f, 0.05f, 36);
      }
      uint8_t ls[8], lm[8];
      const float d_block = FitScalePositive(8, 63, scales, ls, sw);
      const float m_block = FitScalePositive(8, 63, mins, lm, sw);
      Block blk;
      ref::PackScaleMinK4(ls, lm, blk.scales);
      blk.d = F32ToF16(d_block);
      blk.dmin = F32ToF16(m_block);
      FinishScaleMinK<Block>(xb, L, blk, y + b * sizeof(Block));
      continue;
    }
    for (int j = 0; j < 8; ++j) {
      const float* xs = xb + 32 * j;
      // Weights favour large magnitudes over a floor of the sub-block's RMS.
      float sum_x2 = 0;
      for (int l = 0; l < 32; ++l) sum_x2 += xs[l] * xs[l];
      const float av_x = std::sqrt(sum_x2 / 32);
      float w[32];
      for (int l = 0; l < 32; ++l) w[l] = av_x + std::fabs(xs[l]);
      scales[j] = kQ5 ? FitScaleMin(32, kNmax, xs, w, L + 32 * j, &mins[j], -0.5f, 0.1f, 15)
                      : FitScaleMin(32, kNmax, xs, w, L + 32 * j, &mins[j], -1.f, 0.1f, 20);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    // 6-bit sub-block scales and mins relative to two f16 super-scales.
    const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
    const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
    uint8_t ls[8], lm[8];
    for (int j = 0; j < 8; ++j) {
      const int s = NearestInt(inv_scale * scales[j]);
      const int m = NearestInt(inv_min * mins[j]);
      ls[j] = static_cast<uint8_t>(s < 0 ? 0 : (s > 63 ? 63 : s));
      lm[j] = static_cast<uint8_t>(m < 0 ? 0 : (m > 63 ? 63 : m));
    }
    Block blk;
    ref::PackScaleMinK4(ls, lm, blk.scales);
    blk.d = F32ToF16(max_scale / 63.f);
    blk.dmin = F32ToF16(max_min / 63.f);
    FinishScaleMinK<Block>(xb, L, blk, y + b * sizeof(Block));
  }
}

// q2_K: 16 sub-blocks of 16 with x ~= d sc_j L - dmin m_j, L in 0..3, 4-bit sc_j and m_j
// (ggml's quantize_row_q2_K_ref: a least-absolute-deviation fit weighted by |x|).
// The levels of a q2_K block re-derived against its scales and mins as stored, packed into out.
void FinishQ2_K(const float* xb, uint8_t* L, BlockQ2_K& blk, uint8_t* out) {
  const float d_all = F16ToF32(blk.d), dmin_all = F16ToF32(blk.dmin);
  for (int j = 0; j < 16; ++j) {
    const float d = d_all * (blk.scales[j] & 0xF);
    if (d == 0.f) continue;
    const float dm = dmin_all * (blk.scales[j] >> 4);
    for (int l = 0; l < 16; ++l) {
      const int q = NearestInt((xb[16 * j + l] + dm) / d);
      L[16 * j + l] = static_cast<uint8_t>(q < 0 ? 0 : (q > 3 ? 3 : q));
    }
  }
  ref::PackQ2Quants(L, blk.qs);
  std::memcpy(out, &blk, sizeof(blk));
}

// qw: importance weights per column of the row (ggml's quantize_row_q2_K_impl: the sub-block
// fits weighted by them, the 4-bit scales and mins fitted by FitScalePositive), or null.
void QuantizeQ2_K(const float* x, uint8_t* y, int64_t nb, const float* qw) {
  constexpr float kQ4Scale = 15.f;
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK_K;
    uint8_t L[kQK_K];
    float scales[16], mins[16];
    float max_scale = 0, max_min = 0;
    BlockQ2_K blk;
    if (qw) {
      const float sigma2 = MeanSquare(xb, kQK_K, 1.0f);
      float sw[16];
      for (int j = 0; j < 16; ++j) {
        float w[16];
        ImportanceWeights(xb + 16 * j, qw + b * kQK_K + 16 * j, sigma2, 16, w);
        sw[j] = 0;
        for (int l = 0; l < 16; ++l) sw[j] += w[l];
        scales[j] = FitScaleMin(16, 3, xb + 16 * j, w, L + 16 * j, &mins[j], -0.9f, 0.05f, 36);
      }
      uint8_t ls[16], lm[16];
      blk.d = F32ToF16(FitScalePositive(16, 15, scales, ls, sw));
      blk.dmin = F32ToF16(FitScalePositive(16, 15, mins, lm, sw));
      for (int j = 0; j < 16; ++j) blk.scales[j] = static_cast<uint8_t>(ls[j] | (lm[j] << 4));
      FinishQ2_K(xb, L, blk, y + b * sizeof(BlockQ2_K));
      continue;
    }
    for (int j = 0; j < 16; ++j) {
      float w[16];
      for (int l = 0; l < 16; ++l) w[l] = std::fabs(xb[16 * j + l]);
      scales[j] = FitScaleMin(16, 3, xb + 16 * j, w, L + 16 * j, &mins[j], -0.5f, 0.1f, 15,
                              /*use_mad=*/true);
      if (scales[j] > max_scale) max_scale = scales[j];
      if (mins[j] > max_min) max_min = mins[j];
    }
    // The stores are C's int-to-uint8 conversions of nearest_int, modulo 256 as in ggml.
    if (max_scale > 0) {
      const float iscale = kQ4Scale / max_scale;
      for (int j = 0; j < 16; ++j) blk.scales[j] = static_cast<uint8_t>(NearestInt(iscale * scales[j]));
      blk.d = F32ToF16(max_scale / kQ4Scale);
    } else {
      for (int j = 0; j < 16; ++j) blk.scales[j] = 0;
      blk.d = F32ToF16(0.f);
    }
    if (max_min > 0) {
      const float iscale = kQ4Scale / max_min;
      for (int j = 0; j < 16; ++j) {
        blk.scales[j] = static_cast<uint8_t>(blk.scales[j] | (NearestInt(iscale * mins[j]) << 4));
      }
      blk.dmin = F32ToF16(max_min / kQ4Scale);
    } else {
      blk.dmin = F32ToF16(0.f);
    }
    FinishQ2_K(xb, L, blk, y + b * sizeof(BlockQ2_K));
  }
}

// Symmetric fit of 16 values to L in -nmax..nmax-1 (ggml's make_q3_quants with do_rmse): the
// grid mapping the largest magnitude to -nmax, then up to 5 passes that move single levels
// where that raises (sum w x l)^2 / sum w l^2 (w = x^2). L receives the levels + nmax.
float FitScaleQ3(int n, int nmax, const float* x, int8_t* L) {
  float max = 0, amax = 0;
  for (int i = 0; i < n; ++i) {
    const float ax = std::fabs(x[i]);
    if (ax > amax) {
      amax = ax;
      max = x[i];
    }
  }
  if (amax < 1e-15f) {
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  const float iscale = -nmax / max;
  float sumlx = 0, suml2 = 0;
  for (int i = 0; i < n; ++i) {
    int l = NearestInt(iscale * x[i]);
    l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
    L[i] = static_cast<int8_t>(l);
    const float w = x[i] * x[i];
    sumlx += w * x[i] * l;
    suml2 += w * l * l;
  }
  for (int itry = 0; itry < 5; ++itry) {
    int n_changed = 0;
    for (int i = 0; i < n; ++i) {
      const float w = x[i] * x[i];
      float slx = sumlx - w * x[i] * L[i];
      if (slx > 0) {
        float sl2 = suml2 - w * L[i] * L[i];
        int new_l = NearestInt(x[i] * sl2 / slx);
        new_l = new_l < -nmax ? -nmax : (new_l > nmax - 1 ? nmax - 1 : new_l);
        if (new_l != L[i]) {
          slx += w * x[i] * new_l;
          sl2 += w * new_l * new_l;
          if (sl2 > 0 && slx * slx * suml2 > sumlx * sumlx * sl2) {
            L[i] = static_cast<int8_t>(new_l);
            sumlx = slx;
            suml2 = sl2;
            ++n_changed;
          }
        }
      }
    }
    if (!n_changed) break;
  }
  for (int i = 0; i < n; ++i) L[i] = static_cast<int8_t>(L[i] + nmax);
  return suml2 > 0.0f ? sumlx / suml2 : 0.0f;
}

// q3_K: 16 sub-blocks of 16 with x ~= d (s_j - 32) (L - 4), L in 0..7, 6-bit s_j (ggml's
// quantize_row_q3_K_ref).
// Scale j (0..63, stored value + 32) into q3_K's 12 scale bytes (zeroed first): low nibbles in
// bytes 0..7, the top two bits in bytes 8..11.
void PutQ3KScale(uint8_t* scales, int j, int8_t l) {
  if (j < 8) {
    scales[j] = static_cast<uint8_t>(l & 0xF);
  } else {
    scales[j - 8] = static_cast<uint8_t>(scales[j - 8] | ((l & 0xF) << 4));
  }
  l = static_cast<int8_t>(l >> 4);
  scales[j % 4 + 8] = static_cast<uint8_t>(scales[j % 4 + 8] | (l << (2 * (j / 4))));
}

void FinishQ3_K(const float* xb, int8_t* L, BlockQ3_K& blk, uint8_t* out);

// qw: importance weights per column of the row (ggml's quantize_row_q3_K_impl: weighted
// symmetric fits of the sub-blocks and of their 6-bit scales), or null.
void QuantizeQ3_K(const float* x, uint8_t* y, int64_t nb, const float* qw) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK_K;
    int8_t L[kQK_K];
    float scales[16];
    float max_scale = 0, amax = 0;
    BlockQ3_K blk;
    std::memset(blk.scales, 0, sizeof(blk.scales));
    if (qw) {
      const float sigma2 = MeanSquare(xb, kQK_K, 2.0f);
      float sw[16];
      for (int j = 0; j < 16; ++j) {
        float w[16];
        ImportanceWeights(xb + 16 * j, qw + b * kQK_K + 16 * j, sigma2, 16, w);
        sw[j] = 0;
        for (int l = 0; l < 16; ++l) sw[j] += w[l];
        scales[j] = FitScaleSymmetric(16, 4, xb + 16 * j, L + 16 * j, w);
      }
      int8_t ls[16];  // 0..63 (scale + 32)
      blk.d = F32ToF16(FitScaleSymmetric(16, 32, scales, ls, sw));
      for (int j = 0; j < 16; ++j) PutQ3KScale(blk.scales, j, ls[j]);
      FinishQ3_K(xb, L, blk, y + b * sizeof(BlockQ3_K));
      continue;
    }
    for (int j = 0; j < 16; ++j) {
      scales[j] = FitScaleQ3(16, 4, xb + 16 * j, L + 16 * j);
      const float a = std::fabs(scales[j]);
      if (a > amax) {
        amax = a;
        max_scale = scales[j];
      }
    }
    if (max_scale != 0.f) {
      const float iscale = -32.f / max_scale;
      for (int j = 0; j < 16; ++j) {
        // int8_t l = nearest_int(...): C's modular narrowing, then the clamp, then + 32.
        const int8_t l = static_cast<int8_t>(NearestInt(iscale * scales[j]));
        PutQ3KScale(blk.scales, j, static_cast<int8_t>((l < -32 ? -32 : (l > 31 ? 31 : l)) + 32));
      }
      blk.d = F32ToF16(1 / iscale);
    } else {
      blk.d = F32ToF16(0.f);
    }
    FinishQ3_K(xb, L, blk, y + b * sizeof(BlockQ3_K));
  }
}

// The levels of a q3_K block re-derived against its scales as stored, packed into out.
void FinishQ3_K(const float* xb, int8_t* L, BlockQ3_K& blk, uint8_t* out) {
  const float d_all = F16ToF32(blk.d);
  for (int j = 0; j < 16; ++j) {
    const float d = d_all * ref::Q3KScale(blk.scales, j);
    if (d == 0.f) continue;
    for (int l = 0; l < 16; ++l) {
      int q = NearestInt(xb[16 * j + l] / d);
      q = q < -4 ? -4 : (q > 3 ? 3 : q);
      L[16 * j + l] = static_cast<int8_t>(q + 4);
    }
  }
  std::memset(blk.hmask, 0, sizeof(blk.hmask));
  uint8_t lo[kQK_K];
  for (int e = 0; e < kQK_K; ++e) {
    const int v = L[e];  // 0..7 (sub-blocks with d == 0 keep the fit's levels, also 0..7)
    if (v > 3) blk.hmask[e % 32] = static_cast<uint8_t>(blk.hmask[e % 32] | (1 << (e / 32)));
    lo[e] = static_cast<uint8_t>(v > 3 ? v - 4 : v);
  }
  ref::PackQ2Quants(lo, blk.qs);
  std::memcpy(out, &blk, sizeof(blk));
}

// Index of the level of kIQ4NLValues nearest to v (ties to the upper level only when v is
// strictly nearer; ggml's best_index_int8, a bisection).
int NearestIQ4Level(float v) {
  const int8_t* val = kIQ4NLValues;
  if (v <= val[0]) return 0;
  if (v >= val[15]) return 15;
  int lo = 0, hi = 15;
  while (hi - lo > 1) {
    const int mid = (lo + hi) / 2;
    if (v < val[mid]) {
      hi = mid;
    } else {
      lo = mid;
    }
  }
  return v - val[hi - 1] < val[hi] - v ? hi - 1 : hi;
}

// iq4_nl / iq4_xs: each block of 32 gets the scale d that maximises (sum w x q)^2 / sum w q^2
// (w = x^2) over 15 grids mapping the largest-magnitude value near -127 (ggml's
// quantize_row_iq4_nl_impl with 7 tries, what llama-quantize writes). iq4_nl stores d as f16
// and picks the levels with the unrounded d; iq4_xs stores 6-bit block scales relative to a
// super-block d and picks the levels with d * scale.
// w: the error weights (x^2 without an importance matrix).
void FitIQ4Block(const float* x, const float* w, float* scale, uint8_t* L) {
  constexpr int kTries = 7;
  float amax = 0, max = 0;
  for (int j = 0; j < 32; ++j) {
    const float ax = std::fabs(x[j]);
    if (ax > amax) {
      amax = ax;
      max = x[j];
    }
  }
  if (amax < 1e-15f) {
    *scale = 0;
    return;
  }
  const int8_t* val = kIQ4NLValues;
  float d = -max / val[0];
  float id = 1 / d;
  float sumqx = 0, sumq2 = 0;
  for (int j = 0; j < 32; ++j) {
    const int l = NearestIQ4Level(id * x[j]);
    L[j] = static_cast<uint8_t>(l);
    const float q = val[l];
    sumqx += w[j] * q * x[j];
    sumq2 += w[j] * q * q;
  }
  d = sumq2 > 0 ? sumqx / sumq2 : 0.f;
  float best = d * sumqx;
  for (int itry = -kTries; itry <= kTries; ++itry) {
    id = static_cast<float>(itry + val[0]) / max;
    sumqx = sumq2 = 0;
    for (int j = 0; j < 32; ++j) {
      const float q = val[NearestIQ4Level(id * x[j])];
      sumqx += w[j] * q * x[j];
      sumq2 += w[j] * q * q;
    }
    if (sumq2 > 0 && sumqx * sumqx > best * sumq2) {
      d = sumqx / sumq2;
      best = d * sumqx;
    }
  }
  *scale = d;
}

void PackIQ4Nibbles(const uint8_t* L, uint8_t* qs) {  // 32 levels -> 16 bytes
  for (int j = 0; j < 16; ++j) qs[j] = static_cast<uint8_t>(L[j] | (L[j + 16] << 4));
}

// The error weights of an iq4 block of 32 (ggml's quantize_row_iq4_nl_impl): x^2, or with an
// importance matrix qw * sqrt(sigma2 + x^2), sigma2 twice the mean square of the super-block.
void IQ4Weights(const float* xb, const float* qw, float sigma2, float* w) {
  if (qw) {
    ImportanceWeights(xb, qw, sigma2, 32, w);
  } else {
    for (int j = 0; j < 32; ++j) w[j] = xb[j] * xb[j];
  }
}

void QuantizeIQ4_NL(const float* x, uint8_t* y, int64_t nb, const float* qw) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * 32;
    BlockIQ4_NL blk;
    uint8_t L[32];
    float d, w[32];
    IQ4Weights(xb, qw ? qw + b * 32 : nullptr, MeanSquare(xb, 32, 2.0f), w);
    FitIQ4Block(xb, w, &d, L);
    blk.d = F32ToF16(d);
    const float id = d != 0.f ? 1 / d : 0;
    for (int j = 0; j < 32; ++j) L[j] = static_cast<uint8_t>(NearestIQ4Level(id * xb[j]));
    PackIQ4Nibbles(L, blk.qs);
    std::memcpy(y + b * sizeof(blk), &blk, sizeof(blk));
  }
}

void QuantizeIQ4_XS(const float* x, uint8_t* y, int64_t nb, const float* qw) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK_K;
    BlockIQ4_XS blk;
    uint8_t L[kQK_K];
    float scales[8];
    float max_scale = 0, amax_scale = 0;
    const float sigma2 = MeanSquare(xb, kQK_K, 2.0f);
    for (int j = 0; j < 8; ++j) {
      float w[32];
      IQ4Weights(xb + 32 * j, qw ? qw + b * kQK_K + 32 * j : nullptr, sigma2, w);
      FitIQ4Block(xb + 32 * j, w, &scales[j], L + 32 * j);
      if (std::fabs(scales[j]) > amax_scale) {
        amax_scale = std::fabs(scales[j]);
        max_scale = scales[j];
      }
    }
    blk.scales_h = 0;
    std::memset(blk.scales_l, 0, sizeof(blk.scales_l));
    const float d = -max_scale / 32;
    blk.d = F32ToF16(d);
    const float id = d != 0.f ? 1 / d : 0.f;
    for (int j = 0; j < 8; ++j) {
      int l = NearestInt(id * scales[j]);
      l = l < -32 ? -32 : (l > 31 ? 31 : l);
      const float dl = d * l;
      const float idl = dl != 0.f ? 1 / dl : 0.f;
      for (int k = 0; k < 32; ++k) L[32 * j + k] = static_cast<uint8_t>(NearestIQ4Level(idl * xb[32 * j + k]));
      l += 32;
      blk.scales_l[j / 2] = static_cast<uint8_t>(blk.scales_l[j / 2] | ((l & 0xF) << (4 * (j % 2))));
      blk.scales_h = static_cast<uint16_t>(blk.scales_h | ((l >> 4) << (2 * j)));
    }
    for (int j = 0; j < 8; ++j) PackIQ4Nibbles(L + 32 * j, blk.qs + 16 * j);
    std::memcpy(y + b * sizeof(blk), &blk, sizeof(blk));
  }
}

// mxfp4: the E8M0 exponent puts the block's largest magnitude in the top binade of the e2m1
// grid (floor(log2 amax) - 2), then each value takes the nearest grid point (the first one on
// ties): ggml's quantize_row_mxfp4_ref.
void QuantizeMXFP4Ref(const float* x, uint8_t* y, int64_t nb) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * 32;
    float amax = 0;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(xb[j]));
    BlockMXFP4 blk;
    // C's float -> uint8_t conversion as x86 does it: truncate to int32, keep the low byte.
    blk.e = amax > 0 ? static_cast<uint8_t>(static_cast<int32_t>(std::floor(std::log2(amax)) - 2 + 127)) : 0;
    const float d = E8M0Half(blk.e);
    auto nearest = [d](float v) {
      int best = 0;
      float best_err = std::fabs(kMXFP4Values[0] * d - v);
      for (int i = 1; i < 16; ++i) {
        const float err = std::fabs(kMXFP4Values[i] * d - v);
        if (err < best_err) {
          best = i;
          best_err = err;
        }
      }
      return best;
    };
    for (int j = 0; j < 16; ++j) blk.qs[j] = static_cast<uint8_t>(nearest(xb[j]) | (nearest(xb[j + 16]) << 4));
    std::memcpy(y + b * sizeof(blk), &blk, sizeof(blk));
  }
}

// Symmetric fit x[i] ~= scale * (L[i] - nmax), L[i] - nmax in -nmax..nmax-1, weighted by qw
// or, without, by x^2 (ggml's make_qx_quants with rmse_type 1): starts from the grid
// that maps the largest-magnitude value to -nmax, tries 18 nearby grids, and keeps the one
// maximising (sum w x l)^2 / sum w l^2, i.e. minimising the weighted error at the optimal scale.
float FitScaleSymmetric(int n, int nmax, const float* x, int8_t* L, const float* qw) {
  float amax = 0, max = 0;
  for (int i = 0; i < n; ++i) {
    if (std::fabs(x[i]) > amax) {
      amax = std::fabs(x[i]);
      max = x[i];
    }
  }
  if (amax < 1e-15f) {  // all (practically) zero
    for (int i = 0; i < n; ++i) L[i] = 0;
    return 0.f;
  }
  auto sums = [&](float iscale, float* sumlx, float* suml2, int8_t* out) {
    *sumlx = 0;
    *suml2 = 0;
    for (int i = 0; i < n; ++i) {
      int l = NearestInt(iscale * x[i]);
      l = l < -nmax ? -nmax : (l > nmax - 1 ? nmax - 1 : l);
      if (out) out[i] = static_cast<int8_t>(l + nmax);
      const float w = qw ? qw[i] : x[i] * x[i];
      *sumlx += w * x[i] * l;
      *suml2 += w * l * l;
    }
  };
  float sumlx, suml2;
  sums(-nmax / max, &sumlx, &suml2, L);
  float scale = suml2 != 0 ? sumlx / suml2 : 0.0f;
  float best = scale * sumlx;
  for (int k = -9; k <= 9; ++k) {
    if (k == 0) continue;
    const float iscale = -(nmax + 0.1f * k) / max;
    sums(iscale, &sumlx, &suml2, nullptr);
    if (suml2 > 0 && sumlx * sumlx > best * suml2) {
      sums(iscale, &sumlx, &suml2, L);
      scale = sumlx / suml2;
      best = scale * sumlx;
    }
  }
  return scale;
}

// qw: importance weights per column of the row (ggml's quantize_row_q6_K_impl), or null.
void QuantizeQ6_K(const float* x, uint8_t* y, int64_t nb, const float* qw) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK_K;  // [256] = 16 sub-blocks of 16
    int8_t L[kQK_K];                  // levels 0..63 (value + 32)
    float scales[16];
    float max_scale = 0, max_abs_scale = 0;
    for (int j = 0; j < 16; ++j) {
      scales[j] = FitScaleSymmetric(16, 32, xb + 16 * j, L + 16 * j, qw ? qw + b * kQK_K + 16 * j : nullptr);
      if (std::fabs(scales[j]) > max_abs_scale) {
        max_abs_scale = std::fabs(scales[j]);
        max_scale = scales[j];
      }
    }
    BlockQ6_K blk;
    if (max_abs_scale < 1e-15f) {
      std::memset(&blk, 0, sizeof(blk));
      std::memcpy(y + b * sizeof(BlockQ6_K), &blk, sizeof(blk));
      continue;
    }
    // int8 sub-block scales relative to one f16 super-scale; the largest maps to -128.
    const float iscale = -128.f / max_scale;
    blk.d = F32ToF16(1 / iscale);
    for (int j = 0; j < 16; ++j) {
      const int s = NearestInt(iscale * scales[j]);
      blk.scales[j] = static_cast<int8_t>(s > 127 ? 127 : (s < -128 ? -128 : s));
    }
    const float d_all = F16ToF32(blk.d);
    for (int j = 0; j < 16; ++j) {
      const float d = d_all * blk.scales[j];
      if (d == 0.f) continue;  // keeps the fit's levels (they multiply 0)
      for (int l = 0; l < 16; ++l) {
        const int q = NearestInt(xb[16 * j + l] / d);
        L[16 * j + l] = static_cast<int8_t>((q < -32 ? -32 : (q > 31 ? 31 : q)) + 32);
      }
    }
    ref::PackQ6KQuants(reinterpret_cast<const uint8_t*>(L), blk.ql, blk.qh);
    std::memcpy(y + b * sizeof(BlockQ6_K), &blk, sizeof(blk));
  }
}

void ActivationsQ8_KDispatch(const float* x, uint8_t* y, int64_t n) {
  HWY_DYNAMIC_DISPATCH(ActivationsQ8_K)(x, y, n / kQK_K);
}

}  // namespace

void QuantizeRow(DType t, const float* x, void* y, int64_t n, const float* importance) {
  uint8_t* out = static_cast<uint8_t*>(y);
  const float* qw = QuantizerUsesImportance(t) ? importance : nullptr;
  switch (t) {
    case DType::kF32:
      if (n > 0) std::memcpy(out, x, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::kF16: HWY_DYNAMIC_DISPATCH(ActivationsF16)(x, out, n); return;
    case DType::kBF16: HWY_DYNAMIC_DISPATCH(ActivationsBF16)(x, out, n); return;
    case DType::kQ8_0: QuantizeQ8_0Ref(x, out, n / kQK8_0); return;
    // ggml's block-32 quantizers without an importance matrix are the *_ref ones.
    case DType::kQ4_0:
      return qw ? QuantizeBlock32Weighted<BlockQ4_0>(x, out, n, qw) : QuantizeQ4_0Ref(x, out, n / kQK4_0);
    case DType::kQ4_1:
      return qw ? QuantizeBlock32Weighted<BlockQ4_1>(x, out, n, qw) : QuantizeMinRef<BlockQ4_1>(x, out, n / kQK4_0);
    case DType::kQ5_0:
      return qw ? QuantizeBlock32Weighted<BlockQ5_0>(x, out, n, qw) : QuantizeQ5_0Ref(x, out, n / kQK4_0);
    case DType::kQ5_1:
      return qw ? QuantizeBlock32Weighted<BlockQ5_1>(x, out, n, qw) : QuantizeMinRef<BlockQ5_1>(x, out, n / kQK4_0);
    case DType::kQ8_1: HWY_DYNAMIC_DISPATCH(ActivationsQ8_1)(x, out, n / kQK8_0); return;
    case DType::kQ2_K: QuantizeQ2_K(x, out, n / kQK_K, qw); return;
    case DType::kQ3_K: QuantizeQ3_K(x, out, n / kQK_K, qw); return;
    case DType::kQ4_K: QuantizeScaleMinK<BlockQ4_K>(x, out, n / kQK_K, qw); return;
    case DType::kQ5_K: QuantizeScaleMinK<BlockQ5_K>(x, out, n / kQK_K, qw); return;
    case DType::kQ6_K: QuantizeQ6_K(x, out, n / kQK_K, qw); return;
    case DType::kIQ4_NL: QuantizeIQ4_NL(x, out, n / kQK4_0, qw); return;
    case DType::kIQ4_XS: QuantizeIQ4_XS(x, out, n / kQK_K, qw); return;
    case DType::kMXFP4: QuantizeMXFP4Ref(x, out, n / kQK4_0); return;
    case DType::kIQ2_XXS:
    case DType::kIQ3_XXS:
    case DType::kIQ3_S:
    case DType::kIQ2_XS:
    case DType::kIQ2_S:
    case DType::kIQ1_S:
    case DType::kIQ1_M: QuantizeIQGridRow(t, x, out, n, qw); return;
    case DType::kQ8_K: ActivationsQ8_KDispatch(x, out, n); return;  // same as the reference
    default: MOE_ASSERT(false && "QuantizeRow: unsupported type");
  }
}

// Every block-quantized weight type but q8_0 and mxfp4, whose ggml quantizers ignore the matrix.
bool QuantizerUsesImportance(DType t) {
  return IsWeightType(t) && Traits(t).block_size > 1 && t != DType::kQ8_0 && t != DType::kMXFP4;
}

void DequantizeRow(DType t, const void* x, float* y, int64_t n) {
  const uint8_t* in = static_cast<const uint8_t*>(x);
  switch (t) {
    case DType::kF32:
      if (n > 0) std::memcpy(y, in, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::kF16: HWY_DYNAMIC_DISPATCH(WidenF16)(in, y, n); return;
    case DType::kBF16: HWY_DYNAMIC_DISPATCH(WidenBF16)(in, y, n); return;
    case DType::kQ8_0:
    case DType::kQ4_0:
    case DType::kQ4_1:
    case DType::kQ5_0:
    case DType::kQ5_1:
    case DType::kQ8_1:
    case DType::kQ2_K:
    case DType::kQ3_K:
    case DType::kQ4_K:
    case DType::kQ5_K:
    case DType::kQ6_K:
    case DType::kQ8_K:
    case DType::kIQ4_NL:
    case DType::kIQ4_XS:
    case DType::kMXFP4:
    case DType::kIQ2_XXS:
    case DType::kIQ3_XXS:
    case DType::kIQ3_S:
    case DType::kIQ2_XS:
    case DType::kIQ2_S:
    case DType::kIQ1_S:
    case DType::kIQ1_M:
      // Not on a hot path (embedding rows, tools): the float reference is ggml's arithmetic.
      ref::DequantizeRow<float>(t, x, y, n);
      return;
    default: MOE_ASSERT(false && "DequantizeRow: unsupported type");
  }
}

void ConvertActivations(DType w, const float* x, void* y, int64_t n) {
  uint8_t* out = static_cast<uint8_t*>(y);
  switch (VecDotType(w)) {
    case DType::kF32:
      if (n > 0) std::memcpy(out, x, static_cast<size_t>(n) * sizeof(float));
      return;
    case DType::kF16: HWY_DYNAMIC_DISPATCH(ActivationsF16)(x, out, n); return;
    case DType::kBF16: HWY_DYNAMIC_DISPATCH(ActivationsBF16)(x, out, n); return;
    case DType::kQ8_0: HWY_DYNAMIC_DISPATCH(ActivationsQ8_0)(x, out, n / kQK8_0); return;
    case DType::kQ8_1: HWY_DYNAMIC_DISPATCH(ActivationsQ8_1)(x, out, n / kQK8_0); return;
    case DType::kQ8_K: ActivationsQ8_KDispatch(x, out, n); return;
    default: MOE_ASSERT(false && "ConvertActivations: unsupported vec-dot type");
  }
}

size_t ActivationRowBytes(DType w, int64_t n) { return RowBytes(VecDotType(w), n); }

}  // namespace moe::kernels
#endif  // HWY_ONCE
