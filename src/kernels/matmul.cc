// Dispatched entry point for MatMul (kernels.h): one dispatch per call, which covers a row
// range and a group of tokens; the per-target body is in matmul-inl.h.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/matmul.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kernels/matmul-inl.h"

#if HWY_ONCE
#include <cstring>

#include "kernels/kernels.h"
#include "util/error.h"

namespace moe::kernels {

HWY_EXPORT(MatMul);
HWY_EXPORT(RepackLayout);

void MatMul(DType w, const void* W, int64_t n_in, int64_t r0, int64_t r1, const void* xa,
            size_t xa_stride, int64_t n_tok, float* y, int64_t y_stride, WeightLayout layout) {
  HWY_DYNAMIC_DISPATCH(MatMul)(w, W, n_in, r0, r1, xa, xa_stride, n_tok, y, y_stride, layout);
}

WeightLayout RepackLayout(DType w, int64_t n_in, int64_t rows) {
  return HWY_DYNAMIC_DISPATCH(RepackLayout)(w, n_in, rows);
}

// The tile layout of MatMulQ8_0Tiles (matmul-inl.h).
void Repack(DType w, WeightLayout layout, const void* src, void* dst, int64_t n_in, int64_t rows) {
  if (layout == WeightLayout::kRows) {
    std::memcpy(dst, src, RowBytes(w, n_in) * static_cast<size_t>(rows));
    return;
  }
  if (layout != WeightLayout::kTiles16 || w != DType::kQ8_0 || n_in % 64 != 0 || rows % 16 != 0) {
    throw Error("no tile layout for this matrix");  // RepackLayout never gives one
  }
  const auto* in = static_cast<const BlockQ8_0*>(src);
  auto* out = static_cast<uint8_t*>(dst);
  const int64_t nb = n_in / kQK8_0;
  for (int64_t t0 = 0; t0 < rows; t0 += 16) {
    for (int64_t p = 0; p < nb / 2; ++p, out += 2 * 16 * sizeof(BlockQ8_0)) {
      for (int h = 0; h < 2; ++h) {
        for (int r = 0; r < 16; ++r) {
          const BlockQ8_0& blk = in[(t0 + r) * nb + 2 * p + h];
          std::memcpy(out + 32 * h + 2 * r, &blk.d, sizeof(blk.d));
          for (int k = 0; k < 8; ++k) {
            for (int i = 0; i < 4; ++i) {
              out[64 + 512 * h + 64 * k + 4 * r + i] = static_cast<uint8_t>(blk.qs[4 * k + i] + 128);
            }
          }
        }
      }
    }
  }
}

}  // namespace moe::kernels
#endif  // HWY_ONCE
