// Single-threaded FP32 GEMM for the MoE layer's training path (expert GEMMs forward and
// backward, weight gradients). Plain API, no Highway include; per-target code in gemm-inl.h,
// dispatched once per call from gemm.cc.
#pragma once

namespace moe::kernels {

enum class GemmOp { kNN, kNT, kTN };

// Row-major. C [m][n] (= or +=) op(A) * op(B):
//   kNN: A [m][k] (lda), B [k][n] (ldb)       C[i][j] = sum_p A[i][p] B[p][j]
//   kNT: A [m][k] (lda), B [n][k] (ldb)       C[i][j] = sum_p A[i][p] B[j][p]
//   kTN: A [k][m] (lda), B [k][n] (ldb)       C[i][j] = sum_p A[p][i] B[p][j]
// accumulate=false: C = product (C is not read, it may hold garbage); true: C += product.
// m, n, k >= 0 (k == 0 gives C = 0, or C unchanged when accumulating). Leading dimensions are
// in floats and at least the row length of the stored matrix. C must not overlap A or B.
//
// Numerics: every element is one fused multiply-add chain over p = 0, 1, ..., k-1 in that
// order, started from 0 (or from the old C when accumulating). Nothing in that chain depends
// on m, n, tiling or where the row sits, so for every op a row of C is bitwise the same
// whatever its batch-mates are (the MoE layer relies on this for kNN and kNT), and results are
// deterministic. Bits may differ between SIMD targets (the portable fallback may not fuse).
void Gemm(GemmOp op, int m, int n, int k, const float* a, int lda, const float* b, int ldb,
          float* c, int ldc, bool accumulate);

}  // namespace moe::kernels

namespace moe::kernels {

// The same contract in double, through BLAS (cblas_dgemm) — the one place moe.cpp calls BLAS
// (blas.cc). BLAS runs single-threaded (the caller's pool owns the threads) and, unlike the
// float kernel, makes no promise that a row's bits ignore its batch-mates or the shape: callers
// that need that (the MoE layer's double path) call it on fixed-shape blocks. Used where double
// precision is the point: references, gradient checks, goldens.
void Gemm(GemmOp op, int m, int n, int k, const double* a, int lda, const double* b, int ldb,
          double* c, int ldc, bool accumulate);

}  // namespace moe::kernels
