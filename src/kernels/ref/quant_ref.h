// Scalar references for the block formats of tensor/dtype.h: dequantization of every block type,
// templated on the output element type (float gives exactly ggml's dequantize_row_* values;
// double gives the same formula without float rounding, for product-kernel tests), plus the
// bit-packing helpers of the k-quants shared by the quantizers in kernels/quant.cc.
//
// Header-only and deliberately plain: no SIMD, no lookup tables, and an arithmetic binary16
// decoder (ldexp) that is independent of the bit-level one in quant.cc, so tests can check the
// fast code against it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "tensor/dtype.h"
#include "tensor/iq_tables.h"
#include "util/error.h"

namespace moe::kernels::ref {

// Value of an IEEE binary16 bit pattern, by arithmetic (not bit shuffling). Exact in float.
template <typename T>
T HalfValue(uint16_t h) {
  const bool neg = (h & 0x8000) != 0;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  T v;
  if (exp == 0x1f) {
    v = mant ? std::numeric_limits<T>::quiet_NaN() : std::numeric_limits<T>::infinity();
  } else if (exp == 0) {
    v = static_cast<T>(std::ldexp(static_cast<double>(mant), -24));  // subnormal: mant * 2^-24
  } else {
    v = static_cast<T>(std::ldexp(static_cast<double>(1024 + mant), exp - 25));
  }
  return neg ? -v : v;
}

// Value of a bfloat16 bit pattern: the top half of a binary32.
template <typename T>
T BF16Value(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return static_cast<T>(f);
}

// ---- q4_K 6-bit scale/min packing (12 bytes for 8 sub-blocks; GGUF-MOE.md §7) ----

// Unpacks sub-block j's (0..7) 6-bit scale and min.
inline void GetScaleMinK4(int j, const uint8_t* scales, uint8_t* sc, uint8_t* m) {
  if (j < 4) {
    *sc = scales[j] & 63;
    *m = scales[j + 4] & 63;
  } else {
    *sc = static_cast<uint8_t>((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));
  }
}

// Packs 8 scales and 8 mins (each 0..63) into the 12-byte layout GetScaleMinK4 reads.
inline void PackScaleMinK4(const uint8_t* sc, const uint8_t* m, uint8_t* scales) {
  // Sub-blocks 0..3 keep their low 6 bits in bytes 0..7; the top 2 bits of bytes 0..7 carry
  // the high bits of sub-blocks 4..7, whose low nibbles live in bytes 8..11.
  for (int j = 0; j < 4; ++j) {
    scales[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    scales[j + 4] = static_cast<uint8_t>((m[j] & 63) | ((m[j + 4] >> 4) << 6));
    scales[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0xF) | ((m[j + 4] & 0xF) << 4));
  }
}

// Packs 256 4-bit levels L (0..15) into q4_K qs: 32-byte chunk c holds sub-block 2c in the low
// nibbles and sub-block 2c+1 in the high nibbles.
inline void PackQ4KQuants(const uint8_t* L, uint8_t* qs) {
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      qs[32 * c + l] = static_cast<uint8_t>((L[64 * c + l] & 0xF) | (L[64 * c + 32 + l] << 4));
    }
  }
}

// Packs 256 2-bit levels (0..3) into q2_K / q3_K qs: per half h of 128, element 128h + 32k + l
// at bits 2k of qs[32h + l].
inline void PackQ2Quants(const uint8_t* L, uint8_t* qs) {
  for (int h = 0; h < 2; ++h) {
    for (int l = 0; l < 32; ++l) {
      const uint8_t* Lh = L + 128 * h;
      qs[32 * h + l] = static_cast<uint8_t>(Lh[l] | (Lh[l + 32] << 2) | (Lh[l + 64] << 4) |
                                            (Lh[l + 96] << 6));
    }
  }
}

// q3_K's 16 6-bit scales (stored + 32) from its 12 bytes: scale j's low 4 bits are the low
// (j < 8) or high (j >= 8) nibble of byte j % 8, its top 2 bits bits 2 (j / 4) of byte 8 + j % 4.
inline int Q3KScale(const uint8_t* scales, int j) {
  const int lo = j < 8 ? scales[j] & 0xF : scales[j - 8] >> 4;
  const int hi = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
  return (lo | (hi << 4)) - 32;
}

