// Dispatched entry point for MatMul (kernels.h): one dispatch per call, which covers a row
// range and a group of tokens; the per-target body is in matmul-inl.h.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/matmul.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kernels/matmul-inl.h"

#if HWY_ONCE
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

#include <atomic>

#include "kernels/kernels.h"
#include "util/error.h"

namespace moe::kernels {

HWY_EXPORT(MatMul);

namespace {
std::atomic<bool> g_batch_invariant{false};
}  // namespace
void SetBatchInvariant(bool on) { g_batch_invariant.store(on, std::memory_order_relaxed); }
bool BatchInvariant() { return g_batch_invariant.load(std::memory_order_relaxed); }

bool OneTokenTilePrefetch() {
  static const bool on = [] {
    if (const char* e = std::getenv("MOE_TILE_PREFETCH"); e && *e) return std::strcmp(e, "0") != 0;
#if defined(__x86_64__) || defined(__i386__)
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid(0, &a, &b, &c, &d)) {
      char vendor[13] = {};
      std::memcpy(vendor, &b, 4);
      std::memcpy(vendor + 4, &d, 4);
      std::memcpy(vendor + 8, &c, 4);
      if (std::strcmp(vendor, "AuthenticAMD") == 0 && __get_cpuid(1, &a, &b, &c, &d)) {
        const unsigned base = (a >> 8) & 0xF, family = base == 0xF ? base + ((a >> 20) & 0xFF) : base;
        if (family == 0x19) return false;  // Zen 3 and 4 (only Zen 4 has the AVX-512 tile kernels)
      }
    }
#endif
    return true;
  }();
  return on;
}
HWY_EXPORT(RepackLayout);

void MatMul(DType w, const void* W, int64_t n_in, int64_t r0, int64_t r1, const void* xa,
            size_t xa_stride, int64_t n_tok, float* y, int64_t y_stride, WeightLayout layout) {
  HWY_DYNAMIC_DISPATCH(MatMul)(w, W, n_in, r0, r1, xa, xa_stride, n_tok, y, y_stride, layout);
}

WeightLayout RepackLayout(DType w, int64_t n_in, int64_t rows) {
  return HWY_DYNAMIC_DISPATCH(RepackLayout)(w, n_in, rows);
}

