// Quantizers of the codebook i-quants, called by QuantizeRow.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"
#include "tensor/dtype.h"

namespace moe::kernels {

// n floats (a multiple of 256) into blocks of t (kIQ2_XXS, kIQ2_XS, kIQ2_S, kIQ3_XXS, kIQ3_S,
// kIQ1_S, kIQ1_M), minimising the squared error, weighted by qw[n] (an importance matrix's
// values) when it is not null.
void QuantizeIQGridRow(DType t, const float* x, void* y, int64_t n, const float* qw = nullptr);

}  // namespace moe::kernels