// Packs 256 5-bit levels L (0..31) into q5_K qh/qs: the low 4 bits as PackQ4KQuants, the 5th
// bit of quant l of sub-block j at bit j of qh[l].
inline void PackQ5KQuants(const uint8_t* L, uint8_t* qh, uint8_t* qs) {
  uint8_t lo[kQK_K];
  for (int l = 0; l < 32; ++l) qh[l] = 0;
  for (int i = 0; i < kQK_K; ++i) {
    lo[i] = L[i] & 0xF;
    qh[i % 32] = static_cast<uint8_t>(qh[i % 32] | ((L[i] >> 4) << (i / 32)));
  }
  PackQ4KQuants(lo, qs);
}

// Packs 256 6-bit levels L (0..63, value + 32) into q6_K ql/qh, the inverse of the dequant
// below: per half of 128, ql[l] = lo4(L[l]) | lo4(L[l+64]) << 4, ql[l+32] = lo4(L[l+32]) |
// lo4(L[l+96]) << 4, qh[l] = the top 2 bits of L[l], L[l+32], L[l+64], L[l+96] at bits 0,2,4,6.
inline void PackQ6KQuants(const uint8_t* L, uint8_t* ql, uint8_t* qh) {
  for (int half = 0; half < 2; ++half) {
    const uint8_t* Lh = L + 128 * half;
    uint8_t* qlh = ql + 64 * half;
    uint8_t* qhh = qh + 32 * half;
    for (int l = 0; l < 32; ++l) {
      qlh[l] = static_cast<uint8_t>((Lh[l] & 0xF) | ((Lh[l + 64] & 0xF) << 4));
      qlh[l + 32] = static_cast<uint8_t>((Lh[l + 32] & 0xF) | ((Lh[l + 96] & 0xF) << 4));
      qhh[l] = static_cast<uint8_t>((Lh[l] >> 4) | ((Lh[l + 32] >> 4) << 2) |
                                    ((Lh[l + 64] >> 4) << 4) | ((Lh[l + 96] >> 4) << 6));
    }
  }
}

// ---- dequantization, one block at a time ----
// Blocks are read through a local copy (LoadBlock): rows inside files and activation buffers
// need not be aligned to the block structs' alignment.

template <typename Block>
Block LoadBlock(const void* x, int64_t b) {
  Block blk;
  std::memcpy(&blk, static_cast<const uint8_t*>(x) + b * static_cast<int64_t>(sizeof(Block)),
              sizeof(Block));
  return blk;
}

template <typename T>
void DequantizeBlock(const BlockQ8_0& x, T* y) {  // y: [32]
  const T d = HalfValue<T>(x.d);
  for (int j = 0; j < kQK8_0; ++j) y[j] = static_cast<T>(x.qs[j]) * d;
}

template <typename T>
void DequantizeBlock(const BlockQ4_0& x, T* y) {  // y: [32], low nibbles first, then high
  const T d = HalfValue<T>(x.d);
  for (int j = 0; j < kQK4_0 / 2; ++j) {
    y[j] = static_cast<T>((x.qs[j] & 0xF) - 8) * d;
    y[j + kQK4_0 / 2] = static_cast<T>((x.qs[j] >> 4) - 8) * d;
  }
}

template <typename T>
void DequantizeBlock(const BlockQ4_1& x, T* y) {  // y: [32]
  const T d = HalfValue<T>(x.d), m = HalfValue<T>(x.m);
  for (int j = 0; j < kQK4_0 / 2; ++j) {
    y[j] = static_cast<T>(x.qs[j] & 0xF) * d + m;
    y[j + kQK4_0 / 2] = static_cast<T>(x.qs[j] >> 4) * d + m;
  }
}

// The 5-bit levels of q5_0 / q5_1: nibbles from qs, bit j of qh (little-endian) on element j.
inline int Q5Level(const uint8_t* qs, const uint8_t* qh, int j) {
  const uint32_t h = uint32_t{qh[0]} | uint32_t{qh[1]} << 8 | uint32_t{qh[2]} << 16 |
                     uint32_t{qh[3]} << 24;
  const int lo = j < 16 ? qs[j] & 0xF : qs[j - 16] >> 4;
  return lo | static_cast<int>(((h >> j) & 1) << 4);
}

