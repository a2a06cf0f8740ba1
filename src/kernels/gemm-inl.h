// Per-target FP32 GEMM (Highway). Included once per target by gemm.cc (through
// foreach_target.h) and by tests/kernels/gemm_test.cc, which calls the per-target Gemm
// directly so every compiled target is tested. Contract and numerics: gemm.h. (Code inside
// moe::kernels calling the per-target Gemm must qualify it as HWY_NAMESPACE::Gemm: the GemmOp
// argument makes argument-dependent lookup find the dispatched moe::kernels::Gemm as well.)
//
// Structure (the classic packed GEMM): C is computed in register tiles of kGemmMR rows x NR = 2
// vectors of columns. For each block of n (NC columns) and of k (KC), the B block is packed into
// panels [KC][NR] contiguous along k (zero-padded to NR columns); for each block of m (MC rows)
// the A block is packed into panels [KC][kGemmMR] (zero-padded to kGemmMR rows). The micro-kernel
// walks one A panel and one B panel over the KC block, broadcasting A and FMA-ing into 2*kGemmMR
// accumulators, which start from C (or 0 on the first k block when not accumulating) and are stored
// back to C. The last rows of an m block (fewer than kGemmMR) run a shorter tile in place; tiles
// that stick out past n run the full micro-kernel on a scratch tile. Either way every element
// sees exactly the same FMA chain, in p order, wherever it sits.
//
// Cache use: see the block sizes below. Packing transposes the operands stored along the wrong
// axis (B for kNT, A for kNN / kNT) with 8x8 (AVX2 / AVX-512) or 4x4 transposes, and copies the
// others row by row so the source is read sequentially. Packed panels sit one cache line more
// than their size apart (GemmPanelStride).

#if defined(MOE_KERNELS_GEMM_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef MOE_KERNELS_GEMM_INL_H_
#undef MOE_KERNELS_GEMM_INL_H_
#else
#define MOE_KERNELS_GEMM_INL_H_
#endif

#include <algorithm>
#include <cstddef>
#include <cstring>

