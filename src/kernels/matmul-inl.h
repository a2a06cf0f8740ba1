// Per-target weight x activation products (Highway). Included once per target by matmul.cc
// (through foreach_target.h) and by tests/kernels/matmul_test.cc, which calls the per-target
// MatMul directly so every compiled target is tested.
//
// Structure (mirrors ggml's CPU vec_dot kernels, so results match llama.cpp up to float
// summation order):
//   f32/f16/bf16: both operands widened to f32, FMA accumulation.
//   q8_0 x q8_0, q4_0 x q8_0: exact int32 dot per 32-block, times f16(d_w)*f16(d_x) in float,
//     accumulated in float. q4_0 quants are nibble - 8.
//   q4_K x q8_K: per super-block, sumi = sum_j sc[j] * dot(q4_j, q8_j) in int32;
//     result += d_w*d_x * sumi - dmin_w*d_x * sum_j m[j] * (bsums[2j] + bsums[2j+1]).
//   q5_K x q8_K: as q4_K with 5-bit quants (the 5th bit from qh).
//   q6_K x q8_K: per super-block, d_w*d_x * sum_is scale[is] * dot(q6 - 32, q8) in int32.
//   q3_K x q8_K: as q6_K with 3-bit quants q - 4 and 6-bit scales s - 32.
//   q2_K x q8_K: as q4_K with 16 sub-blocks of 16, 4-bit scales and mins, 2-bit quants.
//   iq4_nl x q8_0: as q4_0 with the nibbles mapped through the 16-value grid (a byte lookup);
//     mxfp4 x q8_0 the same with the e2m1 table and an E8M0 block scale.
//   iq4_xs x q8_K: 8 sub-blocks of 32 on that grid, signed 6-bit scales, no minimum.
//
// Two integer paths, both exact (every int32 lane is an exact partial dot):
// - int16 (all targets but AVX3_DL): every 8-bit quant is widened to int16; pairs are
//   multiplied and summed into int32 lanes (ReorderWidenMulAccumulate = vpmaddwd on x86). A
//   32-quant block is one int16 vector on AVX-512 and 2..32 vectors elsewhere, so each kernel
//   is written for "a chunk of N int16 lanes", N dividing 32.
// - VNNI (AVX3_DL, GCC): vpdpbusd on unsigned weight bytes x signed activation bytes, 64 quants
//   per instruction (see the MOE_VNNI section).
// The activation rows are converted once per call into a per-thread workspace and reused by
// every row; weights are unpacked in registers.
//
// Bounds (int32 never overflows): q8_0: 32*128*128; q4_K: per super-block
// 8 * 63 * 32 * 31 * 128 < 2^31 (q5_K; q4_K smaller); q6_K: 256 * 32 * 128 * 128 < 2^31; q6 * scale fits int16
// (32 * 128), q5 * scale fits int16 (31 * 63).

#if defined(MOE_KERNELS_MATMUL_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef MOE_KERNELS_MATMUL_INL_H_
#undef MOE_KERNELS_MATMUL_INL_H_
#else
#define MOE_KERNELS_MATMUL_INL_H_
#endif

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "hwy/aligned_allocator.h"
#include "hwy/cache_control.h"
#include "hwy/highway.h"
#include "util/compiler.h"  // MOE_ALWAYS_INLINE
#include "util/memory.h"
#include "kernels/iq_grid.h"
#include "kernels/kernels.h"
#include "tensor/dtype.h"
#include "tensor/tensor.h"
#include "kernels/widen-inl.h"  // WidenToF32

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

#include "kernels/vnni-inl.h"  // MOE_VNNI: the vpdpbusd kernels below

// int16 path: one int16 vector per 32-quant block where the vectors are 512-bit; elsewhere
// at most 16 lanes (always a divisor of 32, and of 16 for the half-block layouts of q4_0 and
// the q6_K scales).
#undef MOE_MATMUL_WIDE
#if HWY_TARGET == HWY_AVX3 || HWY_TARGET == HWY_AVX3_DL
#define MOE_MATMUL_WIDE 1
using MmD16 = hn::Full512<int16_t>;
#else
#define MOE_MATMUL_WIDE 0
using MmD16 = hn::CappedTag<int16_t, 16>;
#endif
using MmD32 = hn::Repartition<int32_t, MmD16>;
using MmDF = hn::Rebind<float, MmD32>;
using MmDU16 = hn::RebindToUnsigned<MmD16>;
using MmDU8 = hn::Rebind<uint8_t, MmD16>;
using MmDI8 = hn::Rebind<int8_t, MmD16>;
using MmV16 = hn::Vec<MmD16>;

// Tokens per group of the row kernels: each weight row is read (and unpacked) once per group.
// A row kernel may take more (MmMaxTokens: the codebook types take 8).
constexpr int64_t kMmTokGroup = 4;

// Weights are prefetched this far ahead of the row kernels (measured on the AVX-512 VM: the
// hardware prefetcher alone left decode at about half the memory bandwidth).
constexpr size_t kMmPrefetchBytes = 4096;

// Prefetches the cache lines of [p, p + kBytes) (prefetches never fault), into L1 or, kL2, into
// L2 only (TilePrefetch says when).
template <size_t kBytes, bool kL2 = false>
HWY_INLINE void MmPrefetch(const uint8_t* p) {
  for (size_t o = 0; o < kBytes; o += 64) __builtin_prefetch(p + o, 0, kL2 ? 2 : 3);
}

HWY_INLINE float LoadF16Scalar(const uint8_t* p) {
  const hn::CappedTag<float, 1> d1;
  const hn::Rebind<hwy::float16_t, decltype(d1)> dh1;
  return hn::GetLane(
      hn::PromoteTo(d1, hn::LoadU(dh1, reinterpret_cast<const hwy::float16_t*>(p))));
}

template <class D, class V>
HWY_INLINE float MmSum(D d, V v) {
  return hn::GetLane(hn::SumOfLanes(d, v));
}

HWY_INLINE size_t MmRoundUp64(size_t bytes) { return (bytes + 63) & ~size_t{63}; }

// Per-thread scratch, grown on demand and kept: calls on the decode path allocate nothing.
HWY_INLINE uint8_t* MmWorkspace(size_t bytes) {
  thread_local hwy::AlignedFreeUniquePtr<uint8_t[]> buf;
  thread_local size_t cap = 0;
  if (bytes > cap) {
    size_t want = cap * 2 > bytes ? cap * 2 : bytes;
    buf = hwy::AllocateAligned<uint8_t>(want);
    HWY_ASSERT(buf != nullptr);  // out of memory: nothing sensible left to do in a kernel
    PopulatePages(buf.get(), want);  // one call instead of a fault per page (a prompt's first chunk)
    cap = want;
  }
  return buf.get();
}

// One activation row after preparation. Int paths: q [n_in] int16 quants (in the lane order
// the weight kernel wants, see MmLayout), d [n_blocks + kMmChunk] block scales (padded so
// vector reads of a chunk stay inside), bsum2 [n_blocks][8] (q8_K only) sums of 32 consecutive
// quants. Float paths: f [n_in].
// VNNI path (AVX3_DL): q8 [n_in + 64] int8 quants (zero padded; block-32 types interleave
// each pair of blocks by dword, see PrepareQ8_0Int8), corr [n_in / 4 + 16] int32 per dword
// of q8: -c * (sum of its 4 quants), c = the weight format's unsigned offset (128 for q8_0,
// 8 for q4_0, 16 for q5_0). q8_K (both paths): bsums [n_blocks][16] raw group sums of 16.
// q8_1 (both paths): s [n_blocks + kMmChunk] the blocks' f16 s = d * sum(q), widened.
struct MmAct {
  const int16_t* q;
  const float* d;
  const float* s;
  const int32_t* bsum2;
  const float* f;
  const int8_t* q8;
  const int32_t* corr;
  const int16_t* bsums;
  const int32_t* bcorr;  // q8_0 tiles: -corr x (sum of block b's quants), per block
};

// Blocks per chunk of a row whose f16 scales are widened together (block-32 types).
constexpr int64_t kMmChunk = 64;

// Order of the int16 activation quants inside each 32-quant group. A dot product does not
// care about the order as long as weights and activations agree, so on AVX-512 the activations
// are permuted once per call to whatever order the weight bits unpack into without lane
// crossing shuffles (which all compete for one port):
//   kNatural: lane i = quant i.
//   kNibbleQuarters (q4_0, 512-bit): the 16 bytes of nibbles broadcast to the four 128-bit
//     quarters, read as 8 u16 lanes each and shifted by 0/4/8/12: quarter g lane m holds
//     quant 2m + (g >> 1) + 16 (g & 1).
//   kByteHalves (q4_K, 512-bit): 32 bytes broadcast to both 256-bit halves, u16 lane m of half
//     h is byte 2m + h: lane 16h + m holds quant 2m + h.
enum class MmLayout { kNatural, kNibbleQuarters, kByteHalves };

HWY_INLINE int MmSourceLane(MmLayout layout, int i) {
  switch (layout) {
    case MmLayout::kNibbleQuarters: {
      const int g = i / 8, m = i % 8;
      return 2 * m + (g >> 1) + 16 * (g & 1);
    }
    case MmLayout::kByteHalves: return 2 * (i % 16) + i / 16;
    default: return i;
  }
}

// ---------------------------------------------------------------- activation preparation

// Widens n int8 quants (n a multiple of 32) to int16 in the given layout; q is 64-byte aligned.
HWY_INLINE void WidenI8(const int8_t* HWY_RESTRICT src, int16_t* HWY_RESTRICT q, size_t n,
                        MmLayout layout) {
  if (layout == MmLayout::kNatural) {
    const MmD16 d16;
    const MmDI8 d8;
    const size_t N = hn::Lanes(d16);
    for (size_t e = 0; e < n; e += N) {
      hn::Store(hn::PromoteTo(d16, hn::LoadU(d8, src + e)), d16, q + e);
    }
    return;
  }
  int src_lane[32];
  for (int i = 0; i < 32; ++i) src_lane[i] = MmSourceLane(layout, i);
  for (size_t g = 0; g < n; g += 32) {
    for (int i = 0; i < 32; ++i) q[g + i] = src[g + src_lane[i]];
  }
}

// Block-32 activations (q8_0, or q8_1 with its s into s[]).
template <typename Block>
HWY_INLINE void PrepareQ8_0(const uint8_t* row, int64_t nb, int16_t* q, float* d, float* s,
                            MmLayout layout) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * sizeof(Block);
    d[b] = LoadF16Scalar(blk + offsetof(Block, d));
    if constexpr (std::is_same_v<Block, BlockQ8_1>) s[b] = LoadF16Scalar(blk + offsetof(Block, s));
    WidenI8(reinterpret_cast<const int8_t*>(blk + offsetof(Block, qs)), q + b * kQK8_0, kQK8_0,
            layout);
  }
  for (int64_t b = nb; b < nb + kMmChunk; ++b) {
    d[b] = 0.0f;
    if constexpr (std::is_same_v<Block, BlockQ8_1>) s[b] = 0.0f;
  }
}

HWY_INLINE void PrepareQ8_K(const uint8_t* row, int64_t nb, int16_t* q, float* d,
                            int32_t* bsum2, int16_t* bsums, MmLayout layout) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * sizeof(BlockQ8_K);
    std::memcpy(&d[b], blk + offsetof(BlockQ8_K, d), sizeof(float));
    WidenI8(reinterpret_cast<const int8_t*>(blk + offsetof(BlockQ8_K, qs)), q + b * kQK_K, kQK_K,
            layout);
    int16_t* bs = bsums + b * 16;
    std::memcpy(bs, blk + offsetof(BlockQ8_K, bsums), 16 * sizeof(int16_t));
    for (int j = 0; j < 8; ++j) bsum2[b * 8 + j] = int32_t{bs[2 * j]} + int32_t{bs[2 * j + 1]};
  }
  for (int64_t b = nb; b < nb + kMmChunk; ++b) d[b] = 0.0f;
}

#if MOE_VNNI
// VNNI block-32 path (q8_0 or q8_1 activations): int8 quants with each pair of blocks (a, b)
// interleaved by dword (a0 b0 a1 b1 ... a7 b7; a missing b is zeros) by one dword permute,
// zero padded by 64 bytes; if c != 0, the corrections -c * (sum of the 4 quants of each dword),
// one vpdpbusd of the pair against bytes of 1: per dword into corr, or (bcorr != nullptr, the
// row tiles) summed per block into bcorr, corr then unused. The scalar form of this loop cost
// as much per token as a 16-row tile's products.
template <typename Block>
HWY_INLINE void PrepareQ8_0Int8(const uint8_t* row, int64_t nb, int8_t* q8, float* d, float* s,
                                int32_t* corr, int32_t* bcorr, int32_t c) {
  constexpr bool kQ8_1 = std::is_same_v<Block, BlockQ8_1>;
  const __m512i idx = _mm512_set_epi32(15, 7, 14, 6, 13, 5, 12, 4, 11, 3, 10, 2, 9, 1, 8, 0);
  const __m512i ones = _mm512_set1_epi8(1), neg_c = _mm512_set1_epi32(-c);
  const auto quants = [&](int64_t b) {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * sizeof(Block) + offsetof(Block, qs)));
  };
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * sizeof(Block);
    d[b] = LoadF16Scalar(blk + offsetof(Block, d));
    if constexpr (kQ8_1) s[b] = LoadF16Scalar(blk + offsetof(Block, s));
  }
  for (int64_t b = 0; b < nb; b += 2) {
    const bool has_b = b + 1 < nb;
    const __m256i qb = has_b ? quants(b + 1) : _mm256_setzero_si256();
    const __m512i v = _mm512_permutexvar_epi32(idx, _mm512_inserti64x4(_mm512_castsi256_si512(quants(b)), qb, 1));
    _mm512_store_si512(q8 + b * kQK8_0, v);
    if (c == 0) continue;
    const __m512i cv = _mm512_mullo_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, v), neg_c);
    if (bcorr != nullptr) {
      bcorr[b] = _mm512_mask_reduce_add_epi32(0x5555, cv);
      if (has_b) bcorr[b + 1] = _mm512_mask_reduce_add_epi32(0xAAAA, cv);
    } else {
      _mm512_store_si512(corr + b * (kQK8_0 / 4), cv);
    }
  }
  const int64_t padded = (nb + 1) / 2 * 2 * kQK8_0;  // past the last (half) pair
  std::memset(q8 + padded, 0, 64);
  if (c != 0 && bcorr == nullptr) std::memset(corr + padded / 4, 0, 16 * sizeof(int32_t));
  for (int64_t b = nb; b < nb + kMmChunk; ++b) {
    d[b] = 0.0f;
    if constexpr (kQ8_1) s[b] = 0.0f;
  }
}
#endif

HWY_INLINE void PrepareQ8_KInt8(const uint8_t* row, int64_t nb, int8_t* q8, float* d,
                                int32_t* bsum2, int16_t* bsums) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = row + b * sizeof(BlockQ8_K);
    std::memcpy(&d[b], blk + offsetof(BlockQ8_K, d), sizeof(float));
    std::memcpy(q8 + b * kQK_K, blk + offsetof(BlockQ8_K, qs), kQK_K);
    int16_t* bs = bsums + b * 16;
    std::memcpy(bs, blk + offsetof(BlockQ8_K, bsums), 16 * sizeof(int16_t));
    for (int j = 0; j < 8; ++j) bsum2[b * 8 + j] = int32_t{bs[2 * j]} + int32_t{bs[2 * j + 1]};
  }
  std::memset(q8 + nb * kQK_K, 0, 64);
  for (int64_t b = nb; b < nb + kMmChunk; ++b) d[b] = 0.0f;
}

// ---------------------------------------------------------------- weight block kernels
// Each kernel describes one weight block: Chunk(e) returns the int16 weights for activation
// lanes [e, e + N) of the block (scales folded in where the format has sub-block scales), in
// the kernel's kLayout.

HWY_INLINE hn::Vec<MmDU16> LoadU8AsU16(const uint8_t* p) {
  return hn::PromoteTo(MmDU16(), hn::LoadU(MmDU8(), p));
}