template <typename T>
void DequantizeBlock(const BlockQ5_0& x, T* y) {  // y: [32]
  const T d = HalfValue<T>(x.d);
  for (int j = 0; j < kQK4_0; ++j) y[j] = static_cast<T>(Q5Level(x.qs, x.qh, j) - 16) * d;
}

template <typename T>
void DequantizeBlock(const BlockQ5_1& x, T* y) {  // y: [32]
  const T d = HalfValue<T>(x.d), m = HalfValue<T>(x.m);
  for (int j = 0; j < kQK4_0; ++j) y[j] = static_cast<T>(Q5Level(x.qs, x.qh, j)) * d + m;
}

template <typename T>
void DequantizeBlock(const BlockQ8_1& x, T* y) {  // y: [32] (s is the products' business)
  const T d = HalfValue<T>(x.d);
  for (int j = 0; j < kQK8_0; ++j) y[j] = static_cast<T>(x.qs[j]) * d;
}

template <typename T>
void DequantizeBlock(const BlockQ2_K& x, T* y) {  // y: [256] = 16 sub-blocks of 16
  const T d = HalfValue<T>(x.d), dmin = HalfValue<T>(x.dmin);
  for (int e = 0; e < kQK_K; ++e) {
    const int h = e / 128, k = (e % 128) / 32, l = e % 32, j = e / 16;
    const int q = (x.qs[32 * h + l] >> (2 * k)) & 3;
    // Products first, then d_j * q - m_j, in the order ggml does the float operations.
    const T dl = d * static_cast<T>(x.scales[j] & 0xF), ml = dmin * static_cast<T>(x.scales[j] >> 4);
    y[e] = dl * static_cast<T>(q) - ml;
  }
}

template <typename T>
void DequantizeBlock(const BlockQ3_K& x, T* y) {  // y: [256] = 16 sub-blocks of 16
  const T d = HalfValue<T>(x.d);
  for (int e = 0; e < kQK_K; ++e) {
    const int h = e / 128, k = (e % 128) / 32, l = e % 32;
    const int q = ((x.qs[32 * h + l] >> (2 * k)) & 3) - ((x.hmask[l] >> (e / 32)) & 1 ? 0 : 4);
    y[e] = d * static_cast<T>(Q3KScale(x.scales, e / 16)) * static_cast<T>(q);
  }
}

template <typename T>
void DequantizeBlock(const BlockIQ4_NL& x, T* y) {  // y: [32]
  const T d = HalfValue<T>(x.d);
  for (int j = 0; j < 16; ++j) {
    y[j] = d * static_cast<T>(kIQ4NLValues[x.qs[j] & 0xF]);
    y[j + 16] = d * static_cast<T>(kIQ4NLValues[x.qs[j] >> 4]);
  }
}

template <typename T>
void DequantizeBlock(const BlockMXFP4& x, T* y) {  // y: [32]
  const T d = static_cast<T>(std::ldexp(1.0, static_cast<int>(x.e) - 128));  // 2^(e-128), by arithmetic
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<T>(kMXFP4Values[x.qs[j] & 0xF]) * d;
    y[j + 16] = static_cast<T>(kMXFP4Values[x.qs[j] >> 4]) * d;
  }
}

// Byte k of a grid entry.
template <typename G>
inline int GridByte(G entry, int k) {
  return static_cast<int>((entry >> (8 * k)) & 0xFF);
}

inline uint32_t LoadU32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
void DequantizeBlock(const BlockIQ2_XXS& x, T* y) {  // y: [256]
  const T d = HalfValue<T>(x.d);
  const uint8_t* qs = reinterpret_cast<const uint8_t*>(x.qs);
  for (int j = 0; j < 8; ++j) {
    const uint32_t idx = LoadU32(qs + 8 * j), aux = LoadU32(qs + 8 * j + 4);
    const T db = d * (static_cast<T>(0.5) + static_cast<T>(aux >> 28)) * static_cast<T>(0.25);
    for (int l = 0; l < 4; ++l) {
      const uint64_t g = kIQ2XXSGrid[(idx >> (8 * l)) & 0xFF];
      const uint8_t sign = IQ2SignByte((aux >> (7 * l)) & 127);
      for (int k = 0; k < 8; ++k) {
        y[32 * j + 8 * l + k] = db * static_cast<T>(GridByte(g, k)) * static_cast<T>((sign >> k) & 1 ? -1 : 1);
      }
    }
  }
}