#include "hwy/aligned_allocator.h"
#include "hwy/highway.h"
#include "kernels/gemm.h"

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {
namespace hn = hwy::HWY_NAMESPACE;

// Rows per register tile: 2 * kGemmMR accumulators + 2 B vectors + 1 broadcast must fit the
// register file (32 vectors on AVX-512, NEON and SVE; 16 on AVX2).
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX3
constexpr size_t kGemmMR = 8;
#elif HWY_ARCH_X86 && HWY_TARGET == HWY_AVX2
constexpr size_t kGemmMR = 6;
#elif HWY_TARGET == HWY_SCALAR || HWY_TARGET == HWY_EMU128
constexpr size_t kGemmMR = 4;
#else
constexpr size_t kGemmMR = 8;
#endif
static_assert(kGemmMR >= 1 && kGemmMR <= 12, "GemmTile handles 1..12 rows");

// Block sizes, measured on the AVX-512 VM (48 KiB L1d, 2 MiB L2 per core; MC 128..256 and NC
// 512..1024 were within noise of each other, KC 192 no better than 256).
// k block: a B panel [KC][2N] (32 KiB on AVX-512) stays in L1 while the A panels stream by.
constexpr size_t kGemmKC = 256;
// m block: the packed A block [MC][KC] (128 KiB) stays in L2; a multiple of kGemmMR.
constexpr size_t kGemmMC = (128 + kGemmMR - 1) / kGemmMR * kGemmMR;
// n block (columns; rounded down to a multiple of 2N at run time): the packed B block
// [KC][NC] (512 KiB) stays in L2 next to the A block.
constexpr size_t kGemmNC = 512;

// Per-thread packing buffers, grown on demand and kept across calls.
HWY_INLINE float* GemmScratch(size_t floats) {
  thread_local hwy::AlignedFreeUniquePtr<float[]> buf;
  thread_local size_t cap = 0;
  if (floats > cap) {
    buf = hwy::AllocateAligned<float>(floats);
    HWY_ASSERT(buf != nullptr);  // out of memory: nothing sensible left to do in a kernel
    cap = floats;
  }
  return buf.get();
}

// The register tile macros below name accumulators c<row>0 / c<row>1 (rows 0..11); separate
// variables rather than an array because SVE/RVV vectors cannot live in arrays.
#define MOE_GEMM_FOR_ROWS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
#define MOE_GEMM_DECL(r) V c##r##0 = hn::Zero(d), c##r##1 = hn::Zero(d);
#define MOE_GEMM_LOAD(r)                     \
  if constexpr (r < MR) {                    \
    c##r##0 = hn::LoadU(d, c + r * ldc);     \
    c##r##1 = hn::LoadU(d, c + r * ldc + N); \
  }
#define MOE_GEMM_STEP(r)                     \
  if constexpr (r < MR) {                    \
    const V a##r = hn::Set(d, ap[r]);        \
    c##r##0 = hn::MulAdd(a##r, b0, c##r##0); \
    c##r##1 = hn::MulAdd(a##r, b1, c##r##1); \
  }
#define MOE_GEMM_STORE(r)                    \
  if constexpr (r < MR) {                    \
    hn::StoreU(c##r##0, d, c + r * ldc);     \
    hn::StoreU(c##r##1, d, c + r * ldc + N); \
  }

// C tile [MR][2N] (ldc) (= or +=) the first MR columns of A panel [kc][PW] * B panel [kc][2N];
// load_c: start from C. PW > MR serves the last rows of an m block straight from its packed
// panel (each element's chain is the same whatever MR is).
template <size_t MR, size_t PW, class D>
HWY_INLINE void GemmTile(D d, size_t kc, const float* HWY_RESTRICT ap, const float* HWY_RESTRICT bp,
                         float* HWY_RESTRICT c, size_t ldc, bool load_c) {
  using V = hn::Vec<D>;
  const size_t N = hn::Lanes(d);
  MOE_GEMM_FOR_ROWS(MOE_GEMM_DECL)
  if (load_c) {
    MOE_GEMM_FOR_ROWS(MOE_GEMM_LOAD)
  }
  for (size_t p = 0; p < kc; ++p) {
    const V b0 = hn::Load(d, bp);
    const V b1 = hn::Load(d, bp + N);
    MOE_GEMM_FOR_ROWS(MOE_GEMM_STEP)
    ap += PW;
    bp += 2 * N;
  }
  MOE_GEMM_FOR_ROWS(MOE_GEMM_STORE)
}

// GemmTile<rows, PW> for a run-time rows in [1, R] (R <= PW): the last rows of an m block that
// is not a multiple of the panel width, computed in place (no scratch copy of C).
template <size_t R, size_t PW, class D>
HWY_INLINE void GemmTileRows(D d, size_t rows, size_t kc, const float* HWY_RESTRICT ap,
                             const float* HWY_RESTRICT bp, float* HWY_RESTRICT c, size_t ldc,
                             bool load_c) {
  if constexpr (R > 1) {
    if (rows < R) {
      GemmTileRows<R - 1, PW>(d, rows, kc, ap, bp, c, ldc, load_c);
      return;
    }
  }
  GemmTile<R, PW>(d, kc, ap, bp, c, ldc, load_c);
}

#undef MOE_GEMM_FOR_ROWS
#undef MOE_GEMM_DECL
#undef MOE_GEMM_LOAD
#undef MOE_GEMM_STEP
#undef MOE_GEMM_STORE

// Writes rows [0, rows) of a strided block (row r at src + r * ld, kc floats each) as the first
// columns of a panel [kc][w]: dst[p * w + r] = src[r * ld + p] (rows <= w). Groups of eight
// rows (x86 AVX2 and up), then of four, go through transposes in vectors; leftover rows and p
// are copied singly.
HWY_INLINE void GemmTransposeRows(const float* HWY_RESTRICT src, size_t ld, size_t rows, size_t kc,
                                  float* HWY_RESTRICT dst, size_t w) {
  size_t r = 0;
#if HWY_TARGET != HWY_SCALAR
  const hn::FixedTag<float, 4> d4;
#if HWY_ARCH_X86 && HWY_TARGET <= HWY_AVX2
  // Groups of eight rows: 8x8 transposes in 256-bit vectors whose 128-bit halves hold rows r..r+3
  // and r+4..r+7 (loaded straight into place), so the interleaves of the 4x4 case (which work
  // per 128-bit half) yield whole 8-float output rows: half the shuffles per element and 32-byte
  // stores.
  const hn::FixedTag<float, 8> d8;
  for (; r + 8 <= rows; r += 8) {
    const float* s0 = src + r * ld;
    const float* s4 = s0 + 4 * ld;
    float* out = dst + r;
    size_t p = 0;
    for (; p + 4 <= kc; p += 4) {
      const auto v0 = hn::Combine(d8, hn::LoadU(d4, s4 + p), hn::LoadU(d4, s0 + p));
      const auto v1 = hn::Combine(d8, hn::LoadU(d4, s4 + ld + p), hn::LoadU(d4, s0 + ld + p));
      const auto v2 =
          hn::Combine(d8, hn::LoadU(d4, s4 + 2 * ld + p), hn::LoadU(d4, s0 + 2 * ld + p));
      const auto v3 =
          hn::Combine(d8, hn::LoadU(d4, s4 + 3 * ld + p), hn::LoadU(d4, s0 + 3 * ld + p));
      const auto t0 = hn::InterleaveLower(d8, v0, v2);  // per 128-bit half, as in the 4x4 case
      const auto t1 = hn::InterleaveLower(d8, v1, v3);
      const auto t2 = hn::InterleaveUpper(d8, v0, v2);
      const auto t3 = hn::InterleaveUpper(d8, v1, v3);
      hn::StoreU(hn::InterleaveLower(d8, t0, t1), d8, out + (p + 0) * w);
      hn::StoreU(hn::InterleaveUpper(d8, t0, t1), d8, out + (p + 1) * w);
      hn::StoreU(hn::InterleaveLower(d8, t2, t3), d8, out + (p + 2) * w);
      hn::StoreU(hn::InterleaveUpper(d8, t2, t3), d8, out + (p + 3) * w);
    }
    for (; p < kc; ++p) {
      for (size_t i = 0; i < 8; ++i) out[p * w + i] = s0[i * ld + p];
    }
  }
#endif
  for (; r + 4 <= rows; r += 4) {
    const float* s0 = src + r * ld;
    const float* s1 = s0 + ld;
    const float* s2 = s1 + ld;
    const float* s3 = s2 + ld;
    float* out = dst + r;
    size_t p = 0;
    for (; p + 4 <= kc; p += 4) {
      const auto v0 = hn::LoadU(d4, s0 + p), v1 = hn::LoadU(d4, s1 + p);
      const auto v2 = hn::LoadU(d4, s2 + p), v3 = hn::LoadU(d4, s3 + p);
      const auto t0 = hn::InterleaveLower(d4, v0, v2);  // v0[0] v2[0] v0[1] v2[1]
      const auto t1 = hn::InterleaveLower(d4, v1, v3);
      const auto t2 = hn::InterleaveUpper(d4, v0, v2);  // v0[2] v2[2] v0[3] v2[3]
      const auto t3 = hn::InterleaveUpper(d4, v1, v3);
      hn::StoreU(hn::InterleaveLower(d4, t0, t1), d4, out + (p + 0) * w);
      hn::StoreU(hn::InterleaveUpper(d4, t0, t1), d4, out + (p + 1) * w);
      hn::StoreU(hn::InterleaveLower(d4, t2, t3), d4, out + (p + 2) * w);
      hn::StoreU(hn::InterleaveUpper(d4, t2, t3), d4, out + (p + 3) * w);
    }
    for (; p < kc; ++p) {
      out[p * w + 0] = s0[p];
      out[p * w + 1] = s1[p];
      out[p * w + 2] = s2[p];
      out[p * w + 3] = s3[p];
    }
  }
#endif
  for (; r < rows; ++r) {
    const float* s = src + r * ld;
    for (size_t p = 0; p < kc; ++p) dst[p * w + r] = s[p];
  }
}

// Zeroes columns [col, w) of a panel [kc][w].
HWY_INLINE void GemmZeroCols(size_t kc, float* HWY_RESTRICT dst, size_t w, size_t col) {
  if (col >= w) return;
  for (size_t p = 0; p < kc; ++p) std::memset(dst + p * w + col, 0, (w - col) * sizeof(float));
}

// Floats from one packed panel [kc][w] to the next: one cache line (HWY_ALIGNMENT, 64 bytes, so
// B panels stay aligned for Load) more than the panel, so that panels are not a multiple of
// 4 KiB apart: the row-by-row packing below writes all panels at once, and same-offset streams
// would fight over one L1 set (measured: kTN 3-5% faster).
HWY_INLINE size_t GemmPanelStride(size_t kc, size_t w) {
  return kc * w + HWY_ALIGNMENT / sizeof(float);
}

// Copies rows [p0, p0 + kc) x columns [j0, j0 + len) of a row-major [k][*] matrix into
// panels [kc][w] GemmPanelStride(kc, w) apart (panel q holds columns [q * w, q * w + w),
// zero-padded); copy_w(from, to) copies w floats.
// Walks the source row by row so the reads are sequential (a panel's column strip alone would
// touch a new page per row, which the hardware prefetchers do not follow).
template <class CopyW>
HWY_INLINE void GemmCopyRows(const float* HWY_RESTRICT src, size_t ld, size_t p0, size_t kc,
                             size_t j0, size_t len, size_t w, float* HWY_RESTRICT dst,
                             const CopyW& copy_w) {
  const size_t full = len / w * w;
  const size_t panel = GemmPanelStride(kc, w);
  for (size_t p = 0; p < kc; ++p) {
    const float* row = src + (p0 + p) * ld + j0;
    float* out = dst + p * w;
    size_t j = 0;
    for (; j < full; j += w, out += panel) copy_w(row + j, out);
    if (j < len) {
      std::memcpy(out, row + j, (len - j) * sizeof(float));
      std::memset(out + (len - j), 0, (w - (len - j)) * sizeof(float));
    }
  }
}

// Packs B columns [j0, j0 + nc) x k range [p0, p0 + kc) into panels [kc][nr],
// GemmPanelStride apart, columns past nc zeroed. trans_b: B is [n][k] (kNT); else B is [k][n].
template <class D>
HWY_INLINE void GemmPackB(D d, bool trans_b, const float* HWY_RESTRICT b, size_t ldb, size_t p0,
                          size_t kc, size_t j0, size_t nc, float* HWY_RESTRICT dst) {
  const size_t N = hn::Lanes(d);
  const size_t nr = 2 * N;
  if (!trans_b) {
    GemmCopyRows(b, ldb, p0, kc, j0, nc, nr, dst, [d, N](const float* from, float* to) {
      hn::Store(hn::LoadU(d, from), d, to);
      hn::Store(hn::LoadU(d, from + N), d, to + N);
    });
    return;
  }
  for (size_t jp = 0; jp < nc; jp += nr, dst += GemmPanelStride(kc, nr)) {
    const size_t w = std::min(nr, nc - jp);
    GemmTransposeRows(b + (j0 + jp) * ldb + p0, ldb, w, kc, dst, nr);
    GemmZeroCols(kc, dst, nr, w);
  }
}

// Packs A rows [i0, i0 + mc) x k range [p0, p0 + kc) into panels [kc][MR], GemmPanelStride
// apart, rows past mc zeroed. trans_a: A is [k][m] (kTN); else A is [m][k].
template <size_t MR>
HWY_INLINE void GemmPackA(bool trans_a, const float* HWY_RESTRICT a, size_t lda, size_t p0,
                          size_t kc, size_t i0, size_t mc, float* HWY_RESTRICT dst) {
  if (trans_a) {
    GemmCopyRows(a, lda, p0, kc, i0, mc, MR, dst,
                 [](const float* from, float* to) { std::memcpy(to, from, MR * sizeof(float)); });
    return;
  }
  for (size_t ip = 0; ip < mc; ip += MR, dst += GemmPanelStride(kc, MR)) {
    const size_t h = std::min(MR, mc - ip);
    GemmTransposeRows(a + (i0 + ip) * lda + p0, lda, h, kc, dst, MR);
    GemmZeroCols(kc, dst, MR, h);
  }
}

HWY_NOINLINE inline void Gemm(GemmOp op, int m, int n, int k, const float* HWY_RESTRICT a, int lda,
                              const float* HWY_RESTRICT b, int ldb, float* HWY_RESTRICT c, int ldc,
                              bool accumulate) {
  if (m <= 0 || n <= 0) return;
  const size_t M = static_cast<size_t>(m), Nn = static_cast<size_t>(n);
  const size_t LDC = static_cast<size_t>(ldc);
  if (k <= 0) {
    if (!accumulate) {
      for (size_t i = 0; i < M; ++i) std::memset(c + i * LDC, 0, Nn * sizeof(float));
    }
    return;
  }
  const size_t K = static_cast<size_t>(k);
  const size_t LDA = static_cast<size_t>(lda), LDB = static_cast<size_t>(ldb);
  constexpr size_t MR = kGemmMR;
  const hn::ScalableTag<float> d;
  const size_t N = hn::Lanes(d);
  const size_t NR = 2 * N;
  const size_t NC = std::max(NR, kGemmNC / NR * NR);

  // Scratch: packed B block [NC][KC], packed A block [MC][KC], one edge tile [MR][NR].
  const size_t kcap = std::min(kGemmKC, K);
  const size_t ncap = std::min(NC, (Nn + NR - 1) / NR * NR);
  const size_t mcap = std::min(kGemmMC, (M + MR - 1) / MR * MR);
  const size_t b_floats = ncap / NR * GemmPanelStride(kcap, NR);
  const size_t a_floats = mcap / MR * GemmPanelStride(kcap, MR);
  const size_t align = HWY_ALIGNMENT / sizeof(float);
  const size_t a_off = (b_floats + align - 1) / align * align;
  const size_t t_off = a_off + (a_floats + align - 1) / align * align;
  float* scratch = GemmScratch(t_off + MR * NR);
  float* HWY_RESTRICT bpack = scratch;
  float* HWY_RESTRICT apack = scratch + a_off;
  float* HWY_RESTRICT tile = scratch + t_off;

  const bool trans_a = op == GemmOp::kTN;
  const bool trans_b = op == GemmOp::kNT;
  for (size_t jc = 0; jc < Nn; jc += NC) {
    const size_t nc = std::min(NC, Nn - jc);
    for (size_t pc = 0; pc < K; pc += kGemmKC) {
      const size_t kc = std::min(kGemmKC, K - pc);
      const bool load_c = accumulate || pc != 0;
      GemmPackB(d, trans_b, b, LDB, pc, kc, jc, nc, bpack);
      for (size_t ic = 0; ic < M; ic += kGemmMC) {
        const size_t mc = std::min(kGemmMC, M - ic);
        GemmPackA<MR>(trans_a, a, LDA, pc, kc, ic, mc, apack);
        for (size_t jr = 0; jr < nc; jr += NR) {
          const size_t nr = std::min(NR, nc - jr);
          const float* bp = bpack + jr / NR * GemmPanelStride(kc, NR);
          for (size_t ir = 0; ir < mc; ir += MR) {
            const size_t mr = std::min(MR, mc - ir);
            const float* ap = apack + ir / MR * GemmPanelStride(kc, MR);
            float* ct = c + (ic + ir) * LDC + jc + jr;
            if (nr == NR) {
              if (mr == MR) {
                GemmTile<MR, MR>(d, kc, ap, bp, ct, LDC, load_c);
              } else {
                GemmTileRows<MR - 1, MR>(d, mr, kc, ap, bp, ct, LDC, load_c);
              }
              continue;
            }
            // Edge tile: same micro-kernel on a scratch copy, so the arithmetic per element
            // is unchanged; only the valid part goes back to C.
            if (load_c) {
              // Zeroed first so the unused lanes never hold stale (possibly subnormal) data.
              std::memset(tile, 0, MR * NR * sizeof(float));
              for (size_t i = 0; i < mr; ++i) {
                std::memcpy(tile + i * NR, ct + i * LDC, nr * sizeof(float));
              }
            }
            GemmTile<MR, MR>(d, kc, ap, bp, tile, NR, load_c);
            for (size_t i = 0; i < mr; ++i) {
              std::memcpy(ct + i * LDC, tile + i * NR, nr * sizeof(float));
            }
          }
        }
      }
    }
  }
}

// NOLINTNEXTLINE(google-readability-namespace-comments)
}  // namespace HWY_NAMESPACE
}  // namespace moe::kernels
HWY_AFTER_NAMESPACE();

#endif  // MOE_KERNELS_GEMM_INL_H_ include guard