#if MOE_MATMUL_WIDE
// 32 bytes at p in both 256-bit halves (a load-port broadcast, no shuffle).
HWY_INLINE hn::Vec<MmDU16> LoadDup256(const uint8_t* p) {
  return hn::Vec<MmDU16>{
      _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
// Per-lane shift counts: {a in the low half, b in the high half}, or per 128-bit quarter.
HWY_INLINE hn::Vec<MmDU16> HalfShifts(uint16_t a, uint16_t b) {
  const MmDU16 du16;
  const hn::Half<MmDU16> duh;
  return hn::Combine(du16, hn::Set(duh, b), hn::Set(duh, a));
}
HWY_INLINE hn::Vec<MmDU16> QuarterShifts() {
  alignas(64) static constexpr uint16_t kShifts[32] = {0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4,
                                                       4, 4, 4, 4, 4, 8, 8, 8, 8, 8, 8,
                                                       8, 8, 12, 12, 12, 12, 12, 12, 12, 12};
  return hn::Load(MmDU16(), kShifts);
}
#endif

// Block-32 types: one f16 scale at offset 0 (widened per chunk of blocks by the row loop).
struct KernQ8_0 {
  static constexpr bool kHasMin = false;
  static constexpr size_t kElems = kQK8_0;
  static constexpr size_t kBytes = sizeof(BlockQ8_0);
  static constexpr MmLayout kLayout = MmLayout::kNatural;
  static HWY_INLINE MmV16 Chunk(const uint8_t* blk, size_t e) {
    const int8_t* qs = reinterpret_cast<const int8_t*>(blk + offsetof(BlockQ8_0, qs));
    return hn::PromoteTo(MmD16(), hn::LoadU(MmDI8(), qs + e));
  }
};

// q4_0, q4_1, q5_0, q5_1: 32 quants as nibbles (element j low in qs[j], j + 16 high), q5 with
// the 5th bits in a little-endian uint32 qh; q4_0 / q5_0 are offset by 8 / 16, q4_1 / q5_1
// add a per-block minimum m (its product with the activation sum s is the row's MinSum).
template <typename Block>
struct KernNibble32 {
  using BlockType = Block;
  static constexpr bool kQ5 = std::is_same_v<Block, BlockQ5_0> || std::is_same_v<Block, BlockQ5_1>;
  static constexpr bool kHasMin =
      std::is_same_v<Block, BlockQ4_1> || std::is_same_v<Block, BlockQ5_1>;
  static constexpr int16_t kOffset =
      std::is_same_v<Block, BlockQ4_0> ? 8 : (std::is_same_v<Block, BlockQ5_0> ? 16 : 0);
  static constexpr size_t kElems = kQK4_0;
  static constexpr size_t kBytes = sizeof(Block);
#if MOE_MATMUL_WIDE
  static constexpr MmLayout kLayout = MmLayout::kNibbleQuarters;
#else
  static constexpr MmLayout kLayout = MmLayout::kNatural;
#endif
  static HWY_INLINE uint32_t HighBits(const uint8_t* blk) {
    uint32_t h;
    std::memcpy(&h, blk + offsetof(Block, qh), sizeof(h));
    return h;
  }
  static HWY_INLINE MmV16 Chunk(const uint8_t* blk, size_t e) {
    const MmD16 d16;
    const MmDU16 du16;
    const uint8_t* qs = blk + offsetof(Block, qs);
#if MOE_MATMUL_WIDE
    (void)e;  // the whole block is one vector
    const auto v = hn::LoadDup128(du16, reinterpret_cast<const uint16_t*>(qs));
    auto q = hn::And(hn::operator>>(v, QuarterShifts()), hn::Set(du16, 0xF));
    if constexpr (kQ5) {
      // Lane i holds element k = 2m + (g >> 1) + 16 (g & 1) (g = i / 8, m = i % 8): its bit
      // is bit k % 16 of the low (even g) or high (odd g) half of qh.
      alignas(64) static constexpr uint16_t kBit[32] = {
          1 << 0, 1 << 2,  1 << 4,  1 << 6,  1 << 8,  1 << 10, 1 << 12, 1 << 14,
          1 << 0, 1 << 2,  1 << 4,  1 << 6,  1 << 8,  1 << 10, 1 << 12, 1 << 14,
          1 << 1, 1 << 3,  1 << 5,  1 << 7,  1 << 9,  1 << 11, 1 << 13, 1 << 15,
          1 << 1, 1 << 3,  1 << 5,  1 << 7,  1 << 9,  1 << 11, 1 << 13, 1 << 15};
      alignas(64) static constexpr uint16_t kOddQuarter[32] = {
          0, 0, 0, 0, 0, 0, 0, 0, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF,
          0, 0, 0, 0, 0, 0, 0, 0, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF};
      const uint32_t h = HighBits(blk);
      const auto hv = hn::IfThenElse(hn::MaskFromVec(hn::Load(du16, kOddQuarter)),
                                     hn::Set(du16, static_cast<uint16_t>(h >> 16)),
                                     hn::Set(du16, static_cast<uint16_t>(h)));
      q = hn::IfThenElse(hn::TestBit(hv, hn::Load(du16, kBit)), hn::Or(q, hn::Set(du16, 16)), q);
    }
#else
    const auto v = LoadU8AsU16(qs + (e & 15));
    auto q = e < 16 ? hn::And(v, hn::Set(du16, 0xF)) : hn::ShiftRight<4>(v);
    if constexpr (kQ5) {
      alignas(32) static constexpr uint16_t kPow2[16] = {1,     2,     4,     8,    16,   32,
                                                         64,    128,   256,   512,  1024, 2048,
                                                         4096,  8192,  16384, 32768};
      // Elements e..e+N-1 lie in one half of qh (N divides 16).
      const auto hv = hn::Set(du16, static_cast<uint16_t>(HighBits(blk) >> (e & 16)));
      q = hn::IfThenElse(hn::TestBit(hv, hn::LoadU(du16, kPow2 + (e & 15))),
                         hn::Or(q, hn::Set(du16, 16)), q);
    }
#endif
    if constexpr (kOffset != 0) {
      return hn::Sub(hn::BitCast(d16, q), hn::Set(d16, kOffset));
    } else {
      return hn::BitCast(d16, q);
    }
  }
};
using KernQ4_0 = KernNibble32<BlockQ4_0>;
using KernQ4_1 = KernNibble32<BlockQ4_1>;
using KernQ5_0 = KernNibble32<BlockQ5_0>;
using KernQ5_1 = KernNibble32<BlockQ5_1>;

// The values of a 16-entry table (iq4_nl's grid, mxfp4's e2m1) at the 32 packed nibbles at qs
// (element j low in qs[j], j + 16 high) for lanes [e, e + N) of the block, in natural order: a
// byte table lookup, then widening.
HWY_INLINE MmV16 LutChunk(const int8_t* lut, const uint8_t* qs, size_t e) {
  const MmD16 d16;
#if HWY_TARGET == HWY_SCALAR
  const int nib = e < 16 ? qs[e] & 0xF : qs[e - 16] >> 4;
  return hn::Set(d16, static_cast<int16_t>(lut[nib]));
#else
  const MmDU8 du8;
#if MOE_MATMUL_WIDE
  // The table in both 128-bit halves (byte lookups do not cross them).
  const auto table = hn::LoadDup128(hn::Full256<int8_t>(), lut);
  (void)e;  // the whole block is one vector: 16 low nibbles, then 16 high ones
  const hn::Full128<uint8_t> d16b;
  const auto v = hn::LoadU(d16b, qs);
  const auto nib = hn::Combine(du8, hn::ShiftRight<4>(v), hn::And(v, hn::Set(d16b, 0xF)));
#else
  const auto table = hn::LoadU(hn::Full128<int8_t>(), lut);
  const auto v = hn::LoadU(du8, qs + (e & 15));
  const auto nib = e < 16 ? hn::And(v, hn::Set(du8, 0xF)) : hn::ShiftRight<4>(v);
#endif
  return hn::PromoteTo(d16, hn::BitCast(MmDI8(), hn::TableLookupBytes(table, nib)));
#endif
}

// iq4_nl and mxfp4: blocks of 32 nibbles indexing a 16-value table; one scale per block (iq4_nl:
// f16 d, mxfp4: an E8M0 exponent, see ChunkScalesE8M0).
template <typename Block>
struct KernLut32 {
  using BlockType = Block;
  static constexpr bool kHasMin = false;
  static constexpr size_t kElems = kQK4_0;
  static constexpr size_t kBytes = sizeof(Block);
  static constexpr MmLayout kLayout = MmLayout::kNatural;
  static constexpr const int8_t* Table() {
    return std::is_same_v<Block, BlockMXFP4> ? kMXFP4Values : kIQ4NLValues;
  }
  static HWY_INLINE MmV16 Chunk(const uint8_t* blk, size_t e) {
    return LutChunk(Table(), blk + offsetof(Block, qs), e);
  }
};
using KernIQ4_NL = KernLut32<BlockIQ4_NL>;
using KernMXFP4 = KernLut32<BlockMXFP4>;

// Whether a block-32 kernel's scale is an E8M0 byte (mxfp4) rather than an f16.
template <class K>
constexpr bool ScaleIsE8M0() {
  if constexpr (requires { typename K::BlockType; }) {
    return std::is_same_v<typename K::BlockType, BlockMXFP4>;
  } else {
    return false;
  }
}

// iq4_xs: 8 sub-blocks of 32 on the iq4_nl grid with signed 6-bit scales.
struct KernIQ4_XS {
  using BlockType = BlockIQ4_XS;
  static constexpr size_t kElems = kQK_K;
  static constexpr int kSubBlock = 32;
  static constexpr size_t kBytes = sizeof(BlockIQ4_XS);
  static constexpr bool kHasMin = false;
  static constexpr MmLayout kLayout = MmLayout::kNatural;
  struct State {
    float d, dmin;
    int16_t sc[8];
  };
  // Scale j: low nibble j % 2 of scales_l[j / 2], top bits 2j of scales_h, stored + 32.
  static HWY_INLINE void Prep(const uint8_t* blk, State& st) {
    st.d = LoadF16Scalar(blk + offsetof(BlockIQ4_XS, d));
    st.dmin = 0.0f;
    uint16_t h;
    std::memcpy(&h, blk + offsetof(BlockIQ4_XS, scales_h), sizeof(h));
    const uint8_t* l = blk + offsetof(BlockIQ4_XS, scales_l);
    for (int j = 0; j < 8; ++j) {
      st.sc[j] = static_cast<int16_t>((((l[j / 2] >> (4 * (j % 2))) & 0xF) | (((h >> (2 * j)) & 3) << 4)) - 32);
    }
  }
  static HWY_INLINE MmV16 Chunk(const uint8_t* blk, const State& st, size_t e) {
    const size_t j = e / 32;
    const MmV16 v = LutChunk(kIQ4NLValues, blk + offsetof(BlockIQ4_XS, qs) + 16 * j, e % 32);
    return hn::Mul(v, hn::Set(MmD16(), st.sc[j]));
  }
  static HWY_INLINE int32_t MinSum(const State&, const MmAct&, int64_t) { return 0; }
};

// Codebook weights (MacI16SignWrap) come with alt, what an activation of -128 is multiplied by instead of w: |w|
// for the plain codebook formats (w x with the sign wrapped = |w| * -128), iq1_m's own
// (IQ1MFormat).
struct MmWrapW {
  MmV16 w, alt;
};

// The int16 scales of the 16-quant sub-blocks that lanes [e, e + N) of a super-block fall in
// (32 lanes on 512-bit vectors span two sub-blocks).
HWY_INLINE MmV16 SubBlock16Scales(const int16_t* sc, size_t e) {
  const MmD16 d16;
#if MOE_MATMUL_WIDE
  const hn::Half<MmD16> dh;
  return hn::Combine(d16, hn::Set(dh, sc[e / 16 + 1]), hn::Set(dh, sc[e / 16]));
#else
  return hn::Set(d16, sc[e / 16]);
#endif
}

// The codebook i-quants (kernels/iq_grid.h): 8 sub-blocks of 32 (iq2_xxs, iq3_xxs, iq3_s) or
// 16 of 16 (iq2_xs, iq2_s) with odd integer scales; every group of 8 quants is a grid entry's
// magnitudes with signs.
template <class F>
struct KernIQGrid {
  using Format = F;
  using BlockType = typename F::Block;
  static constexpr size_t kElems = kQK_K;
  static constexpr int kSubBlock = kQK_K / F::kSubBlocks;
  static constexpr size_t kBytes = sizeof(BlockType);
  // iq1_s: x = dl (g + delta): the delta part is d/8 sum_j s_j sign_j bsum_j, a "min" term
  // subtracted with dmin = -d/8.
  static constexpr bool kHasMin = HasDelta<F>();
  static constexpr MmLayout kLayout = MmLayout::kNatural;
  struct State {
    float d, dmin;
    int16_t sc[16];
    int32_t k[8];  // iq1_s: s_j * sign(delta_j)
  };
  // The super-block's d times the format constant.
  static HWY_INLINE float D(const uint8_t* blk) {
    if constexpr (requires { F::DBits(blk); }) {  // iq1_m
      const uint16_t bits = F::DBits(blk);
      return LoadF16Scalar(reinterpret_cast<const uint8_t*>(&bits)) * F::kConst;
    } else {
      return LoadF16Scalar(blk) * F::kConst;  // d is the first field of the others
    }
  }
  static HWY_INLINE void Prep(const uint8_t* blk, State& st) {
    st.d = D(blk);
    st.dmin = 0.0f;
    for (int j = 0; j < F::kSubBlocks; ++j) st.sc[j] = static_cast<int16_t>(F::Scale(blk, j));
    if constexpr (kHasMin) {
      st.dmin = -kIQ1SDelta * st.d;
      for (int j = 0; j < 8; ++j) st.k[j] = st.sc[j] * F::DeltaSign(blk, j);
    }
  }
  static HWY_INLINE int32_t MinSum(const State& st, const MmAct& a, int64_t b) {
    if constexpr (kHasMin) {
      const int32_t* bsum2 = a.bsum2 + b * 8;
      int32_t s = 0;
      for (int j = 0; j < 8; ++j) s += st.k[j] * bsum2[j];
      return s;
    } else {
      return 0;
    }
  }
  // The signed quants of lanes [e, e + N) (N divides 32: one sub-block), decoded group by group,
  // times their sub-block scales, and the alt weights for activations of -128.
  static HWY_INLINE MmWrapW Chunk(const uint8_t* blk, const State& st, size_t e) {
    const MmD16 d16;
    const size_t N = hn::Lanes(d16);
    HWY_ALIGN int16_t v[32];
    HWY_ALIGN int16_t alt[32];
    for (size_t g = e / 8; g * 8 < e + N; ++g) {
      const IQGroup q = F::Group(blk, static_cast<int>(g));
      for (size_t k = 0; k < 8; ++k) {
        const size_t i = 8 * g + k;
        if (i < e || i >= e + N) continue;
        const int m = static_cast<int>((q.mag >> (8 * k)) & 0xFF);
        v[i - e] = static_cast<int16_t>((q.sign >> k) & 1 ? -m : m);
        if constexpr (HasWrapAlt<F>()) alt[i - e] = static_cast<int16_t>(IQ1MWrapMagnitude(m));
      }
    }
    const MmV16 scales =
        kSubBlock == 32 ? hn::Set(d16, st.sc[e / 32]) : SubBlock16Scales(st.sc, e);
    const MmV16 w = hn::Mul(hn::Load(d16, v), scales);
    if constexpr (HasWrapAlt<F>()) return {w, hn::Mul(hn::Load(d16, alt), scales)};
    return {w, hn::Abs(w)};
  }
};
using KernIQ2_XXS = KernIQGrid<IQ2XXSFormat>;
using KernIQ2_XS = KernIQGrid<IQ2XSFormat>;
using KernIQ2_S = KernIQGrid<IQ2SFormat>;
using KernIQ1_S = KernIQGrid<IQ1SFormat>;
using KernIQ1_M = KernIQGrid<IQ1MFormat>;
using KernIQ3_XXS = KernIQGrid<IQ3XXSFormat>;
using KernIQ3_S = KernIQGrid<IQ3SFormat>;

template <class K>
constexpr bool IsIQGrid() {
  if constexpr (requires { typename K::Format; }) {
    return true;
  } else {
    return false;
  }
}

// q4_K and q5_K: 8 sub-blocks of 32 with 6-bit scales and mins; q5_K adds a 5th bit per quant.
template <typename Block>
struct KernScaleMinK {
  using BlockType = Block;
  static constexpr bool kQ5 = std::is_same_v<Block, BlockQ5_K>;
  static constexpr size_t kElems = kQK_K;
  static constexpr int kSubBlock = 32;  // quants per sub-block scale
  static constexpr size_t kBytes = sizeof(Block);
  static constexpr bool kHasMin = true;
#if MOE_MATMUL_WIDE
  static constexpr MmLayout kLayout = MmLayout::kByteHalves;
#else
  static constexpr MmLayout kLayout = MmLayout::kNatural;
#endif
  struct State {
    float d, dmin;
    uint8_t sc[8];
    int32_t m[8];
  };
  // The 12 packed bytes hold 6-bit scales/mins: j < 4 in the low 6 bits of bytes j / j+4;
  // j >= 4 split as 4 low bits in byte j+4 and 2 high bits in the top of bytes j-4 / j.
  // Unpacked four at a time in 32-bit words.
  static HWY_INLINE void Prep(const uint8_t* blk, State& st) {
    st.d = LoadF16Scalar(blk + offsetof(Block, d));
    st.dmin = LoadF16Scalar(blk + offsetof(Block, dmin));
    uint32_t w[3];
    std::memcpy(w, blk + offsetof(Block, scales), sizeof(w));
    const uint32_t sc_lo = w[0] & 0x3F3F3F3Fu;
    const uint32_t m_lo = w[1] & 0x3F3F3F3Fu;
    const uint32_t sc_hi = (w[2] & 0x0F0F0F0Fu) | ((w[0] >> 2) & 0x30303030u);
    const uint32_t m_hi = ((w[2] >> 4) & 0x0F0F0F0Fu) | ((w[1] >> 2) & 0x30303030u);
    for (int k = 0; k < 4; ++k) {
      st.sc[k] = static_cast<uint8_t>(sc_lo >> (8 * k));
      st.sc[k + 4] = static_cast<uint8_t>(sc_hi >> (8 * k));
      st.m[k] = static_cast<uint8_t>(m_lo >> (8 * k));
      st.m[k + 4] = static_cast<uint8_t>(m_hi >> (8 * k));
    }
  }
  // Sub-block j = e / 32 lives in the low (j even) or high (j odd) nibbles of qs[32 (j/2)..];
  // q5_K: its 5th bits are bit j of qh[0..32).
  static HWY_INLINE MmV16 Chunk(const uint8_t* blk, const State& st, size_t e) {
    const MmD16 d16;
    const MmDU16 du16;
    const size_t j = e / 32;
    const uint8_t* qs = blk + offsetof(Block, qs) + 32 * (j / 2);
#if MOE_MATMUL_WIDE
    const auto v = LoadDup256(qs);
    const auto shifts = (j & 1) ? HalfShifts(4, 12) : HalfShifts(0, 8);
    auto q = hn::And(hn::operator>>(v, shifts), hn::Set(du16, 0xF));
    if constexpr (kQ5) {
      const auto h = LoadDup256(blk + offsetof(BlockQ5_K, qh));
      const auto hs = HalfShifts(static_cast<uint16_t>(j), static_cast<uint16_t>(8 + j));
      q = hn::Or(q, hn::ShiftLeft<4>(hn::And(hn::operator>>(h, hs), hn::Set(du16, 1))));
    }
#else
    const auto v = LoadU8AsU16(qs + (e & 31));
    auto q = (j & 1) ? hn::ShiftRight<4>(v) : hn::And(v, hn::Set(du16, 0xF));
    if constexpr (kQ5) {
      const auto h = LoadU8AsU16(blk + offsetof(BlockQ5_K, qh) + (e & 31));
      q = hn::Or(q, hn::ShiftLeft<4>(hn::And(hn::ShiftRightSame(h, static_cast<int>(j)),
                                             hn::Set(du16, 1))));
    }
#endif
    return hn::Mul(hn::BitCast(d16, q), hn::Set(d16, static_cast<int16_t>(st.sc[j])));
  }
  // sum_j m[j] * (bsums[2j] + bsums[2j+1]) for super-block b.
  static HWY_INLINE int32_t MinSum(const State& st, const MmAct& a, int64_t b) {
    const int32_t* bsum2 = a.bsum2 + b * 8;
    int32_t s = 0;
    for (int j = 0; j < 8; ++j) s += st.m[j] * bsum2[j];
    return s;
  }
};
using KernQ4_K = KernScaleMinK<BlockQ4_K>;
using KernQ5_K = KernScaleMinK<BlockQ5_K>;

struct KernQ6_K {
  using BlockType = BlockQ6_K;
  static constexpr size_t kElems = kQK_K;
  static constexpr int kSubBlock = 16;
  static constexpr size_t kBytes = sizeof(BlockQ6_K);
  static constexpr bool kHasMin = false;
  static constexpr MmLayout kLayout = MmLayout::kNatural;
  struct State {
    float d, dmin;
  };
  static HWY_INLINE void Prep(const uint8_t* blk, State& st) {
    st.d = LoadF16Scalar(blk + offsetof(BlockQ6_K, d));
    st.dmin = 0.0f;
  }
  // Quant e: half n = e/128, quarter q = (e%128)/32, l = e%32.
  //   low 4 bits: ql[64n + l + 32 (q&1)] >> 4 (q>>1);  high 2 bits: qh[32n + l] >> 2q;
  //   scale: scales[8n + 2q + l/16].
  static HWY_INLINE MmV16 Chunk(const uint8_t* blk, const State&, size_t e) {
    const MmD16 d16;
    const MmDU16 du16;
    const size_t n = e / 128, q = (e % 128) / 32, l = e % 32;
    const auto ql = LoadU8AsU16(blk + offsetof(BlockQ6_K, ql) + 64 * n + l + 32 * (q & 1));
    const auto qh = LoadU8AsU16(blk + offsetof(BlockQ6_K, qh) + 32 * n + l);
    const auto lo4 = hn::And(hn::ShiftRightSame(ql, static_cast<int>(4 * (q >> 1))),
                             hn::Set(du16, 0xF));
    const auto hi2 = hn::And(hn::ShiftRightSame(qh, static_cast<int>(2 * q)), hn::Set(du16, 3));
    const auto v = hn::Sub(hn::BitCast(d16, hn::Or(lo4, hn::ShiftLeft<4>(hi2))), hn::Set(d16, 32));
    const int8_t* sc = reinterpret_cast<const int8_t*>(blk + offsetof(BlockQ6_K, scales)) +
                       8 * n + 2 * q + l / 16;
#if MOE_MATMUL_WIDE
    // 32 lanes span two 16-quant scale groups.
    const hn::Half<MmD16> dh;
    const auto scale = hn::Combine(d16, hn::Set(dh, sc[1]), hn::Set(dh, sc[0]));
#else
    const auto scale = hn::Set(d16, sc[0]);
#endif
    return hn::Mul(v, scale);
  }
  static HWY_INLINE int32_t MinSum(const State&, const MmAct&, int64_t) { return 0; }
};

// The 2-bit levels of q2_K and q3_K for lanes [e, e + N): element e = 128h + 32k + l is
// bits 2k of qs[32h + l].
HWY_INLINE hn::Vec<MmDU16> Low2Bits(const uint8_t* qs, size_t e) {
  const auto v = LoadU8AsU16(qs + 32 * (e / 128) + e % 32);
  return hn::And(hn::ShiftRightSame(v, static_cast<int>(2 * ((e % 128) / 32))),
                 hn::Set(MmDU16(), 3));
}

// q2_K: 16 sub-blocks of 16 with 4-bit scales and mins, x = d sc q - dmin m, q in 0..3.
struct KernQ2_K {
  using BlockType = BlockQ2_K;
  static constexpr size_t kElems = kQK_K;
  static constexpr int kSubBlock = 16;
  static constexpr size_t kBytes = sizeof(BlockQ2_K);
  static constexpr bool kHasMin = true;
  static constexpr MmLayout kLayout = MmLayout::kNatural;
  struct State {
    float d, dmin;
    int16_t sc[16];
    int32_t m[16];
  };
  static HWY_INLINE void Prep(const uint8_t* blk, State& st) {
    st.d = LoadF16Scalar(blk + offsetof(BlockQ2_K, d));
    st.dmin = LoadF16Scalar(blk + offsetof(BlockQ2_K, dmin));
    const uint8_t* sc = blk + offsetof(BlockQ2_K, scales);
    for (int j = 0; j < 16; ++j) {
      st.sc[j] = static_cast<int16_t>(sc[j] & 0xF);
      st.m[j] = sc[j] >> 4;
    }
  }
  static HWY_INLINE MmV16 Chunk(const uint8_t* blk, const State& st, size_t e) {
    const auto q = Low2Bits(blk + offsetof(BlockQ2_K, qs), e);
    return hn::Mul(hn::BitCast(MmD16(), q), SubBlock16Scales(st.sc, e));
  }
  // sum_j m[j] * bsums[j] for super-block b.
  static HWY_INLINE int32_t MinSum(const State& st, const MmAct& a, int64_t b) {
    const int16_t* bs = a.bsums + b * 16;
    int32_t s = 0;
    for (int j = 0; j < 16; ++j) s += st.m[j] * bs[j];
    return s;
  }
};

// q3_K's 16 signed 6-bit scales from its 12 bytes: the low nibbles of scale j are nibble j / 8
// of byte j % 8, the top two bits are bits 2 (j / 4) of byte 8 + j % 4. Unpacked four scales
// at a time in 32-bit words (out[j] is the stored value, 0..63; the scale is out[j] - 32).
HWY_INLINE void UnpackQ3KScales(const uint8_t* p, uint8_t* out) {
  uint32_t w[3], r[4];
  std::memcpy(w, p, sizeof(w));
  r[0] = (w[0] & 0x0F0F0F0Fu) | ((w[2] & 0x03030303u) << 4);
  r[1] = (w[1] & 0x0F0F0F0Fu) | (((w[2] >> 2) & 0x03030303u) << 4);
  r[2] = ((w[0] >> 4) & 0x0F0F0F0Fu) | (((w[2] >> 4) & 0x03030303u) << 4);
  r[3] = ((w[1] >> 4) & 0x0F0F0F0Fu) | (((w[2] >> 6) & 0x03030303u) << 4);
  std::memcpy(out, r, sizeof(r));
}

// q3_K: 16 sub-blocks of 16, x = d (s_j - 32) (q - 4) with q's third bit in hmask.
struct KernQ3_K {
  using BlockType = BlockQ3_K;
  static constexpr size_t kElems = kQK_K;
  static constexpr int kSubBlock = 16;
  static constexpr size_t kBytes = sizeof(BlockQ3_K);
  static constexpr bool kHasMin = false;
  static constexpr MmLayout kLayout = MmLayout::kNatural;
  struct State {
    float d, dmin;
    int16_t sc[16];
  };
  static HWY_INLINE void Prep(const uint8_t* blk, State& st) {
    st.d = LoadF16Scalar(blk + offsetof(BlockQ3_K, d));
    st.dmin = 0.0f;
    uint8_t u[16];
    UnpackQ3KScales(blk + offsetof(BlockQ3_K, scales), u);
    for (int j = 0; j < 16; ++j) st.sc[j] = static_cast<int16_t>(u[j] - 32);
  }
  // Element e's third bit is bit e / 32 of hmask[e % 32].
  static HWY_INLINE MmV16 Chunk(const uint8_t* blk, const State& st, size_t e) {
    const MmD16 d16;
    const MmDU16 du16;
    const auto lo = Low2Bits(blk + offsetof(BlockQ3_K, qs), e);
    const auto hm = LoadU8AsU16(blk + offsetof(BlockQ3_K, hmask) + e % 32);
    const auto hi = hn::ShiftLeft<2>(
        hn::And(hn::ShiftRightSame(hm, static_cast<int>(e / 32)), hn::Set(du16, 1)));
    const auto q = hn::Sub(hn::BitCast(d16, hn::Or(lo, hi)), hn::Set(d16, 4));
    return hn::Mul(q, SubBlock16Scales(st.sc, e));
  }
  static HWY_INLINE int32_t MinSum(const State&, const MmAct&, int64_t) { return 0; }
};

// s0 += pairwise products of w and the int16 activations at x (64-byte aligned chunk).
HWY_INLINE void MacI16(MmV16 w, const int16_t* x, hn::Vec<MmD32>& s0, hn::Vec<MmD32>& s1) {
  s0 = hn::ReorderWidenMulAccumulate(MmD32(), w, hn::Load(MmD16(), x), s0, s1);
}

// acc += float(int32 block sum) * scale.
HWY_INLINE void FoldBlock(hn::Vec<MmD32> s0, hn::Vec<MmD32> s1, float scale,
                          hn::Vec<MmDF>& acc) {
  const MmDF df;
  acc = hn::MulAdd(hn::ConvertTo(df, hn::RearrangeToOddPlusEven(s0, s1)), hn::Set(df, scale),
                   acc);
}

// Adds one weight block (quants for activation lanes [q_off, q_off + K::kElems)) times NT
// activations to the accumulators: a_t += int32 dot * scale_t. `chunk(e)` yields the weights.
// MacI16 for the codebook i-quants, as ggml's x86 kernels compute them: they put the weight
// signs on the 8-bit activations, where negating -128 wraps to -128, so an activation of -128
// meets a negative weight as +128 would (w x = w * 128). llama.cpp's numbers include this.
HWY_INLINE void MacI16SignWrap(MmWrapW w, const int16_t* x, hn::Vec<MmD32>& s0,
                               hn::Vec<MmD32>& s1) {
  const MmD16 d16;
  const auto xv = hn::Load(d16, x);
  const MmV16 we = hn::IfThenElse(hn::Eq(xv, hn::Set(d16, -128)), w.alt, w.w);
  s0 = hn::ReorderWidenMulAccumulate(MmD32(), we, xv, s0, s1);
}

template <int NT, size_t kElems, bool kSignWrap = false, class ChunkFn>
HWY_INLINE void DotBlock(const ChunkFn& chunk, size_t q_off, const MmAct* act, float sc0,
                         float sc1, float sc2, float sc3, hn::Vec<MmDF>& a0, hn::Vec<MmDF>& a1,
                         hn::Vec<MmDF>& a2, hn::Vec<MmDF>& a3) {
  const MmD32 d32;
  const size_t N = hn::Lanes(MmD16());
  auto s00 = hn::Zero(d32), s01 = hn::Zero(d32), s10 = hn::Zero(d32), s11 = hn::Zero(d32);
  auto s20 = hn::Zero(d32), s21 = hn::Zero(d32), s30 = hn::Zero(d32), s31 = hn::Zero(d32);
  const auto mac = [](const auto& w, const int16_t* x, hn::Vec<MmD32>& t0, hn::Vec<MmD32>& t1) {
    if constexpr (kSignWrap) {
      MacI16SignWrap(w, x, t0, t1);
    } else {
      MacI16(w, x, t0, t1);
    }
  };
  HWY_UNROLL(16)
  for (size_t e = 0; e < kElems; e += N) {
    const auto w = chunk(e);  // MmV16, or MmWrapW for kSignWrap
    mac(w, act[0].q + q_off + e, s00, s01);
    if constexpr (NT > 1) mac(w, act[1].q + q_off + e, s10, s11);
    if constexpr (NT > 2) mac(w, act[2].q + q_off + e, s20, s21);
    if constexpr (NT > 3) mac(w, act[3].q + q_off + e, s30, s31);
  }
  FoldBlock(s00, s01, sc0, a0);
  if constexpr (NT > 1) FoldBlock(s10, s11, sc1, a1);
  if constexpr (NT > 2) FoldBlock(s20, s21, sc2, a2);
  if constexpr (NT > 3) FoldBlock(s30, s31, sc3, a3);
}

// Writes the NT row results: out[t * out_stride] = sum of a_t - m[t].
template <int NT>
HWY_INLINE void StoreRow(hn::Vec<MmDF> a0, hn::Vec<MmDF> a1, hn::Vec<MmDF> a2,
                         hn::Vec<MmDF> a3, const float* m, float* out, int64_t out_stride) {
  const MmDF df;
  if constexpr (NT == 1) {
    out[0] = MmSum(df, hn::Add(a0, a1)) - m[0];  // the single-token path splits over a0/a1
  } else {
    out[0] = MmSum(df, a0) - m[0];
    out[out_stride] = MmSum(df, a1) - m[1];
    if constexpr (NT > 2) out[2 * out_stride] = MmSum(df, a2) - m[2];
    if constexpr (NT > 3) out[3 * out_stride] = MmSum(df, a3) - m[3];
  }
}

// Room for a chunk of block scales plus one vector of padding.
constexpr int64_t kMmChunkPad = kMmChunk + 64;

// dd[t][j] = f16 scale of block c0 + j (at cblk + j * kBytes) times token t's activation
// scale, for j < cn; zero from cn up to the next multiple of the float vector length. kMin:
// the blocks' f16 minimum (at byte 2: q4_1, q5_1) times the activation's s instead.
// Scalar gather into a small array, then vector widening (no vector gather: on CPUs with the
// "gather data sampling" microcode mitigation those are very slow).
template <int NT, size_t kBytes, bool kMin = false>
HWY_INLINE void ChunkScales(const uint8_t* cblk, int64_t cn, int64_t c0, const MmAct* act,
                            float (*dd)[kMmChunkPad]) {
  const hn::ScalableTag<float> df;
  const hn::Rebind<hwy::float16_t, decltype(df)> dh;
  const int64_t NF = static_cast<int64_t>(hn::Lanes(df));
  constexpr size_t kOff = kMin ? 2 : 0;
  HWY_ALIGN uint16_t dw[kMmChunkPad];
  for (int64_t j = 0; j < cn; ++j) std::memcpy(&dw[j], cblk + j * kBytes + kOff, sizeof(uint16_t));
  for (int64_t j = cn; j < cn + NF && j < kMmChunkPad; ++j) dw[j] = 0;
  for (int64_t j = 0; j < cn; j += NF) {
    const auto wv =
        hn::PromoteTo(df, hn::Load(dh, reinterpret_cast<const hwy::float16_t*>(dw + j)));
    for (int t = 0; t < NT; ++t) {
      const float* a = kMin ? act[t].s : act[t].d;
      hn::Store(hn::Mul(wv, hn::LoadU(df, a + c0 + j)), df, dd[t] + j);
    }
  }
}

// ChunkScales for mxfp4: the weight scale is 2^(e - 128) from the block's first byte.
template <int NT, size_t kBytes>
HWY_INLINE void ChunkScalesE8M0(const uint8_t* cblk, int64_t cn, int64_t c0, const MmAct* act,
                                float (*dd)[kMmChunkPad]) {
  const int64_t NF = static_cast<int64_t>(hn::Lanes(hn::ScalableTag<float>()));
  for (int64_t j = 0; j < cn; ++j) {
    const float w = E8M0Half(cblk[j * kBytes]);
    for (int t = 0; t < NT; ++t) dd[t][j] = w * act[t].d[c0 + j];
  }
  for (int64_t j = cn; j < cn + NF && j < kMmChunkPad; ++j) {
    for (int t = 0; t < NT; ++t) dd[t][j] = 0.0f;
  }
}

// m[t] -= sum over the chunk's blocks of m_w * s_x (q4_1, q5_1): the minimum's part of the
// dot, which the row results subtract from their lane sums. Summed block by block with fused
// multiply-adds, as ggml's x86 kernels do (compiled with FMA): this term is often much larger
// than the dot itself (the two parts cancel), so its rounding is kept close to llama.cpp's.
// One token sums even and odd blocks in two chains (the latency of one chain of FMAs was half
// of q4_1's decode time).
template <int NT, size_t kBytes>
HWY_INLINE void ChunkMinTerms(const uint8_t* cblk, int64_t cn, int64_t c0, const MmAct* act,
                              float* m) {
  const auto mw = [&](int64_t j) { return LoadF16Scalar(cblk + j * kBytes + 2); };  // m follows d
  if constexpr (NT == 1) {
    float even = -m[0], odd = 0.0f;
    int64_t j = 0;
    for (; j + 2 <= cn; j += 2) {
      even = std::fma(mw(j), act[0].s[c0 + j], even);
      odd = std::fma(mw(j + 1), act[0].s[c0 + j + 1], odd);
    }
    if (j < cn) even = std::fma(mw(j), act[0].s[c0 + j], even);
    m[0] = -(even + odd);
  } else {
    float sum[4] = {-m[0], -m[1], NT > 2 ? -m[2] : 0.0f, NT > 3 ? -m[3] : 0.0f};
    for (int64_t j = 0; j < cn; ++j) {
      const float w = mw(j);
      for (int t = 0; t < NT; ++t) sum[t] = std::fma(w, act[t].s[c0 + j], sum[t]);
    }
    for (int t = 0; t < NT; ++t) m[t] = -sum[t];
  }
}

// Block-32 rows (q8_0, q4_0, q4_1, q5_0, q5_1): per chunk of blocks, the f16 weight scales are gathered and
// widened with vectors and multiplied by each token's activation scales, so the block loop
// only broadcasts a float from memory.
template <int NT, class K>
HWY_INLINE void Row32Dot(const uint8_t* HWY_RESTRICT wrow, int64_t nb, const MmAct* act,
                         float* out, int64_t out_stride) {
  HWY_ALIGN float dd[4][kMmChunkPad];  // [token][block in chunk]
  const MmDF dfa;
  auto a0 = hn::Zero(dfa), a1 = hn::Zero(dfa), a2 = hn::Zero(dfa), a3 = hn::Zero(dfa);
  float m[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t c0 = 0; c0 < nb; c0 += kMmChunk) {
    const int64_t cn = nb - c0 < kMmChunk ? nb - c0 : kMmChunk;
    const uint8_t* cblk = wrow + c0 * K::kBytes;
    if constexpr (ScaleIsE8M0<K>()) {
      ChunkScalesE8M0<NT, K::kBytes>(cblk, cn, c0, act, dd);
    } else {
      ChunkScales<NT, K::kBytes>(cblk, cn, c0, act, dd);
    }
    if constexpr (K::kHasMin) ChunkMinTerms<NT, K::kBytes>(cblk, cn, c0, act, m);
    const size_t q0 = static_cast<size_t>(c0) * K::kElems;
    if constexpr (NT == 1) {
      // One token: even blocks into a0, odd into a1, so two FMA chains overlap.
      int64_t j = 0;
      for (; j + 2 <= cn; j += 2) {
        const uint8_t* b0 = cblk + j * K::kBytes;
        MmPrefetch<2 * K::kBytes>(b0 + kMmPrefetchBytes);
        const uint8_t* b1 = b0 + K::kBytes;
        DotBlock<1, K::kElems>([b0](size_t e) { return K::Chunk(b0, e); },
                               q0 + j * K::kElems, act, dd[0][j], 0, 0, 0, a0, a2, a2, a2);
        DotBlock<1, K::kElems>([b1](size_t e) { return K::Chunk(b1, e); },
                               q0 + (j + 1) * K::kElems, act, dd[0][j + 1], 0, 0, 0, a1, a2, a2,
                               a2);
      }
      if (j < cn) {
        const uint8_t* b0 = cblk + j * K::kBytes;
        DotBlock<1, K::kElems>([b0](size_t e) { return K::Chunk(b0, e); },
                               q0 + j * K::kElems, act, dd[0][j], 0, 0, 0, a0, a2, a2, a2);
      }
    } else {
      for (int64_t j = 0; j < cn; ++j) {
        const uint8_t* b0 = cblk + j * K::kBytes;
        MmPrefetch<K::kBytes>(b0 + kMmPrefetchBytes);
        DotBlock<NT, K::kElems>([b0](size_t e) { return K::Chunk(b0, e); },
                                q0 + j * K::kElems, act, dd[0][j], dd[1][j],
                                NT > 2 ? dd[2][j] : 0.0f, NT > 3 ? dd[3][j] : 0.0f, a0, a1, a2,
                                a3);
      }
    }
  }
  StoreRow<NT>(a0, a1, a2, a3, m, out, out_stride);
}

// Super-block rows (q4_K, q5_K, q6_K): scales unpacked per super-block (amortized over 256 quants).
template <int NT, class K>
HWY_INLINE void RowKDot(const uint8_t* HWY_RESTRICT wrow, int64_t nb, const MmAct* act,
                        float* out, int64_t out_stride) {
  const MmDF df;
  auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
  float m[4] = {0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * K::kBytes;
    MmPrefetch<K::kBytes>(blk + kMmPrefetchBytes);
    typename K::State st;
    K::Prep(blk, st);
    const auto chunk = [blk, &st](size_t e) { return K::Chunk(blk, st, e); };
    const size_t q0 = static_cast<size_t>(b) * K::kElems;
    float sc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int t = 0; t < NT; ++t) sc[t] = st.d * act[t].d[b];
    if constexpr (NT == 1) {
      // Alternate accumulators by block parity (the branch is perfectly predictable).
      if (b & 1) {
        DotBlock<1, K::kElems, IsIQGrid<K>()>(chunk, q0, act, sc[0], 0, 0, 0, a1, a2, a2, a2);
      } else {
        DotBlock<1, K::kElems, IsIQGrid<K>()>(chunk, q0, act, sc[0], 0, 0, 0, a0, a2, a2, a2);
      }
    } else {
      DotBlock<NT, K::kElems, IsIQGrid<K>()>(chunk, q0, act, sc[0], sc[1], sc[2], sc[3], a0, a1,
                                             a2, a3);
    }
    if constexpr (K::kHasMin) {
      for (int t = 0; t < NT; ++t) {
        m[t] += st.dmin * act[t].d[b] * static_cast<float>(K::MinSum(st, act[t], b));
      }
    }
  }
  StoreRow<NT>(a0, a1, a2, a3, m, out, out_stride);
}


#if MOE_VNNI
// ---------------------------------------------------------------- AVX-512 VNNI (AVX3_DL)
// vpdpbusd multiplies unsigned by signed bytes and adds groups of 4 into int32 lanes, so the
// weights are made unsigned: q8_0 by adding 128 (xor 0x80), q4_0 by keeping the raw nibble; the
// offset (128 or 8) times the activation sum is preloaded as the accumulator (MmAct::corr), so
// every int32 lane is still the exact integer dot of its 4 quants. One zmm holds two 32-quant
// blocks (q8_0/q4_0) or one 64-quant chunk (q4_K/q6_K); sub-block scales are applied as float
// lane vectors to exact int32 values, whose per-superblock sums stay below 2^24, so the
// super-block sum is the same exact integer ggml forms before scaling by d.

// Block pairs use an interleaved lane order: int32 lane 2i holds quants 4i..4i+3 of block a,
// lane 2i+1 those of block b, so the pair's scales are one broadcast 64-bit {d_a, d_b}. The
// activations (MmAct::q8, corr) are stored in the same order by PrepareQ8_0Int8.

// Weights of blocks a and b (b == nullptr: zeros) as 64 unsigned bytes.
HWY_INLINE __m512i VnniPairQ8_0(const uint8_t* a, const uint8_t* b) {
  const __m512i wa = _mm512_zextsi256_si512(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + offsetof(BlockQ8_0, qs))));
  const __m512i wb =
      b ? _mm512_zextsi256_si512(
              _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + offsetof(BlockQ8_0, qs))))
        : _mm512_setzero_si512();
  const __m512i idx = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  return _mm512_xor_si512(_mm512_permutex2var_epi32(wa, idx, wb),
                          _mm512_set1_epi8(static_cast<char>(0x80)));
}