template <typename T>
void DequantizeBlock(const BlockIQ2_XS& x, T* y) {  // y: [256]
  const T d = HalfValue<T>(x.d);
  for (int g = 0; g < 32; ++g) {
    const int j = g / 2;  // sub-block of 16
    const int ls = (x.scales[j / 2] >> (4 * (j % 2))) & 0xF;
    const T db = d * (static_cast<T>(0.5) + static_cast<T>(ls)) * static_cast<T>(0.25);
    const uint64_t grid = kIQ2XSGrid[x.qs[g] & 511];
    const uint8_t sign = IQ2SignByte(x.qs[g] >> 9);
    for (int k = 0; k < 8; ++k) {
      y[8 * g + k] = db * static_cast<T>(GridByte(grid, k)) * static_cast<T>((sign >> k) & 1 ? -1 : 1);
    }
  }
}

template <typename T>
void DequantizeBlock(const BlockIQ2_S& x, T* y) {  // y: [256]
  const T d = HalfValue<T>(x.d);
  for (int g = 0; g < 32; ++g) {
    const int j = g / 2;
    const int ls = (x.scales[j / 2] >> (4 * (j % 2))) & 0xF;
    const T db = d * (static_cast<T>(0.5) + static_cast<T>(ls)) * static_cast<T>(0.25);
    const int idx = x.qs[g] | (((x.qh[g / 4] >> (2 * (g % 4))) & 3) << 8);
    const uint64_t grid = kIQ2SGrid[idx];
    const uint8_t sign = x.qs[32 + g];
    for (int k = 0; k < 8; ++k) {
      y[8 * g + k] = db * static_cast<T>(GridByte(grid, k)) * static_cast<T>((sign >> k) & 1 ? -1 : 1);
    }
  }
}

template <typename T>
void DequantizeBlock(const BlockIQ1_S& x, T* y) {  // y: [256]
  const T d = HalfValue<T>(x.d);
  for (int j = 0; j < 8; ++j) {
    const T dl = d * static_cast<T>(2 * ((x.qh[j] >> 12) & 7) + 1);
    const T delta = static_cast<T>(x.qh[j] & 0x8000 ? -kIQ1SDelta : kIQ1SDelta);
    for (int l = 0; l < 4; ++l) {
      const uint64_t g = kIQ1SGrid[x.qs[4 * j + l] | (((x.qh[j] >> (3 * l)) & 7) << 8)];
      for (int k = 0; k < 8; ++k) {
        const int v = static_cast<int8_t>(GridByte(g, k));
        y[32 * j + 8 * l + k] = dl * (static_cast<T>(v) + delta);
      }
    }
  }
}

// Sub-block j (of 16) of an iq1_m block: its 3-bit ls.
inline int IQ1MLs(const uint8_t* scales, int j) {
  const int w = scales[2 * (j / 4)] | (scales[2 * (j / 4) + 1] << 8);
  return (w >> (3 * (j % 4))) & 7;
}

template <typename T>
void DequantizeBlock(const BlockIQ1_M& x, T* y) {  // y: [256]
  const T d = HalfValue<T>(IQ1MScaleBits(x.scales));
  for (int g = 0; g < 32; ++g) {
    const T dl = d * static_cast<T>(2 * IQ1MLs(x.scales, g / 2) + 1);
    const int h = x.qh[g / 2] >> (4 * (g % 2));
    const T delta = static_cast<T>(h & 8 ? -kIQ1SDelta : kIQ1SDelta);
    const uint64_t grid = kIQ1SGrid[x.qs[g] | ((h & 7) << 8)];
    for (int k = 0; k < 8; ++k) {
      y[8 * g + k] = dl * (static_cast<T>(static_cast<int8_t>(GridByte(grid, k))) + delta);
    }
  }
}

