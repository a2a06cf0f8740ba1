// Dispatched entry point for Gemm (gemm.h): one dispatch per call; the per-target body is in
// gemm-inl.h.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/gemm.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kernels/gemm-inl.h"

#if HWY_ONCE
#include "kernels/gemm.h"

namespace moe::kernels {

HWY_EXPORT(Gemm);

void Gemm(GemmOp op, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
          float* c, int ldc, bool accumulate) {
  HWY_DYNAMIC_DISPATCH(Gemm)(op, m, n, k, a, lda, b, ldb, c, ldc, accumulate);
}

}  // namespace moe::kernels
#endif  // HWY_ONCE
