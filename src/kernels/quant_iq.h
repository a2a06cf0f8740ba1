// Quantizers of the codebook i-quants, called by QuantizeRow.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"
#include "tensor/dtype.h"

namespace moe::kernels {

// n floats (a multiple of 256) into blocks of t (kIQ2_XXS, kIQ2_XS, kIQ2_S, kIQ3_XXS, kIQ3_S).
void QuantizeIQGridRow(DType t, const float* x, void* y, int64_t n);

}  // namespace moe::kernels