template <typename T>
void DequantizeBlock(const BlockIQ3_XXS& x, T* y) {  // y: [256]
  const T d = HalfValue<T>(x.d);
  for (int j = 0; j < 8; ++j) {
    const uint32_t aux = LoadU32(x.qs + kQK_K / 4 + 4 * j);
    const T db = d * (static_cast<T>(0.5) + static_cast<T>(aux >> 28)) * static_cast<T>(0.5);
    for (int l = 0; l < 4; ++l) {
      const uint8_t sign = IQ2SignByte((aux >> (7 * l)) & 127);
      const uint32_t g[2] = {kIQ3XXSGrid[x.qs[8 * j + 2 * l]], kIQ3XXSGrid[x.qs[8 * j + 2 * l + 1]]};
      for (int k = 0; k < 8; ++k) {
        y[32 * j + 8 * l + k] = db * static_cast<T>(GridByte(g[k / 4], k % 4)) * static_cast<T>((sign >> k) & 1 ? -1 : 1);
      }
    }
  }
}

template <typename T>
void DequantizeBlock(const BlockIQ3_S& x, T* y) {  // y: [256]
  const T d = HalfValue<T>(x.d);
  for (int j = 0; j < 8; ++j) {
    const int ls = (x.scales[j / 2] >> (4 * (j % 2))) & 0xF;
    const T db = d * static_cast<T>(1 + 2 * ls);
    for (int l = 0; l < 4; ++l) {
      const int i0 = x.qs[8 * j + 2 * l] | (((x.qh[j] >> (2 * l)) & 1) << 8);
      const int i1 = x.qs[8 * j + 2 * l + 1] | (((x.qh[j] >> (2 * l + 1)) & 1) << 8);
      const uint32_t g[2] = {kIQ3SGrid[i0], kIQ3SGrid[i1]};
      const uint8_t sign = x.signs[4 * j + l];
      for (int k = 0; k < 8; ++k) {
        y[32 * j + 8 * l + k] = db * static_cast<T>(GridByte(g[k / 4], k % 4)) * static_cast<T>((sign >> k) & 1 ? -1 : 1);
      }
    }
  }
}

// iq4_xs sub-block j's 6-bit scale (stored + 32).
inline int IQ4XSScale(const BlockIQ4_XS& x, int j) {
  const int lo = (x.scales_l[j / 2] >> (4 * (j % 2))) & 0xF;
  const int hi = (x.scales_h >> (2 * j)) & 3;
  return (lo | (hi << 4)) - 32;
}

template <typename T>
void DequantizeBlock(const BlockIQ4_XS& x, T* y) {  // y: [256] = 8 sub-blocks of 32
  const T d = HalfValue<T>(x.d);
  for (int j = 0; j < 8; ++j) {
    const T dl = d * static_cast<T>(IQ4XSScale(x, j));
    const uint8_t* qs = x.qs + 16 * j;
    for (int l = 0; l < 16; ++l) {
      y[32 * j + l] = dl * static_cast<T>(kIQ4NLValues[qs[l] & 0xF]);
      y[32 * j + l + 16] = dl * static_cast<T>(kIQ4NLValues[qs[l] >> 4]);
    }
  }
}

template <typename T>
void DequantizeBlock(const BlockQ4_K& x, T* y) {  // y: [256] = 8 sub-blocks of 32
  const T d = HalfValue<T>(x.d);
  const T dmin = HalfValue<T>(x.dmin);
  for (int c = 0; c < 4; ++c) {
    uint8_t sc0, m0, sc1, m1;
    GetScaleMinK4(2 * c, x.scales, &sc0, &m0);
    GetScaleMinK4(2 * c + 1, x.scales, &sc1, &m1);
    // Products formed first, then d_j * q - m_j, in the order ggml does the float operations.
    const T d0 = d * static_cast<T>(sc0), mm0 = dmin * static_cast<T>(m0);
    const T d1 = d * static_cast<T>(sc1), mm1 = dmin * static_cast<T>(m1);
    const uint8_t* q = x.qs + 32 * c;
    for (int l = 0; l < 32; ++l) y[64 * c + l] = d0 * static_cast<T>(q[l] & 0xF) - mm0;
    for (int l = 0; l < 32; ++l) y[64 * c + 32 + l] = d1 * static_cast<T>(q[l] >> 4) - mm1;
  }
}