// The nibble blocks (q4_0, q4_1, q5_0, q5_1) from their qs bytes at qa, qb (qb == nullptr:
// zeros). Lanes 0..7: the 16 bytes of a and b interleaved by dword, low nibbles (quants
// 0..15); lanes 8..15: the same bytes, high nibbles (quants 16..31).
HWY_INLINE __m512i VnniPairNibbles(const uint8_t* qa, const uint8_t* qb) {
  const __m512i va = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qa)));
  const __m512i vb = qb ? _mm512_broadcast_i32x4(
                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(qb)))
                        : _mm512_setzero_si512();
  const __m512i idx = _mm512_set_epi32(19, 3, 18, 2, 17, 1, 16, 0, 19, 3, 18, 2, 17, 1, 16, 0);
  const __m512i v = _mm512_permutex2var_epi32(va, idx, vb);
  const __m512i shifts = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004,
                                          0x0004000400040004, 0x0004000400040004, 0, 0, 0, 0);
  return _mm512_and_si512(_mm512_srlv_epi16(v, shifts), _mm512_set1_epi8(0x0F));
}

// A 16-byte table in every 128-bit lane (for vpshufb).
HWY_INLINE __m512i VnniLutTable(const int8_t* lut) {
  return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lut)));
}

// The unsigned offset c of a block-32 format's VNNI weights (q = unsigned - c).
template <class K>
constexpr int32_t VnniOffset() {
  if constexpr (std::is_same_v<K, KernQ8_0> || std::is_same_v<K, KernIQ4_NL> ||
                std::is_same_v<K, KernMXFP4>) {
    return 128;
  } else {
    return K::kOffset;
  }
}

// Weights of the block pair (a, b) as 64 unsigned bytes in the interleaved order: int32 lane
// 2i holds elements 4i..4i+3 of a, lane 2i+1 those of b (b == nullptr: zeros).
template <class K>
HWY_INLINE __m512i VnniPair(const uint8_t* a, const uint8_t* b) {
  if constexpr (std::is_same_v<K, KernQ8_0>) {
    return VnniPairQ8_0(a, b);
  } else if constexpr (std::is_same_v<K, KernIQ4_NL> || std::is_same_v<K, KernMXFP4>) {
    // Table values by a byte shuffle of the nibbles, made unsigned by + 128 (xor).
    using Block = typename K::BlockType;
    const __m512i nib =
        VnniPairNibbles(a + offsetof(Block, qs), b ? b + offsetof(Block, qs) : nullptr);
    return _mm512_xor_si512(_mm512_shuffle_epi8(VnniLutTable(K::Table()), nib),
                            _mm512_set1_epi8(static_cast<char>(0x80)));
  } else {
    using Block = typename K::BlockType;
    const __m512i w =
        VnniPairNibbles(a + offsetof(Block, qs), b ? b + offsetof(Block, qs) : nullptr);
    if constexpr (!K::kQ5) {
      return w;
    } else {
      // Byte 8i + r holds element 4i + r of a, byte 8i + 4 + r that of b: deposit the 32 high
      // bits of each into alternating nibbles of a 64-bit byte mask.
      const uint64_t ha = K::HighBits(a), hb = b ? K::HighBits(b) : 0;
      const __mmask64 hi = _pdep_u64(ha, 0x0F0F0F0F0F0F0F0Full) |
                           _pdep_u64(hb, 0xF0F0F0F0F0F0F0F0ull);
      return _mm512_mask_add_epi8(w, hi, w, _mm512_set1_epi8(16));
    }
  }
}

// ChunkScales for AVX-512: the f16 scales are picked out of 64-byte loads of the blocks with
// word permutes (q4_0, q4_1: 4 block starts per 64 bytes, q8_0: 2), 16 blocks per vector; the
// last loads are masked so nothing past block cn - 1 is read. (q5_0 and q5_1, whose fourth
// block scale would lie past byte 64, use the portable ChunkScales.)
template <int NT, size_t kBytes>
HWY_INLINE void ChunkScalesVnni(const uint8_t* cblk, int64_t cn, int64_t c0, const MmAct* act,
                                float (*dd)[kMmChunkPad]) {
  static_assert(kBytes <= 20 || kBytes == sizeof(BlockQ8_0));
  constexpr int kPer = kBytes <= 20 ? 4 : 2;  // block starts per 64 bytes (scale included)
  constexpr int kGroups = 16 / kPer;
  // Lane g * kPer + k takes word k * kBytes / 2 of load g.
  alignas(64) static constexpr uint16_t kIdx[32] = {
      0, kBytes / 2, kPer > 2 ? kBytes : 0, kPer > 2 ? 3 * kBytes / 2 : 0};
  const __m512i base_idx = _mm512_load_si512(kIdx);
  for (int64_t j = 0; j < cn; j += 16) {
    __m512i h = _mm512_setzero_si512();
    for (int g = 0; g < kGroups; ++g) {
      const int64_t jb = j + g * kPer;
      if (jb >= cn) break;
      const uint8_t* p = cblk + jb * kBytes;
      const int64_t avail = (cn - jb) * static_cast<int64_t>(kBytes);
      const __m512i v =
          avail >= 64 ? _mm512_loadu_si512(p)
                      : _mm512_maskz_loadu_epi8((__mmask64{1} << avail) - 1, p);
      // Move the kPer indices to lanes g*kPer..: a lane rotation of base_idx by g*kPer words.
      const __m512i idx = _mm512_permutexvar_epi16(
          _mm512_sub_epi16(_mm512_set_epi16(31, 30, 29, 28, 27, 26, 25, 24, 23, 22, 21, 20, 19,
                                            18, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5,
                                            4, 3, 2, 1, 0),
                           _mm512_set1_epi16(static_cast<int16_t>(g * kPer))),
          base_idx);
      const __mmask32 lanes = ((__mmask32{1} << kPer) - 1) << (g * kPer);
      h = _mm512_mask_permutexvar_epi16(h, lanes, idx, v);
    }
    const __m512 wv = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
    for (int t = 0; t < NT; ++t) {
      _mm512_store_ps(dd[t] + j, _mm512_mul_ps(wv, _mm512_loadu_ps(act[t].d + c0 + j)));
    }
  }
}

