// Unpacking of the codebook i-quants (iq2_xxs, iq2_xs, iq2_s, iq3_xxs, iq3_s) for the product
// kernels and the quantizers: a super-block is 32 groups of 8 quants; a group is 8 grid
// magnitudes (one byte each) and a sign byte (bit k: element k negative); the kSubBlocks
// sub-blocks (8 of 32 or 16 of 16) have odd integer scales s = 2 ls + 1, and the super-block a
// float d times a format constant, so x = d * kConst * s * magnitude * sign. (The plain
// references are in ref/quant_ref.h.)
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "tensor/dtype.h"
#include "tensor/iq_tables.h"
#include "util/compiler.h"  // MOE_ALWAYS_INLINE: the accessors run per group of 8 weights in the kernels

namespace moe::kernels {

// IQ2SignByte of every 7-bit index.
inline constexpr auto kIQ2Signs = [] {
  struct Table {
    uint8_t v[128];
    constexpr uint8_t operator[](uint32_t i) const { return v[i]; }
  } t{};
  for (uint32_t i = 0; i < 128; ++i) t.v[i] = IQ2SignByte(i);
  return t;
}();

struct IQGroup {
  uint64_t mag;  // byte k: magnitude of element k
  uint8_t sign;  // bit k: element k negative
};

// Bit k = the low bit of byte k.
inline uint8_t IQPackLowBits(uint64_t v) {
  return static_cast<uint8_t>((v * 0x0102040810204080ull) >> 56);
}

inline uint32_t IQLoadU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Per format: Group(blk, g) for g in 0..31, Scale(blk, j) = s_j for j in 0..7, kConst.
struct IQ2XXSFormat {
  using Block = BlockIQ2_XXS;
  static constexpr int kSubBlocks = 8;
  static constexpr float kConst = 0.125f;  // (0.5 + ls) / 4 = (2 ls + 1) / 8
  // Sub-block j: 8 bytes, the grid indices of its 4 groups then a word with their 7-bit sign
  // indices at 7 l and ls in the top nibble.
  MOE_ALWAYS_INLINE static uint32_t SignWord(const uint8_t* blk, int j) {
    return IQLoadU32(blk + offsetof(BlockIQ2_XXS, qs) + 8 * j + 4);
  }
  MOE_ALWAYS_INLINE static uint64_t Mag(const uint8_t* blk, int g) {
    return kIQ2XXSGrid[blk[offsetof(BlockIQ2_XXS, qs) + 8 * (g / 4) + g % 4]];
  }
  MOE_ALWAYS_INLINE static IQGroup Group(const uint8_t* blk, int g) {
    return {Mag(blk, g), kIQ2Signs[(SignWord(blk, g / 4) >> (7 * (g % 4))) & 127]};
  }
  MOE_ALWAYS_INLINE static int Scale(const uint8_t* blk, int j) {
    return 2 * static_cast<int>(SignWord(blk, j) >> 28) + 1;
  }
};

struct IQ3XXSFormat {
  using Block = BlockIQ3_XXS;
  static constexpr int kSubBlocks = 8;
  static constexpr float kConst = 0.25f;  // (0.5 + ls) / 2 = (2 ls + 1) / 4
  // Sub-block j's word after the 64 index bytes: 7-bit sign indices at 7 l, ls on top.
  MOE_ALWAYS_INLINE static uint32_t SignWord(const uint8_t* blk, int j) {
    return IQLoadU32(blk + offsetof(BlockIQ3_XXS, qs) + kQK_K / 4 + 4 * j);
  }
  MOE_ALWAYS_INLINE static uint64_t Mag(const uint8_t* blk, int g) {
    const uint8_t* qs = blk + offsetof(BlockIQ3_XXS, qs);
    return kIQ3XXSGrid[qs[2 * g]] | uint64_t{kIQ3XXSGrid[qs[2 * g + 1]]} << 32;
  }
  MOE_ALWAYS_INLINE static IQGroup Group(const uint8_t* blk, int g) {
    return {Mag(blk, g), kIQ2Signs[(SignWord(blk, g / 4) >> (7 * (g % 4))) & 127]};
  }
  MOE_ALWAYS_INLINE static int Scale(const uint8_t* blk, int j) {
    return 2 * static_cast<int>(SignWord(blk, j) >> 28) + 1;
  }
};

struct IQ3SFormat {
  using Block = BlockIQ3_S;
  static constexpr int kSubBlocks = 8;
  static constexpr float kConst = 1.0f;
  MOE_ALWAYS_INLINE static uint64_t Mag(const uint8_t* blk, int g) {
    const uint8_t* qs = blk + offsetof(BlockIQ3_S, qs);
    const int h = blk[offsetof(BlockIQ3_S, qh) + g / 4] >> (2 * (g % 4));
    const int i0 = qs[2 * g] | ((h & 1) << 8), i1 = qs[2 * g + 1] | ((h & 2) << 7);
    return kIQ3SGrid[i0] | uint64_t{kIQ3SGrid[i1]} << 32;
  }
  MOE_ALWAYS_INLINE static IQGroup Group(const uint8_t* blk, int g) {
    return {Mag(blk, g), blk[offsetof(BlockIQ3_S, signs) + g]};
  }
  MOE_ALWAYS_INLINE static int Scale(const uint8_t* blk, int j) {
    return 2 * ((blk[offsetof(BlockIQ3_S, scales) + j / 2] >> (4 * (j % 2))) & 0xF) + 1;
  }
};

// iq1_s: signed grid bytes (-1, 0, 1) and a per-sub-block delta of +-1/8 (DeltaSign), the
// kernels' "min" term.
struct IQ1SFormat {
  using Block = BlockIQ1_S;
  static constexpr int kSubBlocks = 8;
  static constexpr float kConst = 1.0f;
  MOE_ALWAYS_INLINE static uint16_t Qh(const uint8_t* blk, int j) {
    uint16_t h;
    std::memcpy(&h, blk + offsetof(BlockIQ1_S, qh) + 2 * j, sizeof(h));
    return h;
  }
  MOE_ALWAYS_INLINE static IQGroup Group(const uint8_t* blk, int g) {
    const int idx = blk[offsetof(BlockIQ1_S, qs) + g] | (((Qh(blk, g / 4) >> (3 * (g % 4))) & 7) << 8);
    const uint64_t v = kIQ1SGrid[idx];
    // Bytes are 0x00, 0x01 or 0xff: magnitude = low bit, sign = the top bit.
    return {v & 0x0101010101010101ull, IQPackLowBits((v >> 7) & 0x0101010101010101ull)};
  }
  MOE_ALWAYS_INLINE static int Scale(const uint8_t* blk, int j) { return 2 * ((Qh(blk, j) >> 12) & 7) + 1; }
  MOE_ALWAYS_INLINE static int DeltaSign(const uint8_t* blk, int j) { return Qh(blk, j) & 0x8000 ? -1 : 1; }
};

// iq1_m: iq1_s's grid in 16 sub-blocks of 16 with a delta sign per group and d spread over the
// scale words. A value is d s (g + delta) = d/8 s (8 g +- 1): magnitudes 1, 7 or 9 with
// the sign of g (or of delta where g = 0), so the delta needs no term of its own. ggml's x86
// kernel puts g's and delta's signs on the activation separately, so for an activation of -128
// (which negation leaves at -128) it forms -128 (8 |g| + 1): magnitude 9 where the value's is 7
// (IQ1MWrapMagnitude; the kernels' "alt" weights).
struct IQ1MFormat {
  using Block = BlockIQ1_M;
  static constexpr int kSubBlocks = 16;
  static constexpr float kConst = 0.125f;
  MOE_ALWAYS_INLINE static uint16_t DBits(const uint8_t* blk) {
    return IQ1MScaleBits(blk + offsetof(BlockIQ1_M, scales));
  }
  MOE_ALWAYS_INLINE static IQGroup Group(const uint8_t* blk, int g) {
    const int h = blk[offsetof(BlockIQ1_M, qh) + g / 2] >> (4 * (g % 2));
    const uint64_t v = kIQ1SGrid[blk[offsetof(BlockIQ1_M, qs) + g] | ((h & 7) << 8)];
    constexpr uint64_t kOnes = 0x0101010101010101ull;
    const uint64_t nonzero = v & kOnes, neg_g = (v >> 7) & kOnes;
    const uint64_t neg_delta = kOnes * ((h >> 3) & 1);  // (no branch: the signs are random)
    const uint64_t differ = (neg_g ^ neg_delta) & nonzero;  // 8 g and delta of opposite signs
    const uint64_t neg = (nonzero & neg_g) | (~nonzero & neg_delta);
    return {((nonzero << 3) | kOnes) - (differ << 1), IQPackLowBits(neg)};  // 8 |g| + 1, less 2 where they differ
  }
  MOE_ALWAYS_INLINE static int Scale(const uint8_t* blk, int j) {
    const uint8_t* sc = blk + offsetof(BlockIQ1_M, scales) + 2 * (j / 4);
    return 2 * (((sc[0] | (sc[1] << 8)) >> (3 * (j % 4))) & 7) + 1;
  }
};

template <class F>
constexpr bool HasWrapAlt() {
  return std::is_same_v<F, IQ1MFormat>;
}

// What an iq1_m element of magnitude m meets an activation of -128 with: 8 |g| + 1.
constexpr int IQ1MWrapMagnitude(int m) { return m == 7 ? 9 : m; }

template <class F>
constexpr bool HasDelta() {
  return requires(const uint8_t* b) { F::DeltaSign(b, 0); };
}

// 16 sub-blocks of 16: two 4-bit ls per byte of scales.
inline int IQScale16(const uint8_t* scales, int j) { return 2 * ((scales[j / 2] >> (4 * (j % 2))) & 0xF) + 1; }

struct IQ2XSFormat {
  using Block = BlockIQ2_XS;
  static constexpr int kSubBlocks = 16;
  static constexpr float kConst = 0.125f;
  MOE_ALWAYS_INLINE static uint16_t Q(const uint8_t* blk, int g) {
    uint16_t q;
    std::memcpy(&q, blk + offsetof(BlockIQ2_XS, qs) + 2 * g, sizeof(q));
    return q;
  }
  MOE_ALWAYS_INLINE static uint64_t Mag(const uint8_t* blk, int g) { return kIQ2XSGrid[Q(blk, g) & 511]; }
  MOE_ALWAYS_INLINE static IQGroup Group(const uint8_t* blk, int g) {
    return {Mag(blk, g), kIQ2Signs[Q(blk, g) >> 9]};
  }
  MOE_ALWAYS_INLINE static int Scale(const uint8_t* blk, int j) {
    return IQScale16(blk + offsetof(BlockIQ2_XS, scales), j);
  }
};

struct IQ2SFormat {
  using Block = BlockIQ2_S;
  static constexpr int kSubBlocks = 16;
  static constexpr float kConst = 0.125f;
  MOE_ALWAYS_INLINE static uint64_t Mag(const uint8_t* blk, int g) {
    const int hi = (blk[offsetof(BlockIQ2_S, qh) + g / 4] >> (2 * (g % 4))) & 3;
    return kIQ2SGrid[blk[offsetof(BlockIQ2_S, qs) + g] | (hi << 8)];
  }
  MOE_ALWAYS_INLINE static IQGroup Group(const uint8_t* blk, int g) {
    return {Mag(blk, g), blk[offsetof(BlockIQ2_S, qs) + 32 + g]};
  }
  MOE_ALWAYS_INLINE static int Scale(const uint8_t* blk, int j) {
    return IQScale16(blk + offsetof(BlockIQ2_S, scales), j);
  }
};

}  // namespace moe::kernels