template <typename T>
void DequantizeBlock(const BlockQ5_K& x, T* y) {  // y: [256] = 8 sub-blocks of 32
  const T d = HalfValue<T>(x.d);
  const T dmin = HalfValue<T>(x.dmin);
  for (int j = 0; j < 8; ++j) {
    uint8_t sc, m;
    GetScaleMinK4(j, x.scales, &sc, &m);
    const T dj = d * static_cast<T>(sc), mj = dmin * static_cast<T>(m);
    const uint8_t* q = x.qs + 32 * (j / 2);
    for (int l = 0; l < 32; ++l) {
      const int lo = (j & 1) ? q[l] >> 4 : q[l] & 0xF;
      const int level = lo | (((x.qh[l] >> j) & 1) << 4);
      y[32 * j + l] = dj * static_cast<T>(level) - mj;
    }
  }
}

template <typename T>
void DequantizeBlock(const BlockQ6_K& x, T* y) {  // y: [256] = 16 sub-blocks of 16
  const T d = HalfValue<T>(x.d);
  for (int half = 0; half < 2; ++half) {
    const uint8_t* ql = x.ql + 64 * half;
    const uint8_t* qh = x.qh + 32 * half;
    const int8_t* sc = x.scales + 8 * half;
    T* yh = y + 128 * half;  // [4][32]: row r uses scales sc[2r], sc[2r+1]
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      yh[l] = d * static_cast<T>(sc[is]) * static_cast<T>(q1);
      yh[l + 32] = d * static_cast<T>(sc[is + 2]) * static_cast<T>(q2);
      yh[l + 64] = d * static_cast<T>(sc[is + 4]) * static_cast<T>(q3);
      yh[l + 96] = d * static_cast<T>(sc[is + 6]) * static_cast<T>(q4);
    }
  }
}

template <typename T>
void DequantizeBlock(const BlockQ8_K& x, T* y) {  // y: [256]
  const T d = static_cast<T>(x.d);
  for (int j = 0; j < kQK_K; ++j) y[j] = d * static_cast<T>(x.qs[j]);
}

template <typename Block, typename T>
void DequantizeBlocks(const void* x, T* y, int64_t n, int64_t block_size) {
  for (int64_t b = 0; b < n / block_size; ++b) {
    DequantizeBlock(LoadBlock<Block>(x, b), y + b * block_size);
  }
}

// y[0..n) = dequant(x) for every type of tensor/dtype.h but i32.
template <typename T>
void DequantizeRow(DType t, const void* x, T* y, int64_t n) {
  switch (t) {
    case DType::kF32: {
      float f;
      for (int64_t i = 0; i < n; ++i) {
        std::memcpy(&f, static_cast<const uint8_t*>(x) + 4 * i, 4);
        y[i] = static_cast<T>(f);
      }
      return;
    }
    case DType::kF16: {
      uint16_t h;
      for (int64_t i = 0; i < n; ++i) {  // memcpy: x need not be 2-byte aligned
        std::memcpy(&h, static_cast<const uint8_t*>(x) + 2 * i, 2);
        y[i] = HalfValue<T>(h);
      }
      return;
    }
    case DType::kBF16: {
      uint16_t h;
      for (int64_t i = 0; i < n; ++i) {
        std::memcpy(&h, static_cast<const uint8_t*>(x) + 2 * i, 2);
        y[i] = BF16Value<T>(h);
      }
      return;
    }
    case DType::kQ8_0: return DequantizeBlocks<BlockQ8_0>(x, y, n, kQK8_0);
    case DType::kQ4_0: return DequantizeBlocks<BlockQ4_0>(x, y, n, kQK4_0);
    case DType::kQ4_1: return DequantizeBlocks<BlockQ4_1>(x, y, n, kQK4_0);
    case DType::kQ5_0: return DequantizeBlocks<BlockQ5_0>(x, y, n, kQK4_0);
    case DType::kQ5_1: return DequantizeBlocks<BlockQ5_1>(x, y, n, kQK4_0);
    case DType::kQ8_1: return DequantizeBlocks<BlockQ8_1>(x, y, n, kQK8_0);
    case DType::kQ2_K: return DequantizeBlocks<BlockQ2_K>(x, y, n, kQK_K);
    case DType::kQ3_K: return DequantizeBlocks<BlockQ3_K>(x, y, n, kQK_K);
    case DType::kQ4_K: return DequantizeBlocks<BlockQ4_K>(x, y, n, kQK_K);
    case DType::kQ5_K: return DequantizeBlocks<BlockQ5_K>(x, y, n, kQK_K);
    case DType::kQ6_K: return DequantizeBlocks<BlockQ6_K>(x, y, n, kQK_K);
    case DType::kQ8_K: return DequantizeBlocks<BlockQ8_K>(x, y, n, kQK_K);
    case DType::kIQ4_NL: return DequantizeBlocks<BlockIQ4_NL>(x, y, n, kQK4_0);
    case DType::kIQ4_XS: return DequantizeBlocks<BlockIQ4_XS>(x, y, n, kQK_K);
    case DType::kMXFP4: return DequantizeBlocks<BlockMXFP4>(x, y, n, kQK4_0);
    case DType::kIQ2_XXS: return DequantizeBlocks<BlockIQ2_XXS>(x, y, n, kQK_K);
    case DType::kIQ3_XXS: return DequantizeBlocks<BlockIQ3_XXS>(x, y, n, kQK_K);
    case DType::kIQ3_S: return DequantizeBlocks<BlockIQ3_S>(x, y, n, kQK_K);
    case DType::kIQ2_XS: return DequantizeBlocks<BlockIQ2_XS>(x, y, n, kQK_K);
    case DType::kIQ2_S: return DequantizeBlocks<BlockIQ2_S>(x, y, n, kQK_K);
    case DType::kIQ1_S: return DequantizeBlocks<BlockIQ1_S>(x, y, n, kQK_K);
    case DType::kIQ1_M: return DequantizeBlocks<BlockIQ1_M>(x, y, n, kQK_K);
    default: MOE_ASSERT(false && "ref::DequantizeRow: unsupported type");
  }
}