// {d_a, d_b} repeated.
HWY_INLINE __m512 VnniPairScale(const float* dd_pair) {
  double ab;
  std::memcpy(&ab, dd_pair, sizeof(ab));
  return _mm512_castpd_ps(_mm512_set1_pd(ab));
}

// acc += float(corr + dpbusd(w, x)) * scale, for the pair of blocks at quant offset xo
// (kCorr false: the weights have no unsigned offset, so no correction).
template <bool kCorr>
HWY_INLINE void VnniPairToken(__m512i w, const MmAct& a, size_t xo, const float* dd_pair,
                              __m512& acc) {
  __m512i s = kCorr ? _mm512_load_si512(a.corr + xo / 4) : _mm512_setzero_si512();
  s = _mm512_dpbusd_epi32(s, w, _mm512_load_si512(a.q8 + xo));
  acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), VnniPairScale(dd_pair), acc);
}

// Both VNNI row kernels leave token t's lane accumulator in acc[t] and its scalar correction
// in m[t]; the result is sum(acc[t]) - m[t] (see VnniStore / VnniRowsOneToken).
template <int NT, class K>
HWY_INLINE void Row32Vnni(const uint8_t* HWY_RESTRICT wrow, int64_t nb, const MmAct* act,
                          __m512* acc, float* m) {
  constexpr size_t kB = K::kBytes;
  constexpr bool kCorr = VnniOffset<K>() != 0;
  HWY_ALIGN float dd[4][kMmChunkPad];
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  for (int t = 0; t < NT; ++t) m[t] = 0.0f;
  for (int64_t c0 = 0; c0 < nb; c0 += kMmChunk) {
    const int64_t cn = nb - c0 < kMmChunk ? nb - c0 : kMmChunk;
    const uint8_t* cblk = wrow + c0 * kB;
    if constexpr (ScaleIsE8M0<K>()) {
      ChunkScalesE8M0<NT, kB>(cblk, cn, c0, act, dd);
    } else if constexpr (kB <= 20 || kB == sizeof(BlockQ8_0)) {
      ChunkScalesVnni<NT, kB>(cblk, cn, c0, act, dd);
    } else {
      ChunkScales<NT, kB>(cblk, cn, c0, act, dd);
    }
    if constexpr (K::kHasMin) ChunkMinTerms<NT, kB>(cblk, cn, c0, act, m);
    const size_t x0 = static_cast<size_t>(c0) * kQK8_0;
    int64_t j = 0;
    if constexpr (NT == 1) {
      // Two pairs per step into two accumulators so the FMA chains overlap.
      for (; j + 4 <= cn; j += 4) {
        const uint8_t* b = cblk + j * kB;
        MmPrefetch<4 * kB>(b + kMmPrefetchBytes);
        VnniPairToken<kCorr>(VnniPair<K>(b, b + kB), act[0], x0 + j * 32, &dd[0][j], a0);
        VnniPairToken<kCorr>(VnniPair<K>(b + 2 * kB, b + 3 * kB), act[0], x0 + (j + 2) * 32,
                             &dd[0][j + 2], a1);
      }
    }
    for (; j + 2 <= cn; j += 2) {
      const uint8_t* b = cblk + j * kB;
      MmPrefetch<2 * kB>(b + kMmPrefetchBytes);
      const __m512i w = VnniPair<K>(b, b + kB);
      const size_t xo = x0 + j * 32;
      VnniPairToken<kCorr>(w, act[0], xo, &dd[0][j], a0);
      if constexpr (NT > 1) VnniPairToken<kCorr>(w, act[1], xo, &dd[1][j], a1);
      if constexpr (NT > 2) VnniPairToken<kCorr>(w, act[2], xo, &dd[2][j], a2);
      if constexpr (NT > 3) VnniPairToken<kCorr>(w, act[3], xo, &dd[3][j], a3);
    }
    if (j < cn) {  // odd last block: the missing partner has zero weights, quants and scale
      const __m512i w = VnniPair<K>(cblk + j * kB, nullptr);
      const size_t xo = x0 + j * 32;
      VnniPairToken<kCorr>(w, act[0], xo, &dd[0][j], a0);
      if constexpr (NT > 1) VnniPairToken<kCorr>(w, act[1], xo, &dd[1][j], a1);
      if constexpr (NT > 2) VnniPairToken<kCorr>(w, act[2], xo, &dd[2][j], a2);
      if constexpr (NT > 3) VnniPairToken<kCorr>(w, act[3], xo, &dd[3][j], a3);
    }
  }
  if constexpr (NT == 1) a0 = _mm512_add_ps(a0, a1);
  acc[0] = a0;
  if constexpr (NT > 1) acc[1] = a1;
  if constexpr (NT > 2) acc[2] = a2;
  if constexpr (NT > 3) acc[3] = a3;
}

// sb += float(dpbusd(w, x)) * scales (exact integers, see above).
HWY_INLINE void VnniChunkToken(__m512i w, const int8_t* x, __m512 scales, __m512& sb) {
  const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_load_si512(x));
  sb = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scales, sb);
}

// One 64-quant chunk c (0..3) of a q4_K super-block: bytes 0..31 the low nibbles of
// qs[32c..32c+31] (sub-block 2c), bytes 32..63 the high nibbles (sub-block 2c+1).
HWY_INLINE __m512i VnniChunkQ4_K(const uint8_t* blk, int c) {
  const __m256i q = _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(blk + offsetof(BlockQ4_K, qs) + 32 * c));
  const __m512i v = _mm512_broadcast_i64x4(q);
  const __m512i shifts = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004,
                                          0x0004000400040004, 0x0004000400040004, 0, 0, 0, 0);
  return _mm512_and_si512(_mm512_srlv_epi16(v, shifts), _mm512_set1_epi8(0x0F));
}

// The same chunk of a q5_K super-block: bit 2c (bytes 0..31) or 2c+1 (bytes 32..63) of
// qh[0..32) adds 16.
HWY_INLINE __m512i VnniChunkQ5_K(const uint8_t* blk, int c) {
  const __m512i lo = _mm512_and_si512(
      _mm512_srlv_epi16(_mm512_broadcast_i64x4(_mm256_loadu_si256(
                            reinterpret_cast<const __m256i*>(blk + offsetof(BlockQ5_K, qs) + 32 * c))),
                        _mm512_set_epi64(0x0004000400040004, 0x0004000400040004,
                                         0x0004000400040004, 0x0004000400040004, 0, 0, 0, 0)),
      _mm512_set1_epi8(0x0F));
  const __m512i qh = _mm512_broadcast_i64x4(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + offsetof(BlockQ5_K, qh))));
  const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8(static_cast<char>(1 << (2 * c))),
                                         _mm256_set1_epi8(static_cast<char>(1 << (2 * c + 1))), 1);
  return _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(qh, bit), lo, _mm512_set1_epi8(16));
}

// One 64-quant chunk k (0..3) of a q6_K super-block as unsigned 6-bit values (q + 32):
// half n = k/2; even k holds quarters 0,1 (ql low nibbles, qh bits 0-1 / 2-3), odd k quarters
// 2,3 (ql high nibbles, qh bits 4-5 / 6-7).
HWY_INLINE __m512i VnniChunkQ6_K(const uint8_t* blk, int k) {  // k constant after inlining
  const int n = k / 2;
  const __m512i ql = _mm512_loadu_si512(blk + offsetof(BlockQ6_K, ql) + 64 * n);
  const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(blk + offsetof(BlockQ6_K, qh) + 32 * n)));
  const __m512i m4 = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
  const __m512i hi_half = _mm512_set_epi64(0x0002000200020002, 0x0002000200020002,
                                           0x0002000200020002, 0x0002000200020002, 0, 0, 0, 0);
  if ((k & 1) == 0) {
    // (qh >> 0 & 3) << 4 = (qh << 4) & 0x30;  (qh >> 2 & 3) << 4 = (qh << 2) & 0x30
    const __m512i sh = _mm512_sub_epi16(_mm512_set1_epi16(4), hi_half);
    return _mm512_or_si512(_mm512_and_si512(ql, m4),
                           _mm512_and_si512(_mm512_sllv_epi16(qh, sh), m30));
  }
  // (qh >> 4 & 3) << 4 = qh & 0x30;  (qh >> 6 & 3) << 4 = (qh >> 2) & 0x30
  return _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(ql, 4), m4),
                         _mm512_and_si512(_mm512_srlv_epi16(qh, hi_half), m30));
}

// One 64-quant chunk c (0..3) of an iq4_xs super-block (sub-blocks 2c, 2c+1 in qs[32c..32c+31])
// as unsigned bytes (grid value + 128) in natural order: the 16 bytes of each sub-block
// give its low nibbles (quants 0..15) then its high nibbles (16..31).
HWY_INLINE __m512i VnniChunkIQ4_XS(const uint8_t* blk, int c) {
  const __m256i q = _mm256_loadu_si256(
      reinterpret_cast<const __m256i*>(blk + offsetof(BlockIQ4_XS, qs) + 32 * c));
  // 128-bit lanes: [bytes 0..15, bytes 0..15, bytes 16..31, bytes 16..31]
  const __m512i v = _mm512_permutexvar_epi64(_mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0),
                                             _mm512_castsi256_si512(q));
  const __m512i shifts = _mm512_set_epi64(0x0004000400040004, 0x0004000400040004, 0, 0,
                                          0x0004000400040004, 0x0004000400040004, 0, 0);
  const __m512i nib = _mm512_and_si512(_mm512_srlv_epi16(v, shifts), _mm512_set1_epi8(0x0F));
  return _mm512_xor_si512(_mm512_shuffle_epi8(VnniLutTable(kIQ4NLValues), nib),
                          _mm512_set1_epi8(static_cast<char>(0x80)));
}

// The sub-block scales of a codebook super-block (the odd s_j = 2 ls_j + 1) or of iq4_xs
// (ls_j - 32) as int8 in byte j (j < 8 or 16), unpacked in registers (see VnniScales8).
template <class K>
HWY_INLINE __m128i VnniScalesI8(const uint8_t* blk) {
  using Block = typename K::BlockType;
  // Nibbles j = 0..2n-1 of the n bytes at p, in bytes j.
  const auto nibbles = [](const uint8_t* p, int n) {
    uint64_t v = 0;
    std::memcpy(&v, p, static_cast<size_t>(n));
    const __m128i x = _mm_cvtsi64_si128(static_cast<int64_t>(v));
    const __m128i m = _mm_set1_epi8(0x0F);
    return _mm_unpacklo_epi8(_mm_and_si128(x, m), _mm_and_si128(_mm_srli_epi16(x, 4), m));
  };
  __m128i ls;
  if constexpr (std::is_same_v<K, KernIQ4_XS>) {
    uint16_t h;
    std::memcpy(&h, blk + offsetof(BlockIQ4_XS, scales_h), sizeof(h));
    const __m128i hi = _mm_cvtsi64_si128(static_cast<int64_t>(_pdep_u64(h, 0x0303030303030303ull) << 4));
    return _mm_sub_epi8(_mm_or_si128(nibbles(blk + offsetof(BlockIQ4_XS, scales_l), 4), hi),
                        _mm_set1_epi8(32));
  } else if constexpr (std::is_same_v<K, KernIQ2_XS> || std::is_same_v<K, KernIQ2_S>) {
    ls = nibbles(blk + offsetof(Block, scales), 8);
  } else if constexpr (std::is_same_v<K, KernIQ3_S>) {
    ls = nibbles(blk + offsetof(BlockIQ3_S, scales), 4);
  } else if constexpr (std::is_same_v<K, KernIQ1_M>) {  // 3-bit fields at 3 (j % 4) of word j / 4
    uint64_t v;
    std::memcpy(&v, blk + offsetof(BlockIQ1_M, scales), sizeof(v));
    const uint64_t f = _pext_u64(v, 0x0FFF0FFF0FFF0FFFull);
    constexpr uint64_t kField = 0x0707070707070707ull;
    ls = _mm_set_epi64x(static_cast<int64_t>(_pdep_u64(f >> 24, kField)),
                        static_cast<int64_t>(_pdep_u64(f, kField)));
  } else if constexpr (std::is_same_v<K, KernIQ1_S>) {  // bits 12..14 of the qh words
    const __m128i qh = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + offsetof(BlockIQ1_S, qh)));
    ls = _mm_cvtepi16_epi8(_mm_and_si128(_mm_srli_epi16(qh, 12), _mm_set1_epi16(7)));
  } else if constexpr (std::is_same_v<K, KernIQ3_XXS>) {  // the top nibbles of 8 words
    const __m256i w = _mm256_loadu_si256(
        reinterpret_cast<const __m256i*>(blk + offsetof(BlockIQ3_XXS, qs) + kQK_K / 4));
    ls = _mm256_cvtepi32_epi8(_mm256_srli_epi32(w, 28));
  } else {  // iq2_xxs: the top nibble of each 8-byte group of qs
    static_assert(std::is_same_v<K, KernIQ2_XXS>);
    const __m512i w = _mm512_loadu_si512(blk + offsetof(BlockIQ2_XXS, qs));
    ls = _mm512_cvtepi64_epi8(_mm512_srli_epi64(w, 60));
  }
  return _mm_add_epi8(_mm_add_epi8(ls, ls), _mm_set1_epi8(1));
}

// Super-block types with 8 sub-blocks of 32 (q4_K, q5_K, iq4_xs) on the VNNI path: the 8
// sub-block scales as floats, and the multipliers k_j of the 32-quant activation sums in the
// term the row subtracts (times kOff and dmin): q4_K / q5_K their mins; iq4_xs, whose
// unsigned weights are grid value + 128, its scales (kOff 128, dmin = d).
//
// The sub-block scales of these and of the codebook types (VnniScalesI8) are unpacked in
// registers: the State arrays of Prep, stored lane by lane and reloaded as a vector, stall on
// store forwarding (a third of iq1_m's time).
template <class K>
HWY_INLINE void VnniScales8(const uint8_t* blk, __m512& scf, __m256i& k32, float& d,
                            float& dmin, int32_t& koff) {
  using Block = typename K::BlockType;
  d = LoadF16Scalar(blk + offsetof(Block, d));
  if constexpr (IsIQGrid<K>() || std::is_same_v<K, KernIQ4_XS>) {
    if constexpr (IsIQGrid<K>()) d = K::D(blk);  // the grid types fold their constant into d
    const __m256i sc32 = _mm256_cvtepi8_epi32(VnniScalesI8<K>(blk));
    scf = _mm512_castps256_ps512(_mm256_cvtepi32_ps(sc32));
    if constexpr (!IsIQGrid<K>()) {  // iq4_xs: unsigned weights are value + 128
      k32 = sc32;
      dmin = d;
      koff = 128;
    } else if constexpr (K::kHasMin) {  // iq1_s's delta term (KernIQGrid::MinSum): s_j sign_j
      const __m256i qh = _mm256_cvtepi16_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + offsetof(BlockIQ1_S, qh))));
      const __m256i neg = _mm256_srai_epi32(qh, 15);  // -1 where bit 15 (delta -1/8)
      k32 = _mm256_sub_epi32(_mm256_xor_si256(sc32, neg), neg);
      dmin = -kIQ1SDelta * d;
      koff = 1;
    } else {  // magnitudes times signed activations: no term to subtract
      k32 = _mm256_setzero_si256();
      dmin = 0.0f;
      koff = 0;
    }
  } else {
    dmin = LoadF16Scalar(blk + offsetof(Block, dmin));
    // Same unpacking as KernScaleMinK::Prep, kept in registers.
    uint32_t w[3];
    std::memcpy(w, blk + offsetof(Block, scales), sizeof(w));
    const uint64_t sc = (w[0] & 0x3F3F3F3Fu) |
                        uint64_t{(w[2] & 0x0F0F0F0Fu) | ((w[0] >> 2) & 0x30303030u)} << 32;
    const uint64_t mn = (w[1] & 0x3F3F3F3Fu) |
                        uint64_t{((w[2] >> 4) & 0x0F0F0F0Fu) | ((w[1] >> 2) & 0x30303030u)}
                            << 32;
    scf = _mm512_castps256_ps512(_mm256_cvtepi32_ps(
        _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(sc)))));
    k32 = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(mn)));
    koff = 1;
  }
}

// iq1_s / iq1_m groups 8c..8c+7 in byte lanes: the grid bytes (-1, 0, 1) are looked up one
// group at a time (no vector gather: see ChunkScales), everything else is done on the
// whole vector with byte masks. iq1_s: magnitude = the low bit, sign = the top bit (its delta is
// the "min" term). iq1_m (IQ1MFormat::Group): 8 |g| + 1, or 7 where g and the group's delta
// have opposite signs; the sign of g, or of the delta where g = 0; alt = 9 where g != 0.
template <class F>
HWY_INLINE __m512i VnniChunkIQ1(const uint8_t* blk, int c, __mmask64* sign, __m512i* alt) {
  constexpr bool kM = std::is_same_v<F, IQ1MFormat>;
  const uint8_t* qs = blk + offsetof(typename F::Block, qs) + 8 * c;
  // iq1_s: the two 16-bit qh words of sub-blocks 2c, 2c+1 (3 index bits per group);
  // iq1_m: four qh bytes, a nibble per group (3 index bits and the delta's sign).
  const uint32_t qh = IQLoadU32(blk + offsetof(typename F::Block, qh) + 4 * c);
  const auto grid = [&](int l) MOE_ALWAYS_INLINE {
    const int shift = kM ? 4 * l : 16 * (l / 4) + 3 * (l % 4);
    return static_cast<int64_t>(kIQ1SGrid[qs[l] | (((qh >> shift) & 7) << 8)]);
  };
  const __m512i v = _mm512_set_epi64(grid(7), grid(6), grid(5), grid(4), grid(3), grid(2),
                                     grid(1), grid(0));
  const __mmask64 neg_g = _mm512_movepi8_mask(v);
  if constexpr (!kM) {
    *sign = neg_g;
    return _mm512_and_si512(v, _mm512_set1_epi8(1));
  } else {
    const __mmask64 nonzero = _mm512_test_epi8_mask(v, _mm512_set1_epi8(1));
    // Bit 4l + 3 of qh (group l's delta sign) spread over byte l.
    const __mmask64 neg_delta = _pdep_u64(_pext_u32(qh, 0x88888888u), 0x0101010101010101ull) * 0xFF;
    *sign = (nonzero & neg_g) | (~nonzero & neg_delta);
    const __m512i nine = _mm512_mask_mov_epi8(_mm512_set1_epi8(1), nonzero, _mm512_set1_epi8(9));
    *alt = nine;
    return _mm512_mask_mov_epi8(nine, (neg_g ^ neg_delta) & nonzero, _mm512_set1_epi8(7));
  }
}

// The sign bytes (IQ2SignByte: 7 bits and their parity on top) of the 7-bit sign indices in
// the eight 16-bit lanes of s7, as the 64 bits of a byte-lane mask.
HWY_INLINE uint64_t VnniSignBytes(__m128i s7) {
  const __m128i parity = _mm_setr_epi8(0, -128, -128, 0, -128, 0, 0, -128, -128, 0, 0, -128, 0,
                                       -128, -128, 0);  // parity of a nibble, in bit 7
  const __m128i p = _mm_xor_si128(_mm_shuffle_epi8(parity, _mm_and_si128(s7, _mm_set1_epi16(15))),
                                  _mm_shuffle_epi8(parity, _mm_srli_epi16(s7, 4)));
  return static_cast<uint64_t>(
      _mm_cvtsi128_si64(_mm_packus_epi16(_mm_or_si128(s7, p), _mm_setzero_si128())));
}

// The sign bits of groups 8c..8c+7 (bit 8 l + k: element k of group 8c + l negative).
template <class F>
HWY_INLINE uint64_t VnniIQSigns(const uint8_t* blk, int c) {
  uint64_t v;
  if constexpr (std::is_same_v<F, IQ3SFormat> || std::is_same_v<F, IQ2SFormat>) {  // stored
    const size_t off = std::is_same_v<F, IQ3SFormat> ? offsetof(BlockIQ3_S, signs)
                                                     : offsetof(BlockIQ2_S, qs) + 32;
    std::memcpy(&v, blk + off + 8 * c, sizeof(v));
    return v;
  } else if constexpr (std::is_same_v<F, IQ2XSFormat>) {  // bits 9..15 of each group's word
    const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + offsetof(BlockIQ2_XS, qs) + 16 * c));
    return VnniSignBytes(_mm_srli_epi16(q, 9));
  } else {  // iq2_xxs, iq3_xxs: four 7-bit indices in each of sub-blocks 2c and 2c+1's words
    const __m256i w = _mm256_set_m128i(_mm_set1_epi32(static_cast<int>(F::SignWord(blk, 2 * c + 1))),
                                       _mm_set1_epi32(static_cast<int>(F::SignWord(blk, 2 * c))));
    const __m256i s7 = _mm256_and_si256(
        _mm256_srlv_epi32(w, _mm256_setr_epi32(0, 7, 14, 21, 0, 7, 14, 21)), _mm256_set1_epi32(127));
    return VnniSignBytes(_mm256_cvtepi32_epi16(s7));
  }
}