namespace {

// Word-wide helpers (the repacking runs at every load: a byte loop cost seconds per GB).
uint32_t Word(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
void PutWord(uint8_t* p, uint32_t v) { std::memcpy(p, &v, sizeof(v)); }
constexpr uint32_t kLowNibbles = 0x0F0F0F0Fu;

// Lane r of a 4-vector group (64 bytes each): the nibbles of quants 8j+i (low) and 8j+4+i (high)
// of row r's 32 quants q (0..15), at g[64 j + 4 r + i].
void PutNibbleGroup(const uint8_t* q, int r, uint8_t* g) {
  for (int j = 0; j < 4; ++j) {
    for (int i = 0; i < 4; ++i) g[64 * j + 4 * r + i] = static_cast<uint8_t>(q[8 * j + i] | q[8 * j + 4 + i] << 4);
  }
}

// The same for 32 quants stored as nibble `half` (0 low, 1 high) of the 32 bytes at qs (q4_K),
// four bytes at a time.
void PutNibbleGroupK(const uint8_t* qs, int half, int r, uint8_t* g) {
  for (int j = 0; j < 4; ++j) {
    const uint32_t a = Word(qs + 8 * j), b = Word(qs + 8 * j + 4);
    PutWord(g + 64 * j + 4 * r, half ? ((a >> 4) & kLowNibbles) | (b & ~kLowNibbles)
                                     : (a & kLowNibbles) | ((b & kLowNibbles) << 4));
  }
}

// q4_K and q5_K tiles (TileDotQ4K in matmul-inl.h). q5_K adds each quant's fifth bit as byte-lane
// masks: for sub-block j and vector v, 8 bytes whose bit 4r + i is that of quant 8v + i of row r
// (the low nibbles' lanes), then 8 for quant 8v + 4 + i (the high nibbles').
template <typename Block>
void RepackScaleMinKTiles(const Block* in, uint8_t* out, int64_t nb, int64_t rows) {
  constexpr bool kQ5 = sizeof(Block) == sizeof(BlockQ5_K);
  for (int64_t t0 = 0; t0 < rows; t0 += 16) {
    for (int64_t b = 0; b < nb; ++b, out += 16 * sizeof(Block)) {
      uint64_t masks[8][4][2] = {};
      for (int r = 0; r < 16; ++r) {
        const Block& blk = in[static_cast<size_t>(t0 + r) * nb + b];
        std::memcpy(out + 2 * r, &blk.d, 2);
        std::memcpy(out + 32 + 2 * r, &blk.dmin, 2);
        for (int i = 0; i < 12; ++i) out[64 + 16 * i + r] = blk.scales[i];
        for (int j = 0; j < 8; ++j) {  // sub-block j: nibble j % 2 of qs[32 (j / 2) ..]
          PutNibbleGroupK(blk.qs + 32 * (j / 2), j % 2, r, out + 256 + 256 * j);
        }
        if constexpr (kQ5) {
          for (int v = 0; v < 4; ++v) {
            uint64_t qh;  // the fifth bits of quants 8v .. 8v + 7: bit j of byte k is sub-block j's
            std::memcpy(&qh, blk.qh + 8 * v, 8);
            for (int j = 0; j < 8; ++j) {
              // Bit j of each byte gathered into one byte (byte k -> bit k).
              const uint64_t g = (((qh >> j) & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56;
              masks[j][v][0] |= (g & 0xF) << (4 * r);
              masks[j][v][1] |= (g >> 4) << (4 * r);
            }
          }
        }
      }
      if constexpr (kQ5) std::memcpy(out + 16 * sizeof(BlockQ4_K), masks, sizeof(masks));
    }
  }
}

// iq4_xs tiles (TileDotQ4K in matmul-inl.h).
void RepackIQ4XSTiles(const BlockIQ4_XS* in, uint8_t* out, int64_t nb, int64_t rows) {
  for (int64_t t0 = 0; t0 < rows; t0 += 16) {
    for (int64_t b = 0; b < nb; ++b, out += 16 * sizeof(BlockIQ4_XS)) {
      for (int r = 0; r < 16; ++r) {
        const BlockIQ4_XS& blk = in[static_cast<size_t>(t0 + r) * nb + b];
        std::memcpy(out + 2 * r, &blk.d, 2);
        std::memcpy(out + 32 + 2 * r, &blk.scales_h, 2);
        for (int i = 0; i < 4; ++i) out[64 + 16 * i + r] = blk.scales_l[i];
        for (int j = 0; j < 8; ++j) {  // sub-block j: qs[16j + l] = q_l | q_(l+16) << 4
          uint8_t q[32];
          for (int l = 0; l < 16; ++l) {
            q[l] = blk.qs[16 * j + l] & 0xF;
            q[l + 16] = blk.qs[16 * j + l] >> 4;
          }
          PutNibbleGroup(q, r, out + 128 + 256 * j);
        }
      }
    }
  }
}

// The packing of q6_K's top bits and q3_K's low bits: lane r's byte i of vector v holds the
// 2-bit values of quants 16 v + 4 s + i (of the 32 at L, each below 4) at bits 2 s.
void PutCrumbGroup(const uint8_t* L, int r, uint8_t* g) {
  for (int v = 0; v < 2; ++v) {
    for (int i = 0; i < 4; ++i) {
      uint8_t hb = 0;
      for (int sft = 0; sft < 4; ++sft) hb = static_cast<uint8_t>(hb | L[16 * v + 4 * sft + i] << (2 * sft));
      g[64 * v + 4 * r + i] = hb;
    }
  }
}

// The 2-bit quants of q2_K and the low bits of q3_K: element 128h + 32k + l at bits 2k of
// qs[32h + l].
void Crumbs(const uint8_t* qs, uint8_t* out) {
  for (int e = 0; e < kQK_K; ++e) out[e] = (qs[32 * (e / 128) + e % 32] >> (2 * ((e % 128) / 32))) & 3;
}

// q2_K tiles (TileQ2K in matmul-inl.h).
void RepackQ2KTiles(const BlockQ2_K* in, uint8_t* out, int64_t nb, int64_t rows) {
  for (int64_t t0 = 0; t0 < rows; t0 += 16) {
    for (int64_t b = 0; b < nb; ++b, out += 16 * sizeof(BlockQ2_K)) {
      for (int r = 0; r < 16; ++r) {
        const BlockQ2_K& blk = in[static_cast<size_t>(t0 + r) * nb + b];
        uint8_t q[kQK_K];
        Crumbs(blk.qs, q);
        for (int c = 0; c < 8; ++c) PutCrumbGroup(q + 32 * c, r, out + 128 * c);
        for (int j = 0; j < 16; ++j) out[1024 + 16 * j + r] = blk.scales[j];
        std::memcpy(out + 1280 + 2 * r, &blk.d, 2);
        std::memcpy(out + 1312 + 2 * r, &blk.dmin, 2);
      }
    }
  }
}

// q3_K tiles (TileQ3K in matmul-inl.h).
void RepackQ3KTiles(const BlockQ3_K* in, uint8_t* out, int64_t nb, int64_t rows) {
  for (int64_t t0 = 0; t0 < rows; t0 += 16) {
    for (int64_t b = 0; b < nb; ++b, out += 16 * sizeof(BlockQ3_K)) {
      uint64_t masks[8][8] = {};  // [chunk][group]
      for (int r = 0; r < 16; ++r) {
        const BlockQ3_K& blk = in[static_cast<size_t>(t0 + r) * nb + b];
        uint8_t low[kQK_K];  // element e's 2 low bits
        Crumbs(blk.qs, low);
        for (int c = 0; c < 8; ++c) {
          PutCrumbGroup(low + 32 * c, r, out + 128 * c);
          for (int k = 0; k < 8; ++k) {
            for (int i = 0; i < 4; ++i) {
              const int e = 32 * c + 4 * k + i;  // third bit: bit e / 32 of hmask[e % 32]
              masks[c][k] |= static_cast<uint64_t>((blk.hmask[e % 32] >> (e / 32)) & 1) << (4 * r + i);
            }
          }
        }
        for (int i = 0; i < 12; ++i) out[1536 + 16 * i + r] = blk.scales[i];
        std::memcpy(out + 1728 + 2 * r, &blk.d, 2);
      }
      std::memcpy(out + 1024, masks, sizeof(masks));
    }
  }
}

// q6_K tiles (TileQ6K in matmul-inl.h).
void RepackQ6KTiles(const BlockQ6_K* in, uint8_t* out, int64_t nb, int64_t rows) {
  for (int64_t t0 = 0; t0 < rows; t0 += 16) {
    for (int64_t b = 0; b < nb; ++b, out += 16 * sizeof(BlockQ6_K)) {
      for (int r = 0; r < 16; ++r) {
        const BlockQ6_K& blk = in[static_cast<size_t>(t0 + r) * nb + b];
        uint8_t L[kQK_K];  // levels q + 32 (ref::PackQ6KQuants's inverse)
        for (int h = 0; h < 2; ++h) {
          for (int l = 0; l < 32; ++l) {
            const uint8_t a = blk.ql[64 * h + l], c = blk.ql[64 * h + l + 32], q = blk.qh[32 * h + l];
            L[128 * h + l] = static_cast<uint8_t>((a & 0xF) | (q & 3) << 4);
            L[128 * h + l + 32] = static_cast<uint8_t>((c & 0xF) | ((q >> 2) & 3) << 4);
            L[128 * h + l + 64] = static_cast<uint8_t>((a >> 4) | ((q >> 4) & 3) << 4);
            L[128 * h + l + 96] = static_cast<uint8_t>((c >> 4) | ((q >> 6) & 3) << 4);
          }
        }
        for (int c = 0; c < 8; ++c) {
          uint8_t q[32];
          for (int l = 0; l < 32; ++l) q[l] = L[32 * c + l] & 0xF;
          PutNibbleGroup(q, r, out + 416 * c);
          uint8_t top[32];
          for (int l = 0; l < 32; ++l) top[l] = L[32 * c + l] >> 4;
          PutCrumbGroup(top, r, out + 416 * c + 256);
        }
        for (int j = 0; j < 16; ++j) out[416 * (j / 2) + 384 + 16 * (j % 2) + r] = static_cast<uint8_t>(blk.scales[j]);
        std::memcpy(out + 3328 + 2 * r, &blk.d, 2);
      }
    }
  }
}

// A super-block type's repacker over the file's blocks (n_in / 256 per row).
template <typename Block>
void RepackBlocks(void (*repack)(const Block*, uint8_t*, int64_t, int64_t), const void* src, void* dst, int64_t n_in,
                  int64_t rows) {
  repack(static_cast<const Block*>(src), static_cast<uint8_t*>(dst), n_in / kQK_K, rows);
}

}  // namespace

// The tile layout of MatMulTiles (matmul-inl.h).
void Repack(DType w, WeightLayout layout, const void* src, void* dst, int64_t n_in, int64_t rows) {
  if (layout == WeightLayout::kRows) {
    std::memcpy(dst, src, RowBytes(w, n_in) * static_cast<size_t>(rows));
    return;
  }
  const bool k = Traits(w).block_size == kQK_K;  // (every super-block type below)
  if (layout != WeightLayout::kTiles16 || n_in % (k ? kQK_K : 64) != 0 || rows % 16 != 0) {
    throw Error("no tile layout for this matrix");  // RepackLayout never gives one
  }
  switch (w) {
    case DType::kQ2_K: return RepackBlocks(RepackQ2KTiles, src, dst, n_in, rows);
    case DType::kQ3_K: return RepackBlocks(RepackQ3KTiles, src, dst, n_in, rows);
    case DType::kQ4_K: return RepackBlocks(RepackScaleMinKTiles<BlockQ4_K>, src, dst, n_in, rows);
    case DType::kQ5_K: return RepackBlocks(RepackScaleMinKTiles<BlockQ5_K>, src, dst, n_in, rows);
    case DType::kIQ4_XS: return RepackBlocks(RepackIQ4XSTiles, src, dst, n_in, rows);
    case DType::kQ6_K: return RepackBlocks(RepackQ6KTiles, src, dst, n_in, rows);
    case DType::kQ8_0:
    case DType::kQ4_0: break;  // below
    default: throw Error("no tile layout for this matrix");
  }
  const bool q4 = w == DType::kQ4_0;
  const size_t bb = Traits(w).block_bytes, block_tile = q4 ? 256 : 512;
  const auto* in = static_cast<const uint8_t*>(src);
  auto* dst_bytes = static_cast<uint8_t*>(dst);
  const int64_t nb = n_in / kQK8_0;
  const size_t pair = 64 + 2 * block_tile;
  alignas(64) uint8_t out[64 + 2 * 512];  // one pair, built here and copied out whole
  for (int64_t t0 = 0; t0 < rows; t0 += 16) {
    for (int64_t p = 0; p < nb / 2; ++p, dst_bytes += pair) {
      for (int h = 0; h < 2; ++h) {
        uint8_t* g = out + 64 + block_tile * h;
        for (int r = 0; r < 16; ++r) {
          const uint8_t* blk = in + (static_cast<size_t>(t0 + r) * nb + 2 * p + h) * bb;
          std::memcpy(out + 32 * h + 2 * r, blk, 2);  // d (the first field of both)
          const uint8_t* qs = blk + 2;
          if (q4) {  // qs[k] = q_k | q_(k+16) << 4: vectors 0, 1 the low nibbles, 2, 3 the high
            for (int j = 0; j < 2; ++j) {
              const uint32_t a = Word(qs + 8 * j), b = Word(qs + 8 * j + 4);
              PutWord(g + 64 * j + 4 * r, (a & kLowNibbles) | ((b & kLowNibbles) << 4));
              PutWord(g + 64 * (j + 2) + 4 * r, ((a >> 4) & kLowNibbles) | (b & ~kLowNibbles));
            }
          } else {  // vector k: quants 4k..4k+3 plus 128
            for (int k = 0; k < 8; ++k) PutWord(g + 64 * k + 4 * r, Word(qs + 4 * k) ^ 0x80808080u);
          }
        }
      }
      std::memcpy(dst_bytes, out, pair);
    }
  }
}

}  // namespace moe::kernels
#endif  // HWY_ONCE
