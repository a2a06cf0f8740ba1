// Quantizers of the codebook i-quants (iq2_xxs, iq3_xxs, iq3_s), called by QuantizeRow.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"
#include "tensor/dtype.h"

namespace moe::kernels {

// n floats (a multiple of 256) into blocks of t (kIQ2_XXS, kIQ3_XXS or kIQ3_S).
void QuantizeIQGridRow(DType t, const float* x, void* y, int64_t n);

}  // namespace moe::kernels