// iq3_s chunk c's grid magnitudes, dword k = kIQ3SGrid[index k] for the 16 indices of groups
// 8c..8c+7 (qs[16c + k]), whose 9th bits are bits 0..15 of qh[2c..2c+1]: the indices are
// built on a vector (one masked add puts the 9th bits), then looked up one by one. Per group
// on scalars this index arithmetic cost more than the lookups.
HWY_INLINE __m512i VnniMagIQ3S(const uint8_t* blk, int c) {
  const __m128i qs = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + offsetof(BlockIQ3_S, qs) + 16 * c));
  uint16_t qh;
  std::memcpy(&qh, blk + offsetof(BlockIQ3_S, qh) + 2 * c, sizeof(qh));
  alignas(32) uint16_t idx[16];
  const __m256i lo = _mm256_cvtepu8_epi16(qs);  // + 256 where the 9th bit is set:
  _mm256_store_si256(reinterpret_cast<__m256i*>(idx),
                     _mm256_mask_add_epi16(lo, static_cast<__mmask16>(qh), lo, _mm256_set1_epi16(0x100)));
  const auto g = [&](int k) MOE_ALWAYS_INLINE { return static_cast<int>(kIQ3SGrid[idx[k]]); };
  return _mm512_set_epi32(g(15), g(14), g(13), g(12), g(11), g(10), g(9), g(8), g(7), g(6), g(5), g(4), g(3),
                          g(2), g(1), g(0));
}

// One 64-quant chunk c (0..3) of a codebook i-quant super-block (groups 8c..8c+7): the grid
// magnitudes as unsigned bytes (all < 128), looked up group by group (no vector gather: see
// ChunkScales), and, in *sign, the sign bits, which go to the activations, negated in 8 bits
// as ggml's x86 kernels do (-128 stays -128; MacI16SignWrap). iq1_m also gives *alt, the
// magnitudes an activation of -128 meets (IQ1MFormat).
template <class K>
HWY_INLINE __m512i VnniChunkIQGrid(const uint8_t* blk, int c, __mmask64* sign,
                                   __m512i* alt = nullptr) {
  using F = typename K::Format;
  if constexpr (std::is_same_v<F, IQ1SFormat> || std::is_same_v<F, IQ1MFormat>) {
    return VnniChunkIQ1<F>(blk, c, sign, alt);
  } else {
    *sign = static_cast<__mmask64>(VnniIQSigns<F>(blk, c));
    if constexpr (std::is_same_v<F, IQ3SFormat>) {
      return VnniMagIQ3S(blk, c);
    } else {
      const auto mag = [&](int l) MOE_ALWAYS_INLINE { return static_cast<int64_t>(F::Mag(blk, 8 * c + l)); };
      return _mm512_set_epi64(mag(7), mag(6), mag(5), mag(4), mag(3), mag(2), mag(1), mag(0));
    }
  }
}

// VnniChunkToken with the weight signs applied to the activations; kAlt (iq1_m): activations
// of -128 meet the magnitudes alt instead of mag.
template <bool kAlt = false>
HWY_INLINE void VnniChunkTokenSigned(__m512i mag, __mmask64 sign, const int8_t* x, __m512 scales,
                                     __m512& sb, __m512i alt = __m512i()) {
  const __m512i xv = _mm512_load_si512(x);
  if constexpr (kAlt) {
    mag = _mm512_mask_blend_epi8(_mm512_cmpeq_epi8_mask(xv, _mm512_set1_epi8(-128)), mag, alt);
  }
  const __m512i xs = _mm512_mask_sub_epi8(xv, sign, _mm512_setzero_si512(), xv);
  const __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), mag, xs);
  sb = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scales, sb);
}

// One 64-quant chunk c (0..3) of a q2_K / q3_K super-block's 2-bit levels: bytes 0..31 are
// bits 2k of qs[32h..32h+31] (h = c/2, k = 2(c&1)), bytes 32..63 bits 2k+2.
HWY_INLINE __m512i VnniLow2(const uint8_t* qs, int c) {
  const __m512i v = _mm512_broadcast_i64x4(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * (c / 2))));
  const short k = static_cast<short>(4 * (c & 1));
  const __m512i shifts = _mm512_inserti64x4(_mm512_set1_epi16(k), _mm256_set1_epi16(k + 2), 1);
  return _mm512_and_si512(_mm512_srlv_epi16(v, shifts), _mm512_set1_epi8(3));
}

// The same chunk of a q3_K super-block as unsigned 3-bit values (q + 4): bit 2c (bytes 0..31)
// or 2c+1 (bytes 32..63) of hmask[0..32) adds 4.
HWY_INLINE __m512i VnniChunkQ3_K(const uint8_t* blk, int c) {
  const __m512i lo = VnniLow2(blk + offsetof(BlockQ3_K, qs), c);
  const __m512i hm = _mm512_broadcast_i64x4(
      _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + offsetof(BlockQ3_K, hmask))));
  const __m512i bit = _mm512_inserti64x4(_mm512_set1_epi8(static_cast<char>(1 << (2 * c))),
                                         _mm256_set1_epi8(static_cast<char>(1 << (2 * c + 1))), 1);
  return _mm512_mask_add_epi8(lo, _mm512_test_epi8_mask(hm, bit), lo, _mm512_set1_epi8(4));
}

// Super-block types with 16 sub-blocks of 16 (q2_K, q3_K, q6_K) on the VNNI path: their 16
// int8 scales, and the unsigned weights' correction sum_j k_j * bsums_j times kOff that the
// row subtracts (times dmin): q6_K and q3_K store q + 32 / q + 4 (k = the scales, dmin = d),
// q2_K's levels are already unsigned and k are its mins.
template <class K>
HWY_INLINE void VnniScales16(const uint8_t* blk, __m128i& sc8, __m128i& k8, float& d,
                             float& dmin, int32_t& koff) {
  using Block = typename K::BlockType;
  if constexpr (IsIQGrid<K>()) {  // magnitudes times signed activations: no offset
    sc8 = VnniScalesI8<K>(blk);
    k8 = _mm_setzero_si128();
    d = K::D(blk);
    dmin = d;
    koff = 0;
    return;
  } else {
    d = LoadF16Scalar(blk + offsetof(Block, d));
  }
  if constexpr (std::is_same_v<K, KernQ6_K>) {
    sc8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + offsetof(BlockQ6_K, scales)));
    k8 = sc8;
    dmin = d;
    koff = 32;
  } else if constexpr (std::is_same_v<K, KernQ3_K>) {
    // UnpackQ3KScales in registers (see VnniScales8).
    uint32_t w[3];
    std::memcpy(w, blk + offsetof(BlockQ3_K, scales), sizeof(w));
    const __m128i lo = _mm_and_si128(
        _mm_srlv_epi32(_mm_setr_epi32(static_cast<int>(w[0]), static_cast<int>(w[1]),
                                      static_cast<int>(w[0]), static_cast<int>(w[1])),
                       _mm_setr_epi32(0, 0, 4, 4)),
        _mm_set1_epi8(0x0F));
    const __m128i hi = _mm_and_si128(
        _mm_srlv_epi32(_mm_set1_epi32(static_cast<int>(w[2])), _mm_setr_epi32(0, 2, 4, 6)),
        _mm_set1_epi8(0x03));
    sc8 = _mm_sub_epi8(_mm_or_si128(lo, _mm_slli_epi32(hi, 4)), _mm_set1_epi8(32));
    k8 = sc8;
    dmin = d;
    koff = 4;
  } else {
    const __m128i raw =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + offsetof(BlockQ2_K, scales)));
    sc8 = _mm_and_si128(raw, _mm_set1_epi8(0x0F));
    k8 = _mm_and_si128(_mm_srli_epi16(raw, 4), _mm_set1_epi8(0x0F));
    dmin = LoadF16Scalar(blk + offsetof(BlockQ2_K, dmin));
    koff = 1;
  }
}

template <int NT, class K>
HWY_INLINE void RowKVnni(const uint8_t* HWY_RESTRICT wrow, int64_t nb, const MmAct* act,
                         __m512* acc, float* m) {
  constexpr bool kQ4K = K::kSubBlock == 32;  // q4_K, q5_K, iq4_xs; else q2_K, q3_K, q6_K
  __m512 a[NT];
  HWY_UNROLL(8)
  for (int t = 0; t < NT; ++t) a[t] = _mm512_setzero_ps(), m[t] = 0.0f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = wrow + b * K::kBytes;
    MmPrefetch<K::kBytes>(blk + kMmPrefetchBytes);
    float d, dmin;
    __m512 scf;  // float sub-block scales in lanes 0..7 (sub-blocks of 32) or 0..15 (of 16)
    int32_t msum[NT] = {};
    if constexpr (kQ4K) {
      __m256i k32;
      int32_t koff;
      VnniScales8<K>(blk, scf, k32, d, dmin, koff);
      for (int t = 0; t < NT && (!IsIQGrid<K>() || K::kHasMin); ++t) {
        const __m256i bs =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act[t].bsum2 + b * 8));
        msum[t] = koff * _mm512_reduce_add_epi32(
                             _mm512_zextsi256_si512(_mm256_mullo_epi32(k32, bs)));
      }
    } else {
      __m128i sc8, k8;
      int32_t koff;
      VnniScales16<K>(blk, sc8, k8, d, dmin, koff);
      scf = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc8));
      const __m256i k16 = _mm256_cvtepi8_epi16(k8);
      for (int t = 0; t < NT && !IsIQGrid<K>(); ++t) {  // (the grid types have no term)
        const __m256i bs =
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(act[t].bsums + b * 16));
        msum[t] = koff * _mm512_reduce_add_epi32(
                             _mm512_zextsi256_si512(_mm256_madd_epi16(k16, bs)));
      }
    }
    __m512 sb[NT], s4 = _mm512_setzero_ps();  // per token; s4: one token's second chain
    HWY_UNROLL(8)
    for (int t = 0; t < NT; ++t) sb[t] = _mm512_setzero_ps();
    const size_t xb = static_cast<size_t>(b) * kQK_K;
    // Chunk c of the super-block (unrolled by the four explicit calls below).
    const auto chunk = [&](auto c_const) MOE_ALWAYS_INLINE {
      constexpr int c = decltype(c_const)::value;
      __m512 scales;
      __m512i w;
      __mmask64 sign = 0;  // codebook types: weight signs, applied to the activations
      __m512i alt = _mm512_setzero_si512();  // iq1_m: magnitudes for activations of -128
      if constexpr (kQ4K) {
        // lanes 0..7: scale of sub-block 2c, lanes 8..15: 2c+1
        scales = _mm512_permutexvar_ps(
            _mm512_set_epi32(2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1,
                             2 * c + 1, 2 * c + 1, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c,
                             2 * c, 2 * c),
            scf);
        if constexpr (IsIQGrid<K>()) {
          w = VnniChunkIQGrid<K>(blk, c, &sign);
        } else if constexpr (std::is_same_v<K, KernIQ4_XS>) {
          w = VnniChunkIQ4_XS(blk, c);
        } else if constexpr (K::kQ5) {
          w = VnniChunkQ5_K(blk, c);
        } else {
          w = VnniChunkQ4_K(blk, c);
        }
      } else {
        // four lanes (16 quants) per scale: scales 4c .. 4c+3
        scales = _mm512_permutexvar_ps(
            _mm512_set_epi32(4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 3, 4 * c + 2, 4 * c + 2,
                             4 * c + 2, 4 * c + 2, 4 * c + 1, 4 * c + 1, 4 * c + 1, 4 * c + 1,
                             4 * c, 4 * c, 4 * c, 4 * c),
            scf);
        if constexpr (IsIQGrid<K>()) {
          w = VnniChunkIQGrid<K>(blk, c, &sign, &alt);
        } else if constexpr (std::is_same_v<K, KernQ6_K>) {
          w = VnniChunkQ6_K(blk, c);
        } else if constexpr (std::is_same_v<K, KernQ3_K>) {
          w = VnniChunkQ3_K(blk, c);
        } else {
          w = VnniLow2(blk + offsetof(BlockQ2_K, qs), c);
        }
      }
      const size_t xo = xb + 64 * c;
      const auto tok = [&](const MmAct& a, __m512& acc) MOE_ALWAYS_INLINE {
        if constexpr (IsIQGrid<K>()) {
          VnniChunkTokenSigned<HasWrapAlt<typename K::Format>()>(w, sign, a.q8 + xo, scales, acc,
                                                                 alt);
        } else {
          VnniChunkToken(w, a.q8 + xo, scales, acc);
        }
      };
      if constexpr (NT == 1) {
        // Two chains for one token: even chunks into sb[0], odd into s4.
        if constexpr ((c & 1) == 0) {
          tok(act[0], sb[0]);
        } else {
          tok(act[0], s4);
        }
      } else {
        HWY_UNROLL(8)
        for (int t = 0; t < NT; ++t) tok(act[t], sb[t]);
      }
    };
    chunk(std::integral_constant<int, 0>());
    chunk(std::integral_constant<int, 1>());
    chunk(std::integral_constant<int, 2>());
    chunk(std::integral_constant<int, 3>());
    if constexpr (NT == 1) sb[0] = _mm512_add_ps(sb[0], s4);
    HWY_UNROLL(8)
    for (int t = 0; t < NT; ++t) a[t] = _mm512_fmadd_ps(sb[t], _mm512_set1_ps(d * act[t].d[b]), a[t]);
    for (int t = 0; t < NT; ++t) m[t] += dmin * act[t].d[b] * static_cast<float>(msum[t]);
  }
  HWY_UNROLL(8)
  for (int t = 0; t < NT; ++t) acc[t] = a[t];
}

// Lane i of the result = sum of the lanes of v[i], for 16 vectors: a transposing add tree
// (about 3 instructions per row instead of a full horizontal sum each).
HWY_INLINE __m512 VnniSum16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i) {  // 256-bit halves: [a.q0+a.q2, a.q1+a.q3, b.q0+b.q2, b.q1+b.q3]
    t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(v[2 * i], v[2 * i + 1], 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // quarter k of u[i]: 4 partial sums of row 4i + k
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
  }
  // Within each quarter k: [row k, row 4+k, row 8+k, row 12+k].
  const __m512 x = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
  const __m512 y = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
  const __m512 z = _mm512_add_ps(_mm512_shuffle_ps(x, y, _MM_SHUFFLE(1, 0, 1, 0)),
                                 _mm512_shuffle_ps(x, y, _MM_SHUFFLE(3, 2, 3, 2)));
  // Lane 4k + m holds row 4m + k: transpose back to row order.
  const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(idx, z);
}

// One token (decode): rows in groups of 16, reduced together.
template <template <int, class> class Row, class K>
HWY_INLINE void VnniRowsOneToken(const uint8_t* w, int64_t n_rows, size_t row_bytes, int64_t nb,
                                 const MmAct* a, float* out) {
  for (int64_t r0 = 0; r0 < n_rows; r0 += 16) {
    const int64_t cnt = n_rows - r0 < 16 ? n_rows - r0 : 16;
    __m512 acc[16];
    alignas(64) float m[16];
    for (int64_t i = 0; i < cnt; ++i) {
      Row<1, K>::Acc(w + static_cast<size_t>(r0 + i) * row_bytes, nb, a, &acc[i], &m[i]);
    }
    for (int64_t i = cnt; i < 16; ++i) {
      acc[i] = _mm512_setzero_ps();
      m[i] = 0.0f;
    }
    const __m512 sums = _mm512_sub_ps(VnniSum16(acc), _mm512_load_ps(m));
    _mm512_mask_storeu_ps(out + r0, static_cast<__mmask16>((1u << cnt) - 1), sums);
  }
}
#endif  // MOE_VNNI

// ---------------------------------------------------------------- float weights

// Loads N weights of type T at element i as float (tag d decides N: full or one lane).
template <typename T, class DF>
HWY_INLINE hn::Vec<DF> LoadWeightF32(DF df, const uint8_t* wrow, int64_t i) {
  const T* p = reinterpret_cast<const T*>(wrow) + i;
  if constexpr (std::is_same_v<T, float>) {
    return hn::LoadU(df, p);
  } else {
    return hn::PromoteTo(df, hn::LoadU(hn::Rebind<T, DF>(), p));
  }
}

// Weight i of a row of T as float, any alignment.
template <typename T>
HWY_INLINE float ScalarWeightF32(const uint8_t* wrow, int64_t i) {
  if constexpr (std::is_same_v<T, float>) {
    float v;
    std::memcpy(&v, wrow + 4 * i, sizeof(v));
    return v;
  } else if constexpr (std::is_same_v<T, hwy::float16_t>) {
    return LoadF16Scalar(wrow + 2 * i);
  } else {
    uint16_t h;
    std::memcpy(&h, wrow + 2 * i, sizeof(h));
    const uint32_t u = uint32_t{h} << 16;
    float v;
    std::memcpy(&v, &u, sizeof(v));
    return v;
  }
}

template <int NT, typename T>
HWY_INLINE void FloatRowDot(const uint8_t* HWY_RESTRICT wrow, int64_t n, const MmAct* act,
                            float* out, int64_t out_stride) {
  const hn::ScalableTag<float> df;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  auto a0 = hn::Zero(df), a1 = hn::Zero(df), a2 = hn::Zero(df), a3 = hn::Zero(df);
  int64_t i = 0;
  if constexpr (NT == 1) {
    // Four chains for the single-token (decode) case.
    const float* x = act[0].f;
    for (; i + 4 * N <= n; i += 4 * N) {
      // 4 N weights per step: prefetch the lines that far ahead (N is a power of two >= 1).
      for (int64_t o = 0; o < 4 * N * static_cast<int64_t>(sizeof(T)); o += 64) {
        hwy::Prefetch(wrow + (i * static_cast<int64_t>(sizeof(T)) + o) + kMmPrefetchBytes);
      }
      a0 = hn::MulAdd(LoadWeightF32<T>(df, wrow, i), hn::LoadU(df, x + i), a0);
      a1 = hn::MulAdd(LoadWeightF32<T>(df, wrow, i + N), hn::LoadU(df, x + i + N), a1);
      a2 = hn::MulAdd(LoadWeightF32<T>(df, wrow, i + 2 * N), hn::LoadU(df, x + i + 2 * N), a2);
      a3 = hn::MulAdd(LoadWeightF32<T>(df, wrow, i + 3 * N), hn::LoadU(df, x + i + 3 * N), a3);
    }
    for (; i + N <= n; i += N) {
      a0 = hn::MulAdd(LoadWeightF32<T>(df, wrow, i), hn::LoadU(df, x + i), a0);
    }
    a0 = hn::Add(hn::Add(a0, a1), hn::Add(a2, a3));
  } else {
    for (; i + N <= n; i += N) {
      if ((i * sizeof(T)) % 64 < N * sizeof(T)) {  // once per cache line of weights
        hwy::Prefetch(wrow + i * static_cast<int64_t>(sizeof(T)) + kMmPrefetchBytes);
      }
      const auto w = LoadWeightF32<T>(df, wrow, i);
      a0 = hn::MulAdd(w, hn::LoadU(df, act[0].f + i), a0);
      a1 = hn::MulAdd(w, hn::LoadU(df, act[1].f + i), a1);
      if constexpr (NT > 2) a2 = hn::MulAdd(w, hn::LoadU(df, act[2].f + i), a2);
      if constexpr (NT > 3) a3 = hn::MulAdd(w, hn::LoadU(df, act[3].f + i), a3);
    }
  }
  // Tail, scalar (weights widen exactly as in the body; memcpy: f32 rows may sit at any byte).
  float t0 = 0.0f, t1 = 0.0f, t2 = 0.0f, t3 = 0.0f;
  for (; i < n; ++i) {
    const float w = ScalarWeightF32<T>(wrow, i);
    t0 += w * act[0].f[i];
    if constexpr (NT > 1) t1 += w * act[1].f[i];
    if constexpr (NT > 2) t2 += w * act[2].f[i];
    if constexpr (NT > 3) t3 += w * act[3].f[i];
  }
  out[0] = MmSum(df, a0) + t0;
  if constexpr (NT > 1) out[out_stride] = MmSum(df, a1) + t1;
  if constexpr (NT > 2) out[2 * out_stride] = MmSum(df, a2) + t2;
  if constexpr (NT > 3) out[3 * out_stride] = MmSum(df, a3) + t3;
}

// ---------------------------------------------------------------- driver

enum class MmPrep { kF32, kF16, kBF16, kQ8_0, kQ8_1, kQ8_K };

// How the activations of one weight type are prepared.
struct MmPrepSpec {
  MmPrep prep;
  MmLayout layout;  // int16 path only
  bool int8;        // VNNI path: int8 quants (+ corrections) instead of int16
  int32_t corr;     // VNNI block-32 path: unsigned offset of the weights (0: none)
  bool block_corr = false;  // q8_0 tiles: the offset's correction per block (MmAct::bcorr)
};

