// Dispatched entry point for MatMul (kernels.h): one dispatch per call, which covers a row
// range and a group of tokens; the per-target body is in matmul-inl.h.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/matmul.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kernels/matmul-inl.h"

#if HWY_ONCE
#include "kernels/kernels.h"

namespace moe::kernels {

HWY_EXPORT(MatMul);

void MatMul(DType w, const void* W, int64_t n_in, int64_t r0, int64_t r1, const void* xa,
            size_t xa_stride, int64_t n_tok, float* y, int64_t y_stride) {
  HWY_DYNAMIC_DISPATCH(MatMul)(w, W, n_in, r0, r1, xa, xa_stride, n_tok, y, y_stride);
}

}  // namespace moe::kernels
#endif  // HWY_ONCE
