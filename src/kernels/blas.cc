// The BLAS bridge: the double-precision Gemm of gemm.h on OpenBLAS. Nothing else in moe.cpp
// includes cblas.h.
#include <cblas.h>

#include <mutex>

#include "kernels/gemm.h"

extern "C" void openblas_set_num_threads(int);

namespace moe::kernels {

void Gemm(GemmOp op, int m, int n, int k, const double* a, int lda, const double* b, int ldb,
          double* c, int ldc, bool accumulate) {
  // Our pool owns the threads: every BLAS call runs single-threaded inside one pool thread.
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
  if (m <= 0 || n <= 0) return;
  const CBLAS_TRANSPOSE ta = op == GemmOp::kTN ? CblasTrans : CblasNoTrans;
  const CBLAS_TRANSPOSE tb = op == GemmOp::kNT ? CblasTrans : CblasNoTrans;
  cblas_dgemm(CblasRowMajor, ta, tb, m, n, k, 1.0, a, lda, b, ldb, accumulate ? 1.0 : 0.0, c, ldc);
}

}  // namespace moe::kernels