// The additive part c of weight element i (w = (w - c) + c, computed as two terms that may
// cancel): -dmin * m for q2_K, q4_K and q5_K, the block minimum m for q4_1 and q5_1, the delta
// part dl delta for iq1_s and iq1_m, else 0.
// Error bounds of dequantization and products scale with |w - c| + |c|, not |w|.
inline double OffsetTerm(DType t, const void* row, int64_t i) {
  const uint8_t* p = static_cast<const uint8_t*>(row);
  switch (t) {
    case DType::kQ4_1:
    case DType::kQ5_1: {  // m is the second field of both
      BlockQ4_1 head;
      std::memcpy(&head, p + (i / kQK4_0) * Traits(t).block_bytes, sizeof(uint16_t) * 2);
      return HalfValue<double>(head.m);
    }
    case DType::kQ2_K: {
      BlockQ2_K b;
      std::memcpy(&b, p + (i / kQK_K) * sizeof(BlockQ2_K), sizeof(b));
      return -HalfValue<double>(b.dmin) * (b.scales[(i % kQK_K) / 16] >> 4);
    }
    case DType::kIQ1_S: {  // x = dl g + dl delta
      BlockIQ1_S b;
      std::memcpy(&b, p + (i / kQK_K) * sizeof(BlockIQ1_S), sizeof(b));
      const int j = static_cast<int>(i % kQK_K) / 32;
      return HalfValue<double>(b.d) * (2 * ((b.qh[j] >> 12) & 7) + 1) *
             (b.qh[j] & 0x8000 ? -double{kIQ1SDelta} : double{kIQ1SDelta});
    }
    case DType::kIQ1_M: {  // x = dl g + dl delta
      BlockIQ1_M b;
      std::memcpy(&b, p + (i / kQK_K) * sizeof(BlockIQ1_M), sizeof(b));
      const int g = static_cast<int>(i % kQK_K) / 8;
      return HalfValue<double>(IQ1MScaleBits(b.scales)) * (2 * IQ1MLs(b.scales, g / 2) + 1) *
             ((b.qh[g / 2] >> (4 * (g % 2))) & 8 ? -double{kIQ1SDelta} : double{kIQ1SDelta});
    }
    case DType::kQ4_K:
    case DType::kQ5_K: {  // d, dmin and scales sit at the same offsets in both
      BlockQ4_K head;
      std::memcpy(&head, p + (i / kQK_K) * Traits(t).block_bytes, offsetof(BlockQ4_K, qs));
      uint8_t sc, m;
      GetScaleMinK4(static_cast<int>(i % kQK_K) / 32, head.scales, &sc, &m);
      return -HalfValue<double>(head.dmin) * m;
    }
    default: return 0.0;
  }
}

}  // namespace moe::kernels::ref