// Converts the n_tok activation rows into the workspace and fills acts[n_tok].
HWY_INLINE MmAct* PrepareActs(const MmPrepSpec& spec, int64_t n_in, const uint8_t* xa,
                              size_t xa_stride, int64_t n_tok) {
  const MmPrep prep = spec.prep;
  const bool is_int = prep == MmPrep::kQ8_0 || prep == MmPrep::kQ8_1 || prep == MmPrep::kQ8_K;
  const bool i16 = is_int && !spec.int8;
  const bool i8 = is_int && spec.int8;
  const int64_t block = prep == MmPrep::kQ8_K ? kQK_K : kQK8_0;
  const int64_t nb = is_int ? n_in / block : 0;
  const size_t ne = static_cast<size_t>(nb * block);
  const size_t q_bytes = i16 ? MmRoundUp64(ne * 2) : 0;
  const size_t q8_bytes = i8 ? MmRoundUp64(ne + 64) : 0;
  const size_t c_bytes = i8 && spec.corr && !spec.block_corr ? MmRoundUp64((ne / 4 + 16) * sizeof(int32_t)) : 0;
  const size_t d_bytes =
      is_int ? MmRoundUp64(static_cast<size_t>(nb + kMmChunk) * sizeof(float)) : 0;
  const size_t s_bytes = prep == MmPrep::kQ8_1 ? d_bytes : 0;
  const size_t b_bytes =
      prep == MmPrep::kQ8_K ? MmRoundUp64(static_cast<size_t>(nb) * 8 * sizeof(int32_t)) : 0;
  const size_t r_bytes =
      prep == MmPrep::kQ8_K ? MmRoundUp64(static_cast<size_t>(nb) * 16 * sizeof(int16_t)) : 0;
  const size_t f_bytes = is_int ? 0 : MmRoundUp64(static_cast<size_t>(n_in) * sizeof(float));
  const size_t bc_bytes = spec.block_corr ? MmRoundUp64(static_cast<size_t>(nb) * sizeof(int32_t)) : 0;
  const size_t per_tok =
      q_bytes + q8_bytes + c_bytes + d_bytes + s_bytes + b_bytes + r_bytes + f_bytes + bc_bytes;
  const size_t head = MmRoundUp64(static_cast<size_t>(n_tok) * sizeof(MmAct));
  uint8_t* ws = MmWorkspace(head + per_tok * static_cast<size_t>(n_tok));
  MmAct* acts = reinterpret_cast<MmAct*>(ws);
  for (int64_t t = 0; t < n_tok; ++t) {
    uint8_t* p = ws + head + per_tok * static_cast<size_t>(t);
    int16_t* q = reinterpret_cast<int16_t*>(p);
    p += q_bytes;
    int8_t* q8 = reinterpret_cast<int8_t*>(p);
    p += q8_bytes;
    int32_t* corr = reinterpret_cast<int32_t*>(p);
    p += c_bytes;
    float* d = reinterpret_cast<float*>(p);
    p += d_bytes;
    float* sx = reinterpret_cast<float*>(p);
    p += s_bytes;
    int32_t* bsum2 = reinterpret_cast<int32_t*>(p);
    p += b_bytes;
    int16_t* bsums = reinterpret_cast<int16_t*>(p);
    p += r_bytes;
    float* f = reinterpret_cast<float*>(p);
    p += f_bytes;
    int32_t* bcorr = reinterpret_cast<int32_t*>(p);
    const uint8_t* row = xa + xa_stride * static_cast<size_t>(t);
    switch (prep) {
      case MmPrep::kF32: WidenToF32<float>(row, f, n_in); break;
      case MmPrep::kF16: WidenToF32<hwy::float16_t>(row, f, n_in); break;
      case MmPrep::kBF16: WidenToF32<hwy::bfloat16_t>(row, f, n_in); break;
      case MmPrep::kQ8_0:
      case MmPrep::kQ8_1: {
        const bool q8_1 = prep == MmPrep::kQ8_1;
        if (i8) {  // (only the VNNI target prepares int8)
#if MOE_VNNI
          int32_t* const c = spec.block_corr ? nullptr : corr;
          int32_t* const bc = spec.block_corr ? bcorr : nullptr;
          if (q8_1) {
            PrepareQ8_0Int8<BlockQ8_1>(row, nb, q8, d, sx, c, bc, spec.corr);
          } else {
            PrepareQ8_0Int8<BlockQ8_0>(row, nb, q8, d, sx, c, bc, spec.corr);
          }
#endif
        } else if (q8_1) {
          PrepareQ8_0<BlockQ8_1>(row, nb, q, d, sx, spec.layout);
        } else {
          PrepareQ8_0<BlockQ8_0>(row, nb, q, d, sx, spec.layout);
        }
        break;
      }
      case MmPrep::kQ8_K:
        if (i8) {
          PrepareQ8_KInt8(row, nb, q8, d, bsum2, bsums);
        } else {
          PrepareQ8_K(row, nb, q, d, bsum2, bsums, spec.layout);
        }
        break;
    }
    acts[t] = MmAct{q, d, sx, bsum2, f, q8, corr, bsums, bcorr};
  }
  return acts;
}

// Row tiles keep a tile of weights in L2 while every token group passes over it.
constexpr size_t kMmTileBytes = 256 * 1024;

// kGroup: tokens per call of row_fn (each row's weights are unpacked once for them).
template <int64_t kGroup = kMmTokGroup, class RowFn>
HWY_INLINE void MmLoop(const uint8_t* W, size_t row_bytes, int64_t r0, int64_t r1,
                       const MmAct* acts, int64_t n_tok, float* y, int64_t y_stride,
                       const RowFn& row_fn) {
  int64_t tile = r1 - r0;
  if (n_tok > kGroup) {
    tile = static_cast<int64_t>(kMmTileBytes / (row_bytes ? row_bytes : 1));
    if (tile < 1) tile = 1;
  }
  const bool invariant = BatchInvariant();
  for (int64_t rt = r0; rt < r1; rt += tile) {
    const int64_t rt_end = rt + tile < r1 ? rt + tile : r1;
    for (int64_t t0 = 0; t0 < n_tok; t0 += kGroup) {
      const int64_t nt = n_tok - t0 < kGroup ? n_tok - t0 : kGroup;
      if (nt == 1 && invariant) {
        // The one-token kernels split a row's sum over two accumulators (for decode speed),
        // the multi-token ones do not: a lone token goes through the two-token kernel beside a
        // copy of itself, so its result is the one it gets in any group.
        const MmAct pair[2] = {acts[t0], acts[t0]};
        const int64_t n = rt_end - rt;
        thread_local std::vector<float> two;
        two.resize(static_cast<size_t>(2 * n));
        row_fn(2, W + static_cast<size_t>(rt) * row_bytes, n, row_bytes, pair, two.data(), n);
        std::copy(two.begin(), two.begin() + n, y + t0 * y_stride + (rt - r0));
        continue;
      }
      row_fn(nt, W + static_cast<size_t>(rt) * row_bytes, rt_end - rt, row_bytes, acts + t0,
             y + t0 * y_stride + (rt - r0), y_stride);
    }
  }
}

// Row kernel Row<NT, K> (Row32Dot, RowKDot, ...) over n_rows consecutive rows for one group
// of nt <= MmGroup<Row, K>() tokens; the token count is dispatched once per group, the row loop
// is inlined.
template <class R, class = void>
struct MmBatchRows : std::false_type {};
template <class R>
struct MmBatchRows<R, std::void_t<decltype(R::kBatchRows)>> : std::bool_constant<R::kBatchRows> {};
// Tokens per group: Row<1, K>::kMaxTokens where the kernel has more than kMmTokGroup.
template <class R, class = void>
struct MmMaxTokens : std::integral_constant<int64_t, kMmTokGroup> {};
template <class R>
struct MmMaxTokens<R, std::void_t<decltype(R::kMaxTokens)>> : std::integral_constant<int64_t, R::kMaxTokens> {};
template <template <int, class> class Row, class K>
constexpr int64_t MmGroup() { return MmMaxTokens<Row<1, K>>::value; }

template <int NT, template <int, class> class Row, class K>
HWY_INLINE void MmRows(const uint8_t* w, int64_t n_rows, size_t row_bytes, int64_t nb,
                       const MmAct* a, float* out, int64_t stride) {
#if MOE_VNNI
  if constexpr (NT == 1 && MmBatchRows<Row<1, K>>::value) {
    VnniRowsOneToken<Row, K>(w, n_rows, row_bytes, nb, a, out);
    return;
  }
#endif
  for (int64_t r = 0; r < n_rows; ++r) {
    Row<NT, K>::Run(w + static_cast<size_t>(r) * row_bytes, nb, a, out + r, stride);
  }
}
template <template <int, class> class Row, class K>
struct MmIntRows {
  int64_t nb;
  void operator()(int64_t nt, const uint8_t* w, int64_t n_rows, size_t row_bytes,
                  const MmAct* a, float* out, int64_t stride) const {
    constexpr bool k8 = MmGroup<Row, K>() == 8;  // (no instances past 4 tokens otherwise)
    switch (nt) {
      case 1: MmRows<1, Row, K>(w, n_rows, row_bytes, nb, a, out, stride); break;
      case 2: MmRows<2, Row, K>(w, n_rows, row_bytes, nb, a, out, stride); break;
      case 3: MmRows<3, Row, K>(w, n_rows, row_bytes, nb, a, out, stride); break;
      case 4: MmRows<4, Row, K>(w, n_rows, row_bytes, nb, a, out, stride); break;
      case 5: if constexpr (k8) MmRows<5, Row, K>(w, n_rows, row_bytes, nb, a, out, stride); break;
      case 6: if constexpr (k8) MmRows<6, Row, K>(w, n_rows, row_bytes, nb, a, out, stride); break;
      case 7: if constexpr (k8) MmRows<7, Row, K>(w, n_rows, row_bytes, nb, a, out, stride); break;
      case 8: if constexpr (k8) MmRows<8, Row, K>(w, n_rows, row_bytes, nb, a, out, stride); break;
    }
  }
};
template <int NT, class K>
struct MmRow32 {
  static HWY_INLINE void Run(const uint8_t* w, int64_t nb, const MmAct* a, float* o, int64_t s) {
    Row32Dot<NT, K>(w, nb, a, o, s);
  }
};
#if MOE_VNNI
// out[t * s] = sum(acc[t]) - m[t]
template <int NT>
HWY_INLINE void VnniStore(const __m512* acc, const float* m, float* o, int64_t s) {
  for (int t = 0; t < NT; ++t) o[t * s] = _mm512_reduce_add_ps(acc[t]) - m[t];
}
template <int NT, class K>
struct MmRow32Vnni {
  static constexpr bool kBatchRows = true;
  static HWY_INLINE void Acc(const uint8_t* w, int64_t nb, const MmAct* a, __m512* acc,
                             float* m) {
    Row32Vnni<NT, K>(w, nb, a, acc, m);
  }
  static HWY_INLINE void Run(const uint8_t* w, int64_t nb, const MmAct* a, float* o, int64_t s) {
    __m512 acc[NT];
    float m[NT];
    Row32Vnni<NT, K>(w, nb, a, acc, m);
    VnniStore<NT>(acc, m, o, s);
  }
};
// The codebook types take 8 tokens per unpack: their weights' grid lookups cost more than a
// token's products (4 -> 8 tokens: 1.1-1.2x, one core, in L2).
template <int NT, class K>
struct MmRowKVnni {
  static constexpr bool kBatchRows = true;
  static constexpr int64_t kMaxTokens = IsIQGrid<K>() ? 8 : kMmTokGroup;
  static HWY_INLINE void Acc(const uint8_t* w, int64_t nb, const MmAct* a, __m512* acc,
                             float* m) {
    RowKVnni<NT, K>(w, nb, a, acc, m);
  }
  static HWY_INLINE void Run(const uint8_t* w, int64_t nb, const MmAct* a, float* o, int64_t s) {
    __m512 acc[NT];
    float m[NT];
    RowKVnni<NT, K>(w, nb, a, acc, m);
    VnniStore<NT>(acc, m, o, s);
  }
};
#endif
template <int NT, class K>
struct MmRowK {
  static HWY_INLINE void Run(const uint8_t* w, int64_t nb, const MmAct* a, float* o, int64_t s) {
    RowKDot<NT, K>(w, nb, a, o, s);
  }
};

template <class K, template <int, class> class Row>
HWY_INLINE void MatMulInt(const MmPrepSpec& spec, const uint8_t* W, int64_t n_in, int64_t r0,
                          int64_t r1, const uint8_t* xa, size_t xa_stride, int64_t n_tok,
                          float* y, int64_t y_stride) {
  const MmAct* acts = PrepareActs(spec, n_in, xa, xa_stride, n_tok);
  const int64_t nb = n_in / static_cast<int64_t>(K::kElems);
  MmLoop<MmGroup<Row, K>()>(W, static_cast<size_t>(nb) * K::kBytes, r0, r1, acts, n_tok, y, y_stride,
                            MmIntRows<Row, K>{nb});
}

// Block-32 weights on the int16 path and (AVX3_DL) the VNNI path.
template <class K>
HWY_INLINE void MatMulInt32(MmPrep prep, const uint8_t* W, int64_t n_in, int64_t r0, int64_t r1,
                            const uint8_t* xa, size_t xa_stride, int64_t n_tok, float* y,
                            int64_t y_stride) {
  MatMulInt<K, MmRow32>(MmPrepSpec{prep, K::kLayout, false, 0}, W, n_in, r0, r1, xa, xa_stride,
                        n_tok, y, y_stride);
}
#if MOE_VNNI
template <class K>
HWY_INLINE void MatMulVnni32(MmPrep prep, const uint8_t* W, int64_t n_in, int64_t r0,
                             int64_t r1, const uint8_t* xa, size_t xa_stride, int64_t n_tok,
                             float* y, int64_t y_stride) {
  MatMulInt<K, MmRow32Vnni>(MmPrepSpec{prep, MmLayout::kNatural, true, VnniOffset<K>()}, W, n_in,
                            r0, r1, xa, xa_stride, n_tok, y, y_stride);
}
#endif

#if MOE_VNNI
// ---- q8_0 and q4_0 in row tiles (WeightLayout::kTiles16) ------------------------------------
// Decode multiplies each weight byte once, so what bounds it is the instructions a byte costs.
// In the file's layout a row's blocks are contiguous and every row ends in a horizontal sum;
// repacked (Repack), 16 rows are interleaved 4 quants at a time, so one vpdpbusd multiplies 16
// rows by 4 activation quants broadcast to every lane, the 16 rows' f16 scales are one load and
// no horizontal sum is left. Per tile of 16 rows, per pair of blocks p (2 blocks x 16 rows x
// the block's bytes: the file's size):
//   64 bytes: the f16 d of block 2p for rows 0..15, then of block 2p + 1
//   then block 2p, then block 2p + 1, each as 64-byte vectors whose lane r holds row r's
//   quants, unsigned: q8_0 8 vectors, vector k = quants 4k..4k+3 plus 128; q4_0 4 vectors,
//   vector j = the nibbles of quants 8j..8j+3 (low) and 8j+4..8j+7 (high), as stored (q + 8).
// The activation's -offset x (sum of the block's quants), MmAct::bcorr, starts each block's
// sum and undoes the offset.
// The 4 activation quants at p, broadcast to every lane.
HWY_INLINE __m512i TileX4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, sizeof(v));
  return _mm512_set1_epi32(v);
}

// The 16 rows' dots with 8 groups of 4 quants, w(k) the rows' unsigned quants of group k and
// x4(k) the activation's, in two vpdpbusd chains from s0 and s1: kHalves puts groups 0..3 in
// s0 and 4..7 in s1 (two sub-blocks of 16), else the even groups in s0 and the odd in s1.
template <bool kHalves, class W, class X>
HWY_INLINE void TileDot8(const W& w, const X& x4, __m512i& s0, __m512i& s1) {
  HWY_UNROLL(4)
  for (int i = 0; i < 4; ++i) {
    const int k0 = kHalves ? i : 2 * i, k1 = kHalves ? i + 4 : 2 * i + 1;
    s0 = _mm512_dpbusd_epi32(s0, w(k0), x4(k0));
    s1 = _mm512_dpbusd_epi32(s1, w(k1), x4(k1));
  }
}

// Where a tile kernel's prefetches go. A single pass over the tiles (all the tokens at once, at
// most kTilePass) reads them from memory once: each stream is prefetched kMmPrefetchBytes ahead,
// past its end into the tile it reads next (a stream's next tile follows it: MatMulTiles pairs
// tile i with tile i + h). With several passes over the same tiles, only the
// first would read memory and the others' arithmetic would leave it idle (8 tokens in two passes
// from memory took the sum of the two times): instead every pass prefetches its share of the next
// tiles (`next` and its partner tile_bytes on), in order and in proportion to its tokens, into L2, so the next
// tiles arrive while these are multiplied (16 tokens in passes of 4 from memory: +11-17%).
struct MmTilePrefetch {
  const uint8_t* next = nullptr;
  int64_t n_tok = 1, k0 = 0, nt = 1;  // all the tokens; this group's first and count
  bool one_token_sw = true;  // one token: prefetch in software too (OneTokenTilePrefetch)
};

// Position p's prefetches: kPos bytes per tile, kT tiles tile_bytes apart from `tile`, np
// positions per tile. The super-block kernels spread a position's lines over its kParts chunks
// (part = the chunk): issued at once, the 36-53 lines of a q4_K or q6_K super-block held the
// thread until they drained (session 18, Zen 4 host, one thread, a 1024 x 2816 matrix from
// memory, one token: q6_K 9-14 GB/s with the burst, 23 with no software prefetch at all).
// kL2: the single pass's prefetches fill L2 only (prefetcht1), for kernels whose arithmetic per
// byte leaves the loads time to come from L2. Into L1 (prefetcht0), each prefetch holds one of
// L1's few miss buffers until its line arrives, and a loop with several tokens' arithmetic then
// waits on them (session 19, Zen 4 host, one thread, a 1024 x 2816 matrix from memory, GB/s
// prefetcht0 -> prefetcht1: q4_0 2 tokens 23 -> 28-30, 4 tokens 16 -> 22-23; q8_0 4 tokens 17 ->
// 22, 8 tokens 13 -> 21-22; q4_K 3-4 tokens 13-19 -> 19-20, q5_K 13-16 -> 18-22). One token
// keeps prefetcht0 (memory bound, it waits on L2 otherwise: q4_0 27 -> 25, q4_K 22-23 -> 18-21),
// and so do the q6_K/q3_K/q2_K kernels (slower with prefetcht1 at every token count).
// kHw: the hardware prefetcher can stream this kernel's tiles alone (one sequential stream per
// tile); then one token prefetches in software only where OneTokenTilePrefetch says so. The
// q5_K, q3_K and q2_K tiles, read at two places per super-block, always do (one thread, one
// token, Zen 4: without it 6-10 GB/s against 19-24); q6_K's, in reading order, do not (TileQ6K).
template <int kT, size_t kPos, int kParts = 1, bool kL2 = false, bool kHw = false>
HWY_INLINE void TilePrefetch(const uint8_t* tile, size_t tile_bytes, int64_t np, int64_t p,
                             const MmTilePrefetch& pf, int part = 0) {
  if (pf.nt == pf.n_tok) {
    if (kHw && pf.n_tok == 1 && !pf.one_token_sw) return;
    constexpr size_t kPart = (kPos / kParts + 63) / 64 * 64;
    const size_t ahead = static_cast<size_t>(p) * kPos + kMmPrefetchBytes + static_cast<size_t>(part) * kPart;
    HWY_UNROLL(2)
    for (int k = 0; k < kT; ++k) MmPrefetch<kPart, kL2>(tile + k * tile_bytes + ahead);
    return;
  }
  if (part != 0) return;  // (the later passes' prefetch of the next tiles: once per position)
  // Over all groups, the token-positions before this one's end are k0 np + (p + 1) nt of n_tok np.
  const size_t at = static_cast<size_t>(pf.k0 * np + p * pf.nt), n = static_cast<size_t>(pf.n_tok);
  const size_t b0 = at * kPos / n / 64 * 64, b1 = (at + static_cast<size_t>(pf.nt)) * kPos / n;
  HWY_UNROLL(2)
  for (int k = 0; k < kT; ++k) {
    for (size_t o = b0; o < b1; o += 64)
      _mm_prefetch(reinterpret_cast<const char*>(pf.next + k * tile_bytes + o), _MM_HINT_T1);
  }
}

template <DType kW>
struct TileFormat {
  static constexpr bool kQ4 = kW == DType::kQ4_0;
  static constexpr size_t kBlockBytes = kQ4 ? 256 : 512;  // 16 rows of one block's quants
  static constexpr size_t kPairBytes = 64 + 2 * kBlockBytes;
  static constexpr int32_t kOffset = kQ4 ? 8 : 128;
};

// out[t * out_stride + out_tile k + r] = the dot of row r of tile k (kT tiles, tile_bytes apart)
// with token t (NT tokens), over np pairs of blocks. With kT = 2 each activation broadcast feeds both
// tiles' vpdpbusd (2 tiles multiply 4 tokens in cache about a quarter faster; on a Zen 4 host the
// loop runs at 75% of the real vpdpbusd rate, the per-block scale multiply and fused add sharing
// its pipes, DESIGN-NOTES Threads). A row's arithmetic is the same
// whatever kT and NT are (even and odd blocks in two float sums, added at the end), so its
// result is bitwise the same however the rows and tokens are grouped.
template <DType kW, int NT, int kT>
HWY_INLINE void TileDot(const uint8_t* HWY_RESTRICT tile, size_t tile_bytes, int64_t np, const MmAct* act,
                        float* HWY_RESTRICT out, int64_t out_stride, int64_t out_tile, const MmTilePrefetch& pf) {
  using TF = TileFormat<kW>;
  __m512 acc[NT][kT][2];
  HWY_UNROLL(4)
  for (int t = 0; t < NT; ++t) {
    HWY_UNROLL(2)
    for (int k = 0; k < kT; ++k) acc[t][k][0] = acc[t][k][1] = _mm512_setzero_ps();
  }
  const __m512i nib = _mm512_set1_epi8(0x0F);
  for (int64_t p = 0; p < np; ++p) {
    const uint8_t* pp = tile + p * TF::kPairBytes;
    HWY_UNROLL(2)
    for (int h = 0; h < 2; ++h) {
      TilePrefetch<kT, TF::kPairBytes, 2, (NT > 1), true>(tile, tile_bytes, np, p, pf, h);
      const int64_t b = 2 * p + h;
      __m512 dw[kT];
      const uint8_t* g[kT];
      HWY_UNROLL(2)
      for (int k = 0; k < kT; ++k) {
        dw[k] = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(pp + k * tile_bytes + 32 * h)));
        g[k] = pp + k * tile_bytes + 64 + TF::kBlockBytes * h;
      }
      // Group j's unsigned quants of tile k's 16 rows.
      const auto w = [&](int k, int j) {
        if constexpr (TF::kQ4) {
          const __m512i v = _mm512_load_si512(g[k] + 64 * (j / 2));
          return _mm512_and_si512(j % 2 ? _mm512_srli_epi16(v, 4) : v, nib);
        } else {
          return _mm512_load_si512(g[k] + 64 * j);
        }
      };
      HWY_UNROLL(4)
      for (int t = 0; t < NT; ++t) {
        const int8_t* xq = act[t].q8 + 64 * p + 4 * h;  // PrepareQ8_0Int8's pair interleave
        const __m512i corr = _mm512_set1_epi32(act[t].bcorr[b]);
        __m512i s0[kT], s1[kT];
        HWY_UNROLL(2)
        for (int k = 0; k < kT; ++k) s0[k] = corr, s1[k] = _mm512_setzero_si512();
        HWY_UNROLL(4)
        for (int i = 0; i < 4; ++i) {
          const __m512i x0 = TileX4(xq + 16 * i), x1 = TileX4(xq + 16 * i + 8);
          HWY_UNROLL(2)
          for (int k = 0; k < kT; ++k) {
            s0[k] = _mm512_dpbusd_epi32(s0[k], w(k, 2 * i), x0);
            s1[k] = _mm512_dpbusd_epi32(s1[k], w(k, 2 * i + 1), x1);
          }
        }
        const __m512 xd = _mm512_set1_ps(act[t].d[b]);
        HWY_UNROLL(2)
        for (int k = 0; k < kT; ++k) {
          acc[t][k][h] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(s0[k], s1[k])),
                                         _mm512_mul_ps(dw[k], xd), acc[t][k][h]);
        }
      }
    }
  }
  HWY_UNROLL(4)
  for (int t = 0; t < NT; ++t) {
    HWY_UNROLL(2)
    for (int k = 0; k < kT; ++k)
      _mm512_storeu_ps(out + t * out_stride + out_tile * k, _mm512_add_ps(acc[t][k][0], acc[t][k][1]));
  }
}

// q4_K in tiles: per super-block, 2304 bytes for 16 rows (the file's 16 x 144):
//   [0, 64):      the f16 d of rows 0..15, then their dmin
//   [64, 256):    byte b (0..11) of row r's packed 6-bit scales and mins at 64 + 16 b + r
//   [256, 2304):  sub-block j (32 quants) at 256 + 256 j, as a q4_0 block's 4 vectors
// The 16 rows' scales and mins of sub-block j are unpacked together (GetScaleMinK4 on byte
// lanes); the mins' term sum_j m_j bsum_j is a vpmaddwd over pairs of sub-blocks.
constexpr size_t kTileQ4KBytes = 16 * sizeof(BlockQ4_K);
// q5_K in tiles: the q4_K tile of its low 4 bits, scales and mins (the same fields), then
//   [2304, 2816): the fifth bits of sub-block j at 2304 + 64 j, per 64-byte nibble vector v:
//                 8 bytes of byte-lane masks (bit 4r + i: quant 8v + i of row r), then 8 for the
//                 high nibbles' lanes (quant 8v + 4 + i)
// so each unpacked vector takes its fifth bits with one masked byte add of 16.
constexpr size_t kTileQ5KBytes = 16 * sizeof(BlockQ5_K);
// iq4_xs in tiles: per super-block, 2176 bytes for 16 rows (the file's 16 x 136):
//   [0, 32):      the f16 d of rows 0..15
//   [32, 64):     their scales_h (u16 each)
//   [64, 128):    byte i (0..3) of row r's scales_l at 64 + 16 i + r
//   [128, 2176):  sub-block j (32 indices) at 128 + 256 j, as a q4_0 block's 4 vectors
// The indices go through the iq4_nl table (vpshufb) stored + 128 (unsigned); each sub-block's
// chain starts at -128 x its activation sum, which undoes it.
constexpr size_t kTileIQ4XSBytes = 16 * sizeof(BlockIQ4_XS);
// The super-block tile formats TileDotQ4K multiplies.
enum class TileK { kQ4, kQ5, kIQ4XS };

// kT tiles (tile_bytes apart) at a time, as TileDot: per sub-block, each 64-byte weight vector of
// every tile is unpacked into its two groups and each activation broadcast feeds every tile's
// vpdpbusd (one chain per token and tile). A row's integer sums are exact whatever the grouping, and
// its float arithmetic is the same, so its result is bitwise the same for any kT and NT.
template <int NT, int kT, TileK kF = TileK::kQ4>
HWY_INLINE void TileDotQ4K(const uint8_t* HWY_RESTRICT tile, size_t tile_bytes, int64_t nb, const MmAct* act,
                           float* HWY_RESTRICT out, int64_t out_stride, int64_t out_tile, const MmTilePrefetch& pf) {
  constexpr bool kQ5 = kF == TileK::kQ5, kIQ = kF == TileK::kIQ4XS;
  constexpr size_t kSbBytes = kQ5 ? kTileQ5KBytes : kIQ ? kTileIQ4XSBytes : kTileQ4KBytes;
  constexpr size_t kQuants = kIQ ? 128 : 256;  // where the sub-blocks' nibbles start
  // The mins' term is subtracted per super-block by a fused multiply-add (the two terms are
  // large and cancel, so their rounding order shows: this order matched llama.cpp's results on
  // the conformance files to ~1e-6, a separate accumulator subtracted at the end did not).
  // q5_K keeps the mins' terms in a sum of their own, subtracted at the end, as ggml's q5_K
  // product does (it matched llama.cpp's results to ~1e-6 there; q4_K's order gave ~1e-2).
  __m512 acc[NT][kT], macc[NT][kT];
  HWY_UNROLL(4)
  for (int t = 0; t < NT; ++t) {
    HWY_UNROLL(2)
    for (int k = 0; k < kT; ++k) acc[t][k] = macc[t][k] = _mm512_setzero_ps();
  }
  const __m512i nib = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16);
  // iq4_xs: the iq4_nl values + 128 in every 128-bit lane (the XOR flips the sign bit: + 128).
  const __m512i lut = kIQ ? _mm512_xor_si512(VnniLutTable(kIQ4NLValues), _mm512_set1_epi8(static_cast<char>(0x80)))
                          : _mm512_setzero_si512();
  const __m128i m63 = _mm_set1_epi8(63), m15 = _mm_set1_epi8(15), top = _mm_set1_epi8(static_cast<char>(0xC0));
  const auto hi2 = [&](__m128i v) { return _mm_srli_epi16(_mm_and_si128(v, top), 2); };  // bits 6..7 -> 4..5
  // One vpdpbusd chain per token and tile, two (low and high nibbles) when there are only one or
  // two of those: fewer chains leave the loop waiting on vpdpbusd's latency.
  constexpr bool kTwoChains = NT * kT <= 2;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* sb[kT];
    HWY_UNROLL(2)
    for (int k = 0; k < kT; ++k) sb[k] = tile + k * tile_bytes + b * kSbBytes;
    const auto byte = [&](int k, int i) { return _mm_load_si128(reinterpret_cast<const __m128i*>(sb[k] + 64 + 16 * i)); };
    // Sub-block j's scales of the 16 rows of tile k (int32 lanes).
    const auto scale = [&](int k, int j) {
      if constexpr (kIQ) {  // ls_j - 32: nibble j % 2 of scales_l[j / 2], bits 2j of scales_h
        const __m512i lo = _mm512_cvtepu8_epi32(_mm_and_si128(j % 2 ? _mm_srli_epi16(byte(k, j / 2), 4) : byte(k, j / 2), m15));
        const __m512i h = _mm512_cvtepu16_epi32(_mm256_load_si256(reinterpret_cast<const __m256i*>(sb[k] + 32)));
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi32(h, 2 * j), _mm512_set1_epi32(3));
        return _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), _mm512_set1_epi32(32));
      } else {
        return _mm512_cvtepu8_epi32(j < 4 ? _mm_and_si128(byte(k, j), m63)
                                          : _mm_or_si128(_mm_and_si128(byte(k, j + 4), m15), hi2(byte(k, j - 4))));
      }
    };
    // Mins of sub-blocks 2i and 2i + 1 as the int16 pair of each row's 32-bit lane.
    const auto mins = [&](int k, int j) {
      return j < 4 ? _mm_and_si128(byte(k, j + 4), m63)
                   : _mm_or_si128(_mm_and_si128(_mm_srli_epi16(byte(k, j + 4), 4), m15), hi2(byte(k, j)));
    };
    __m512i isum[NT][kT];
    HWY_UNROLL(4)
    for (int t = 0; t < NT; ++t) {
      HWY_UNROLL(2)
      for (int k = 0; k < kT; ++k) isum[t][k] = _mm512_setzero_si512();
    }
    HWY_UNROLL(8)
    for (int j = 0; j < 8; ++j) {
      TilePrefetch<kT, kSbBytes, 8, (NT > 1), !kQ5>(tile, tile_bytes, nb, b, pf, j);
      __m512i s[NT][kT], s1[NT][kT];  // s1: the high nibbles' chain when there are few chains
      HWY_UNROLL(4)
      for (int t = 0; t < NT; ++t) {
        // iq4_xs: -128 x the sub-block's activation sum undoes the values' + 128.
        const __m512i s0 = kIQ ? _mm512_set1_epi32(-128 * act[t].bsum2[b * 8 + j]) : _mm512_setzero_si512();
        HWY_UNROLL(2)
        for (int k = 0; k < kT; ++k) s[t][k] = s0, s1[t][k] = _mm512_setzero_si512();
      }
      HWY_UNROLL(4)
      for (int v = 0; v < 4; ++v) {  // vector v: groups 2v (low nibbles) and 2v + 1 (high)
        __m512i lo[kT], hi[kT];
        HWY_UNROLL(2)
        for (int k = 0; k < kT; ++k) {
          const __m512i w = _mm512_load_si512(sb[k] + kQuants + 256 * j + 64 * v);
          lo[k] = _mm512_and_si512(w, nib);
          hi[k] = _mm512_and_si512(_mm512_srli_epi16(w, 4), nib);
          if constexpr (kIQ) {
            lo[k] = _mm512_shuffle_epi8(lut, lo[k]);
            hi[k] = _mm512_shuffle_epi8(lut, hi[k]);
          }
          if constexpr (kQ5) {  // the fifth bits: + 16 where set
            const uint8_t* m = sb[k] + kTileQ4KBytes + 64 * j + 16 * v;
            uint64_t ml, mh;
            std::memcpy(&ml, m, 8);
            std::memcpy(&mh, m + 8, 8);
            lo[k] = _mm512_mask_add_epi8(lo[k], _cvtu64_mask64(ml), lo[k], sixteen);
            hi[k] = _mm512_mask_add_epi8(hi[k], _cvtu64_mask64(mh), hi[k], sixteen);
          }
        }
        HWY_UNROLL(4)
        for (int t = 0; t < NT; ++t) {
          const int8_t* xq = act[t].q8 + b * kQK_K + 32 * j + 8 * v;
          const __m512i x0 = TileX4(xq), x1 = TileX4(xq + 4);
          HWY_UNROLL(2)
          for (int k = 0; k < kT; ++k) {
            if constexpr (kTwoChains) {
              s[t][k] = _mm512_dpbusd_epi32(s[t][k], lo[k], x0);
              s1[t][k] = _mm512_dpbusd_epi32(s1[t][k], hi[k], x1);
            } else {
              s[t][k] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(s[t][k], lo[k], x0), hi[k], x1);
            }
          }
        }
      }
      HWY_UNROLL(2)
      for (int k = 0; k < kT; ++k) {
        const __m512i sc = scale(k, j);
        HWY_UNROLL(4)
        for (int t = 0; t < NT; ++t) {
          const __m512i st = kTwoChains ? _mm512_add_epi32(s[t][k], s1[t][k]) : s[t][k];
          isum[t][k] = _mm512_add_epi32(isum[t][k], _mm512_mullo_epi32(st, sc));
        }
      }
    }
    HWY_UNROLL(2)
    for (int k = 0; k < kT; ++k) {
      const __m512 dw = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(sb[k])));
      __m512i mp[4];  // q4_K, q5_K: the mins of sub-blocks 2i and 2i + 1 as int16 pairs (iq4_xs has none)
      if constexpr (!kIQ) {
        HWY_UNROLL(4)
        for (int i = 0; i < 4; ++i) {
          mp[i] = _mm512_or_si512(_mm512_cvtepu8_epi32(mins(k, 2 * i)),
                                  _mm512_slli_epi32(_mm512_cvtepu8_epi32(mins(k, 2 * i + 1)), 16));
        }
      }
      HWY_UNROLL(4)
      for (int t = 0; t < NT; ++t) {
        const __m512 xd = _mm512_set1_ps(act[t].d[b]);
        acc[t][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t][k]), _mm512_mul_ps(dw, xd), acc[t][k]);
        if constexpr (!kIQ) {
          const int32_t* bs = act[t].bsum2 + b * 8;
          __m512i msum = _mm512_setzero_si512();
          HWY_UNROLL(4)
          for (int i = 0; i < 4; ++i) {
            const int32_t pair = static_cast<int32_t>((static_cast<uint32_t>(bs[2 * i + 1]) << 16) |
                                                      (static_cast<uint32_t>(bs[2 * i]) & 0xFFFF));
            msum = _mm512_add_epi32(msum, _mm512_madd_epi16(mp[i], _mm512_set1_epi32(pair)));
          }
          const __m512 dmw = _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(sb[k] + 32)));
          if constexpr (kQ5) {
            macc[t][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(msum), _mm512_mul_ps(dmw, xd), macc[t][k]);
          } else {
            acc[t][k] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(msum), _mm512_mul_ps(dmw, xd), acc[t][k]);
          }
        }
      }
    }
  }
  HWY_UNROLL(4)
  for (int t = 0; t < NT; ++t) {
    HWY_UNROLL(2)
    for (int k = 0; k < kT; ++k) _mm512_storeu_ps(out + t * out_stride + out_tile * k, kQ5 ? _mm512_sub_ps(acc[t][k], macc[t][k]) : acc[t][k]);
  }
}

// The types with sub-blocks of 16 share one tile kernel (TileDotK16), each described by a
// format: its bytes per 16-row super-block, how chunk c (32 quants, sub-blocks 2c and 2c + 1)
// unpacks into 8 vectors of 4-quant groups (unsigned, stored + kOff), the 16 rows' scale (and
// min) of sub-block j as int32 lanes, and where the rows' f16 d (and dmin) lie.
//
// q6_K in tiles: per super-block, 3360 bytes for 16 rows (the file's 16 x 210), in the order the
// kernel reads them (one sequential stream, which the hardware prefetcher follows alone):
//   chunk c (32 quants, sub-blocks 2c and 2c + 1) at 416 c:
//     [0, 256):    the low 4 bits, as a q4_0 block's 4 vectors
//     [256, 384):  the top 2 bits: vector v, lane r, byte i holds those of quant 16 v + 4 s + i
//                  at bits 2 s (s = 0..3)
//     [384, 416):  the int8 scale of sub-block 2c + h of row r at 384 + 16 h + r
//   [3328, 3360):  the f16 d of rows 0..15
// The quants are q + 32 (unsigned). (416 and 3360 are no multiples of 64: unaligned loads.)
// Session 23 (Zen 4 host, one thread, one token, a 2816 x 1024 matrix from memory): with the low
// bits, top bits and scales in three regions of the super-block, 17.8 GB/s (and software
// prefetch needed: 6-10 without); chunk by chunk, as here, 24.9 with the hardware prefetcher
// alone (21.6 with the software prefetch too), near q4_K's 27. Decode with 2 threads, alternating
// builds: DeepSeek-like Q4_K_M 224 -> 257 tok/s, medium Q4_K_M 221 -> 257 (their heads and some
// down projections are q6_K). The same order for q5_K's fifth bits (after each sub-block's
// nibbles) was no faster (21.7 -> 21.2), and q3_K/q2_K read at their in-cache speed already.
struct TileQ6K {
  static constexpr size_t kBytes = 16 * sizeof(BlockQ6_K);
  static constexpr size_t kChunk = 416;
  static constexpr int32_t kOff = 32;
  static constexpr bool kMins = false;
  static constexpr bool kSequential = true;
  static constexpr size_t kD = 3328;
  static HWY_INLINE void Unpack(const uint8_t* sb, int c, __m512i* w) {
    const __m512i nib = _mm512_set1_epi8(0x0F), two = _mm512_set1_epi8(0x03);
    const uint8_t* lo = sb + kChunk * c;
    const uint8_t* hi = lo + 256;
    HWY_UNROLL(8)
    for (int k = 0; k < 8; ++k) {
      const __m512i l = _mm512_loadu_si512(lo + 64 * (k / 2));
      const __m512i h = _mm512_loadu_si512(hi + 64 * (k / 4));
      const __m512i low = _mm512_and_si512(k % 2 ? _mm512_srli_epi16(l, 4) : l, nib);
      const int sh = 2 * (k % 4);
      const __m512i top = _mm512_and_si512(sh ? _mm512_srli_epi16(h, sh) : h, two);
      w[k] = _mm512_or_si512(low, _mm512_slli_epi16(top, 4));
    }
  }
  static HWY_INLINE __m512i Scale(const uint8_t* sb, int j) {
    return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + kChunk * (j / 2) + 384 + 16 * (j % 2))));
  }
};

// The 2-bit values of chunk c (32 quants) packed as q6_K's top bits at p, in 8 group vectors.
HWY_INLINE void TileCrumbs(const uint8_t* p, __m512i* w) {
  const __m512i three = _mm512_set1_epi8(3);
  HWY_UNROLL(8)
  for (int k = 0; k < 8; ++k) {
    const __m512i l = _mm512_loadu_si512(p + 64 * (k / 4));
    const int sh = 2 * (k % 4);
    w[k] = _mm512_and_si512(sh ? _mm512_srli_epi16(l, sh) : l, three);
  }
}

// q3_K in tiles: per super-block, 1760 bytes for 16 rows (the file's 16 x 110):
//   [0, 1024):     the low 2 bits, 32 quants c at 128 c as q6_K's top bits
//   [1024, 1536):  the third bits, 32 quants c at 1024 + 64 c: 8 bytes per group k of 4 quants,
//                  bit 4 r + i that of quant 4 k + i of row r (a byte-lane mask: + 4 where set)
//   [1536, 1728):  byte i (0..11) of row r's packed 6-bit scales at 1536 + 16 i + r
//   [1728, 1760):  the f16 d of rows 0..15
// The quants are q + 4 (unsigned, 0..7). (1760 is no multiple of 64: unaligned loads.)
struct TileQ3K {
  static constexpr size_t kBytes = 16 * sizeof(BlockQ3_K);
  static constexpr int32_t kOff = 4;
  static constexpr bool kMins = false;
  static constexpr bool kSequential = false;  // low bits, third bits / scales: regions apart
  static constexpr size_t kD = 1728;
  static HWY_INLINE void Unpack(const uint8_t* sb, int c, __m512i* w) {
    TileCrumbs(sb + 128 * c, w);
    const uint8_t* hm = sb + 1024 + 64 * c;
    HWY_UNROLL(8)
    for (int k = 0; k < 8; ++k) {
      uint64_t m;
      std::memcpy(&m, hm + 8 * k, 8);
      w[k] = _mm512_mask_add_epi8(w[k], _cvtu64_mask64(m), w[k], _mm512_set1_epi8(4));
    }
  }
  // The low bits of scale j are nibble j / 8 of byte j % 8, the top two bits 2 (j / 4) of byte
  // 8 + j % 4 (UnpackQ3KScales); stored + 32.
  static HWY_INLINE __m512i Scale(const uint8_t* sb, int j) {
    const auto byte = [&](int i) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(sb + 1536 + 16 * i)); };
    const __m128i m15 = _mm_set1_epi8(15), m3 = _mm_set1_epi8(3);
    const __m128i l = byte(j % 8), h = byte(8 + j % 4);
    const __m128i lo = _mm_and_si128(j < 8 ? l : _mm_srli_epi16(l, 4), m15);
    const int sh = 2 * (j / 4);
    const __m128i hi = _mm_and_si128(sh ? _mm_srli_epi16(h, sh) : h, m3);
    return _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_or_si128(lo, _mm_slli_epi16(hi, 4))), _mm512_set1_epi32(32));
  }
};

// q2_K in tiles: per super-block, 1344 bytes for 16 rows (the file's 16 x 84):
//   [0, 1024):     the 2-bit quants, 32 quants c at 128 c as q3_K's low bits
//   [1024, 1280):  byte j (scale j in the low nibble, min j in the high one) of row r at
//                  1024 + 16 j + r
//   [1280, 1344):  the f16 d of rows 0..15, then their dmin
struct TileQ2K {
  static constexpr size_t kBytes = 16 * sizeof(BlockQ2_K);
  static constexpr int32_t kOff = 0;
  static constexpr bool kMins = true;
  static constexpr bool kSequential = false;  // quants, scales: two regions
  static constexpr size_t kD = 1280, kDMin = 1312;
  static HWY_INLINE void Unpack(const uint8_t* sb, int c, __m512i* w) { TileCrumbs(sb + 128 * c, w); }
  static HWY_INLINE __m128i Byte(const uint8_t* sb, int j) {
    return _mm_load_si128(reinterpret_cast<const __m128i*>(sb + 1024 + 16 * j));
  }
  static HWY_INLINE __m512i Scale(const uint8_t* sb, int j) {
    return _mm512_cvtepu8_epi32(_mm_and_si128(Byte(sb, j), _mm_set1_epi8(15)));
  }
  static HWY_INLINE __m512i Min(const uint8_t* sb, int j) {
    return _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(Byte(sb, j), 4), _mm_set1_epi8(15)));
  }
};

// Token a's products with 16 rows over chunk c (32 quants: sub-blocks 2c and 2c + 1 of 16) of
// super-block b, the rows' groups of 4 unpacked in w: dot_j s_j summed over the two. The quants'
// offset term, -kOff x (the sub-blocks' scale x activation sum), is the caller's: one
// vpdpwssd per chunk and token (TileDotK16), where subtracting kOff x the sums from s0 and s1
// here had cost six scalar and vector operations (q6_K in cache, one thread: 1 token 46-54 ->
// 60 GMAC/s, 4 tokens 114-120 -> 128-131, 8 unchanged).
HWY_INLINE __m512i TileChunk16(const __m512i* w, const MmAct& a, int64_t b, int c, __m512i sc0, __m512i sc1) {
  const int8_t* xq = a.q8 + b * kQK_K + 32 * c;
  __m512i s0 = _mm512_setzero_si512(), s1 = s0;
  TileDot8<true>([&](int k) { return w[k]; }, [&](int k) { return TileX4(xq + 4 * k); }, s0, s1);
  return _mm512_add_epi32(_mm512_mullo_epi32(s0, sc0), _mm512_mullo_epi32(s1, sc1));
}

// One tile (16 rows) of a sub-block-of-16 format F times NT tokens: each chunk of 32 quants is
// unpacked once for all the tokens, a super-block's sum is exact in int32 and scaled once. q2_K's
// mins' term sum_j m_j bsum_j is summed apart and subtracted at the end: folded into each
// super-block's sum (ggml's AVX2 order, but over 8 lanes there and whole rows here) its
// conformance case moved 3e-2 nats at one position; apart it matches llama.cpp to 1.5e-6.
template <class F, int NT>
HWY_INLINE void TileDotK16(const uint8_t* HWY_RESTRICT tile, int64_t nb, const MmAct* act,
                           float* HWY_RESTRICT out, int64_t out_stride, const MmTilePrefetch& pf) {
  __m512 acc[NT], macc[NT];
  HWY_UNROLL(4)
  for (int t = 0; t < NT; ++t) acc[t] = macc[t] = _mm512_setzero_ps();
  const size_t tile_bytes = static_cast<size_t>(nb) * F::kBytes;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* sb = tile + b * F::kBytes;
    __m512i isum[NT], msum[NT];
    HWY_UNROLL(4)
    for (int t = 0; t < NT; ++t) isum[t] = msum[t] = _mm512_setzero_si512();
    HWY_UNROLL(8)
    for (int c = 0; c < 8; ++c) {
      TilePrefetch<1, F::kBytes, 8, false, F::kSequential>(tile, tile_bytes, nb, b, pf, c);
      __m512i w[8];  // group k (quants 4k..4k+3 of the 32) of the 16 rows
      F::Unpack(sb, c, w);
      const __m512i sc0 = F::Scale(sb, 2 * c), sc1 = F::Scale(sb, 2 * c + 1);
      HWY_UNROLL(4)
      for (int t = 0; t < NT; ++t) isum[t] = _mm512_add_epi32(isum[t], TileChunk16(w, act[t], b, c, sc0, sc1));
      if constexpr (F::kOff != 0) {
        // -kOff x the two scales as the int16 pair of each row's lane (|kOff x scale| <= 4096),
        // against the two activation sums as an int16 pair: the exact integer the quants'
        // offset adds, so the sum is the same whichever order it is taken in.
        const __m512i scn = _mm512_mullo_epi16(
            _mm512_or_si512(_mm512_and_si512(sc0, _mm512_set1_epi32(0xFFFF)), _mm512_slli_epi32(sc1, 16)),
            _mm512_set1_epi16(static_cast<int16_t>(-F::kOff)));
        HWY_UNROLL(4)
        for (int t = 0; t < NT; ++t) {
          int32_t bs2;
          std::memcpy(&bs2, act[t].bsums + b * 16 + 2 * c, sizeof(bs2));
          isum[t] = _mm512_dpwssd_epi32(isum[t], scn, _mm512_set1_epi32(bs2));
        }
      }
      if constexpr (F::kMins) {
        const __m512i mn0 = F::Min(sb, 2 * c), mn1 = F::Min(sb, 2 * c + 1);
        HWY_UNROLL(4)
        for (int t = 0; t < NT; ++t) {
          const int16_t* bs = act[t].bsums + b * 16 + 2 * c;
          msum[t] = _mm512_add_epi32(msum[t], _mm512_add_epi32(_mm512_mullo_epi32(mn0, _mm512_set1_epi32(bs[0])),
                                                               _mm512_mullo_epi32(mn1, _mm512_set1_epi32(bs[1]))));
        }
      }
    }
    const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + F::kD)));
    HWY_UNROLL(4)
    for (int t = 0; t < NT; ++t) {
      const __m512 xd = _mm512_set1_ps(act[t].d[b]);
      if constexpr (F::kMins) {
        const __m512 dmw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + F::kDMin)));
        macc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(msum[t]), _mm512_mul_ps(dmw, xd), macc[t]);
      }
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[t]), _mm512_mul_ps(dw, xd), acc[t]);
    }
  }
  HWY_UNROLL(4)
  for (int t = 0; t < NT; ++t) _mm512_storeu_ps(out + t * out_stride, F::kMins ? _mm512_sub_ps(acc[t], macc[t]) : acc[t]);
}

// The super-block types by tile kernel: sub-blocks of 32 (TileDotQ4K) and of 16 (TileDotK16).
constexpr bool TileK32(DType w) { return w == DType::kQ4_K || w == DType::kQ5_K || w == DType::kIQ4_XS; }
constexpr bool TileK16(DType w) { return w == DType::kQ6_K || w == DType::kQ3_K || w == DType::kQ2_K; }

// Tokens per pass of a tile kernel over its tiles: each weight vector is unpacked once for all
// of them. 8 for q8_0, q4_0 and q6_K: 8 tokens' accumulators over 2 tiles spill to L1, which
// costs less than a second pass (measured, one thread, q4_0 / q8_0 / q6_K against passes of 4:
// 5-8 tokens from memory +20-60%, 64 tokens +9-37%). q4_K keeps 4: its per-sub-block integer
// sums spill too, and 6-8 tokens in one pass ran 15-35% slower.
template <DType kW>
inline constexpr int64_t kTilePass = TileK32(kW) ? 4 : 8;

// kT tiles (tile_bytes apart, their outputs out_tile floats apart) times nt <= kTilePass tokens,
// in the tile kernel of kW.
template <DType kW, int kT>
HWY_INLINE void TileGroup(const uint8_t* tile, size_t tile_bytes, int64_t np, const MmAct* a, int64_t nt,
                          float* out, int64_t out_stride, int64_t out_tile, const MmTilePrefetch& pf) {
  const auto dot = [&](auto nt_c) {
    constexpr int NT = decltype(nt_c)::value;
    if constexpr (TileK16(kW)) {
      static_assert(kT == 1);
      using F = std::conditional_t<kW == DType::kQ6_K, TileQ6K, std::conditional_t<kW == DType::kQ3_K, TileQ3K, TileQ2K>>;
      TileDotK16<F, NT>(tile, np, a, out, out_stride, pf);
    } else if constexpr (TileK32(kW)) {
      constexpr TileK f = kW == DType::kQ5_K ? TileK::kQ5 : kW == DType::kIQ4_XS ? TileK::kIQ4XS : TileK::kQ4;
      TileDotQ4K<NT, kT, f>(tile, tile_bytes, np, a, out, out_stride, out_tile, pf);
    } else {
      TileDot<kW, NT, kT>(tile, tile_bytes, np, a, out, out_stride, out_tile, pf);
    }
  };
  constexpr bool k8 = kTilePass<kW> == 8;  // no instances past 4 tokens where passes are of 4
  switch (nt) {
    case 1: dot(std::integral_constant<int, 1>()); break;
    case 2: dot(std::integral_constant<int, 2>()); break;
    case 3: dot(std::integral_constant<int, 3>()); break;
    case 4: dot(std::integral_constant<int, 4>()); break;
    case 5: if constexpr (k8) dot(std::integral_constant<int, 5>()); break;
    case 6: if constexpr (k8) dot(std::integral_constant<int, 6>()); break;
    case 7: if constexpr (k8) dot(std::integral_constant<int, 7>()); break;
    case 8: if constexpr (k8) dot(std::integral_constant<int, 8>()); break;
  }
}

// Rows [r0, r1) of a kTiles16 matrix. The block-32 types take two whole tiles at a time, and
// each activation broadcast feeds both tiles (4 tokens in cache: q4_0 +17%); q4_K and q5_K take
// pairs for 2 or more tokens (4 tokens in cache: +20-25%); for one token they, and q6_K always,
// go one tile at a time. A pair is tile i and tile i + h of the range's n whole tiles (h = n / 2),
// so each of its two weight streams runs through half the range in order. Session 12 paired
// neighbours (i, i + 1), two streams of one tile each (9 KiB for 1024 inputs of q4_0) that jump
// a tile at every pair: faster than one stream on the Zen 5 host then (a q4_0 matrix from memory
// 0.7 -> 0.93 of the bandwidth probe), but on a Zen 4 host (session 18, one thread from memory)
// half as fast as one tile at a time, which the long streams match or beat (1 token 29-35 GB/s,
// neighbours 15-16; 4 tokens 19-20 GB/s against 11-12). A row's result is the same in any pair.
template <DType kW>
HWY_INLINE void MatMulTiles(const uint8_t* W, int64_t n_in, int64_t r0, int64_t r1,
                            const uint8_t* xa, size_t xa_stride, int64_t n_tok, float* y,
                            int64_t y_stride) {
  constexpr bool kK = TileK32(kW) || TileK16(kW);  // super-blocks of 256
  using TF = TileFormat<kW>;
  const int64_t np = kK ? n_in / kQK_K : n_in / 64;  // super-blocks, or pairs of blocks
  const size_t tile_bytes = 16 * RowBytes(kW, n_in);  // a tile is its 16 rows' bytes
  // The whole tiles [a, b) (rows a 16 .. b 16), in pairs (a + i, a + i + h), i < h, then tile a + 2h
  // when n is odd; the tiles r0 or r1 cut, alone.
  const int64_t a = (r0 + 15) / 16, b = r1 / 16;
  const bool pairs = !TileK16(kW) && (!TileK32(kW) || n_tok > 1);
  const int64_t h = pairs && b > a ? (b - a) / 2 : 0;
  const size_t dist = static_cast<size_t>(h) * tile_bytes;
  // The kernels prefetch each stream kMmPrefetchBytes ahead of where they read: the start of
  // the first streams is asked for here, before the activations are prepared, so a row range
  // does not begin with a run of demand misses (prefetches past the range or the matrix are
  // harmless: they never fault). With several passes the later tiles are prefetched a whole tile
  // ahead (MmTilePrefetch), so the first ones are asked for whole.
  constexpr int64_t G = kTilePass<kW>;
  const bool one_token_sw = OneTokenTilePrefetch();
  const size_t first_bytes = n_tok > G ? tile_bytes : kMmPrefetchBytes;
  const uint8_t* first = W + static_cast<size_t>(h ? a : r0 / 16) * tile_bytes;
  for (size_t o = 0; o < first_bytes; o += 64) {
    hwy::Prefetch(first + o);
    if (h) hwy::Prefetch(first + dist + o);
  }
  const MmAct* acts =
      kK ? PrepareActs(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, n_in, xa, xa_stride, n_tok)
         : PrepareActs(MmPrepSpec{MmPrep::kQ8_0, MmLayout::kNatural, true, TF::kOffset, true}, n_in, xa,
                       xa_stride, n_tok);
  if constexpr (!TileK16(kW)) {
    for (int64_t i = a; i < a + h; ++i) {  // pairs: straight into y
      const uint8_t* tile = W + static_cast<size_t>(i) * tile_bytes;
      for (int64_t k0 = 0; k0 < n_tok; k0 += G) {  // passes over tiles that stay in cache
        const int64_t nt = std::min<int64_t>(G, n_tok - k0);
        TileGroup<kW, 2>(tile, dist, np, acts + k0, nt, y + k0 * y_stride + (16 * i - r0), y_stride, 16 * h,
                         MmTilePrefetch{tile + tile_bytes, n_tok, k0, nt, one_token_sw});
      }
    }
  }
  // The tiles left: a + 2h .. b (none, or the odd one), and those r0 or r1 cut.
  for (int64_t t0 = r0 / 16 * 16; t0 < r1; t0 += 16) {
    if (t0 / 16 >= a && t0 / 16 < a + 2 * h) continue;
    const uint8_t* tile = W + static_cast<size_t>(t0 / 16) * tile_bytes;
    const int64_t lo = std::max(t0, r0), hi = std::min(t0 + 16, r1);
    // A whole tile's results go straight to y; a tile that r0 or r1 cuts goes through tmp.
    const bool whole = lo == t0 && hi == t0 + 16;
    for (int64_t k0 = 0; k0 < n_tok; k0 += G) {
      HWY_ALIGN float tmp[G][16];
      const int64_t nt = std::min<int64_t>(G, n_tok - k0);
      TileGroup<kW, 1>(tile, tile_bytes, np, acts + k0, nt, whole ? y + k0 * y_stride + (t0 - r0) : tmp[0],
                       whole ? y_stride : 16, 16, MmTilePrefetch{tile + tile_bytes, n_tok, k0, nt, one_token_sw});
      if (!whole) {
        for (int64_t t = 0; t < nt; ++t) {
          std::memcpy(y + (k0 + t) * y_stride + (lo - r0), tmp[t] + (lo - t0),
                      static_cast<size_t>(hi - lo) * sizeof(float));
        }
      }
    }
  }
}
#endif  // MOE_VNNI

// Per-target body of kernels::RepackLayout.
HWY_NOINLINE inline WeightLayout RepackLayout(DType w, int64_t n_in, int64_t rows) {
#if MOE_VNNI
  const bool k = TileK32(w) || TileK16(w);
  const int64_t step = k ? kQK_K : 64;  // whole super-blocks / pairs of blocks
  if ((w == DType::kQ8_0 || w == DType::kQ4_0 || k) && n_in > 0 &&
      n_in % step == 0 && rows > 0 && rows % 16 == 0) {
    return WeightLayout::kTiles16;
  }
#endif
  (void)w;
  (void)n_in;
  (void)rows;
  return WeightLayout::kRows;
}

template <typename T>
HWY_INLINE void MatMulFloat(const uint8_t* W, int64_t n_in, int64_t r0, int64_t r1,
                            const MmAct* acts, int64_t n_tok, float* y, int64_t y_stride) {
  MmLoop(W, static_cast<size_t>(n_in) * sizeof(T), r0, r1, acts, n_tok, y, y_stride,
         [n_in](int64_t nt, const uint8_t* w, int64_t n_rows, size_t row_bytes, const MmAct* a,
                float* out, int64_t stride) {
           const auto rows = [&](auto nt_const) {
             for (int64_t r = 0; r < n_rows; ++r) {
               FloatRowDot<decltype(nt_const)::value, T>(w + static_cast<size_t>(r) * row_bytes,
                                                         n_in, a, out + r, stride);
             }
           };
           switch (nt) {
             case 1: rows(std::integral_constant<int, 1>()); break;
             case 2: rows(std::integral_constant<int, 2>()); break;
             case 3: rows(std::integral_constant<int, 3>()); break;
             default: rows(std::integral_constant<int, 4>()); break;
           }
         });
}

// Per-target body of kernels::MatMul (same contract). Unsupported weight types write nothing.
// inline: this header is also compiled into the test binary.
HWY_NOINLINE inline void MatMul(DType w, const void* W, int64_t n_in, int64_t r0, int64_t r1,
                         const void* xa, size_t xa_stride, int64_t n_tok, float* y,
                         int64_t y_stride, WeightLayout layout = WeightLayout::kRows) {
  if (r1 <= r0 || n_tok <= 0) return;
  const uint8_t* wb = static_cast<const uint8_t*>(W);
  const uint8_t* xb = static_cast<const uint8_t*>(xa);
  if (layout != WeightLayout::kRows) {  // only what RepackLayout gives on this target
#if MOE_VNNI
    if (layout == WeightLayout::kTiles16) {
      switch (w) {
        case DType::kQ8_0: MatMulTiles<DType::kQ8_0>(wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
        case DType::kQ4_0: MatMulTiles<DType::kQ4_0>(wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
        case DType::kQ2_K: MatMulTiles<DType::kQ2_K>(wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
        case DType::kQ3_K: MatMulTiles<DType::kQ3_K>(wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
        case DType::kQ4_K: MatMulTiles<DType::kQ4_K>(wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
        case DType::kQ5_K: MatMulTiles<DType::kQ5_K>(wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
        case DType::kIQ4_XS: MatMulTiles<DType::kIQ4_XS>(wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
        case DType::kQ6_K: MatMulTiles<DType::kQ6_K>(wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
        default: break;
      }
    }
#endif
    return;
  }
  switch (w) {
    case DType::kF32:
      MatMulFloat<float>(
          wb, n_in, r0, r1,
          PrepareActs(MmPrepSpec{MmPrep::kF32, MmLayout::kNatural, false, 0}, n_in, xb, xa_stride, n_tok), n_tok, y,
          y_stride);
      break;
    case DType::kF16:
      MatMulFloat<hwy::float16_t>(
          wb, n_in, r0, r1,
          PrepareActs(MmPrepSpec{MmPrep::kF16, MmLayout::kNatural, false, 0}, n_in, xb, xa_stride, n_tok), n_tok, y,
          y_stride);
      break;
    case DType::kBF16:
      MatMulFloat<hwy::bfloat16_t>(
          wb, n_in, r0, r1,
          PrepareActs(MmPrepSpec{MmPrep::kBF16, MmLayout::kNatural, false, 0}, n_in, xb, xa_stride, n_tok), n_tok, y,
          y_stride);
      break;
#if MOE_VNNI
    case DType::kQ8_0: MatMulVnni32<KernQ8_0>(MmPrep::kQ8_0, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kQ4_0: MatMulVnni32<KernQ4_0>(MmPrep::kQ8_0, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kQ4_1: MatMulVnni32<KernQ4_1>(MmPrep::kQ8_1, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kQ5_0: MatMulVnni32<KernQ5_0>(MmPrep::kQ8_0, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kQ5_1: MatMulVnni32<KernQ5_1>(MmPrep::kQ8_1, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kIQ4_NL: MatMulVnni32<KernIQ4_NL>(MmPrep::kQ8_0, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kMXFP4: MatMulVnni32<KernMXFP4>(MmPrep::kQ8_0, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kIQ2_XXS:
      MatMulInt<KernIQ2_XXS, MmRowKVnni>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, wb,
                                         n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ3_XXS:
      MatMulInt<KernIQ3_XXS, MmRowKVnni>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, wb,
                                         n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ3_S:
      MatMulInt<KernIQ3_S, MmRowKVnni>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, wb,
                                       n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ2_S:
      MatMulInt<KernIQ2_S, MmRowKVnni>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, wb,
                                n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ1_S:
      MatMulInt<KernIQ1_S, MmRowKVnni>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, wb,
                                       n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ1_M:
      MatMulInt<KernIQ1_M, MmRowKVnni>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, wb,
                                       n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ2_XS:
      MatMulInt<KernIQ2_XS, MmRowKVnni>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, wb,
                                n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ4_XS:
      MatMulInt<KernIQ4_XS, MmRowKVnni>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, wb,
                                        n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kQ2_K:
      MatMulInt<KernQ2_K, MmRowKVnni>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, wb,
                                      n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kQ3_K:
      MatMulInt<KernQ3_K, MmRowKVnni>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, wb,
                                      n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kQ4_K:
      MatMulInt<KernQ4_K, MmRowKVnni>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, wb,
                                      n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kQ5_K:
      MatMulInt<KernQ5_K, MmRowKVnni>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, wb,
                                      n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kQ6_K:
      MatMulInt<KernQ6_K, MmRowKVnni>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, true, 0}, wb,
                                      n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
#else
    case DType::kQ8_0: MatMulInt32<KernQ8_0>(MmPrep::kQ8_0, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kQ4_0: MatMulInt32<KernQ4_0>(MmPrep::kQ8_0, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kQ4_1: MatMulInt32<KernQ4_1>(MmPrep::kQ8_1, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kQ5_0: MatMulInt32<KernQ5_0>(MmPrep::kQ8_0, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kQ5_1: MatMulInt32<KernQ5_1>(MmPrep::kQ8_1, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kIQ4_NL: MatMulInt32<KernIQ4_NL>(MmPrep::kQ8_0, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kMXFP4: MatMulInt32<KernMXFP4>(MmPrep::kQ8_0, wb, n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride); break;
    case DType::kIQ2_XXS:
      MatMulInt<KernIQ2_XXS, MmRowK>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, false, 0}, wb,
                                     n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ3_XXS:
      MatMulInt<KernIQ3_XXS, MmRowK>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, false, 0}, wb,
                                     n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ3_S:
      MatMulInt<KernIQ3_S, MmRowK>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, false, 0}, wb,
                                   n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ2_S:
      MatMulInt<KernIQ2_S, MmRowK>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, false, 0}, wb,
                            n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ1_S:
      MatMulInt<KernIQ1_S, MmRowK>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, false, 0}, wb,
                                   n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ1_M:
      MatMulInt<KernIQ1_M, MmRowK>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, false, 0}, wb,
                                   n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ2_XS:
      MatMulInt<KernIQ2_XS, MmRowK>(MmPrepSpec{MmPrep::kQ8_K, MmLayout::kNatural, false, 0}, wb,
                            n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kIQ4_XS:
      MatMulInt<KernIQ4_XS, MmRowK>(MmPrepSpec{MmPrep::kQ8_K, KernIQ4_XS::kLayout, false, 0}, wb,
                                    n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kQ2_K:
      MatMulInt<KernQ2_K, MmRowK>(MmPrepSpec{MmPrep::kQ8_K, KernQ2_K::kLayout, false, 0}, wb,
                                  n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kQ3_K:
      MatMulInt<KernQ3_K, MmRowK>(MmPrepSpec{MmPrep::kQ8_K, KernQ3_K::kLayout, false, 0}, wb,
                                  n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kQ4_K:
      MatMulInt<KernQ4_K, MmRowK>(MmPrepSpec{MmPrep::kQ8_K, KernQ4_K::kLayout, false, 0}, wb,
                                  n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kQ5_K:
      MatMulInt<KernQ5_K, MmRowK>(MmPrepSpec{MmPrep::kQ8_K, KernQ5_K::kLayout, false, 0}, wb,
                                  n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
    case DType::kQ6_K:
      MatMulInt<KernQ6_K, MmRowK>(MmPrepSpec{MmPrep::kQ8_K, KernQ6_K::kLayout, false, 0}, wb,
                                  n_in, r0, r1, xb, xa_stride, n_tok, y, y_stride);
      break;
#endif
    default:
      break;
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace moe::kernels
HWY_AFTER_NAMESPACE();

#endif  // MOE_KERNELS_MATMUL_INL_H_
