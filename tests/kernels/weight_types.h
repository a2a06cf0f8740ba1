// The weight types the tests iterate over: every type moe.cpp reads (IsWeightType), so a new
// type is tested by every per-type test without editing their lists.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

#include "tensor/dtype.h"

namespace moe::test {

inline std::vector<DType> AllWeightTypes(bool include_f32 = true) {
  std::vector<DType> out;
  for (uint32_t id = 0; id < 64; ++id) {
    const DType t = static_cast<DType>(id);
    if (IsWeightType(t) && (include_f32 || t != DType::kF32)) out.push_back(t);
  }
  return out;
}

// The block-quantized ones (block size > 1).
inline std::vector<DType> QuantizedWeightTypes() {
  std::vector<DType> out;
  for (DType t : AllWeightTypes()) {
    if (Traits(t).block_size > 1) out.push_back(t);
  }
  return out;
}

// Byte offsets of the f16 scale fields of one block (random blocks get finite values there).
inline std::vector<size_t> HalfScaleOffsets(DType t) {
  switch (t) {
    case DType::kQ8_0: return {offsetof(BlockQ8_0, d)};
    case DType::kQ4_0: return {offsetof(BlockQ4_0, d)};
    case DType::kQ4_1: return {offsetof(BlockQ4_1, d), offsetof(BlockQ4_1, m)};
    case DType::kQ5_0: return {offsetof(BlockQ5_0, d)};
    case DType::kQ5_1: return {offsetof(BlockQ5_1, d), offsetof(BlockQ5_1, m)};
    case DType::kQ8_1: return {offsetof(BlockQ8_1, d), offsetof(BlockQ8_1, s)};
    case DType::kQ2_K: return {offsetof(BlockQ2_K, d), offsetof(BlockQ2_K, dmin)};
    case DType::kQ3_K: return {offsetof(BlockQ3_K, d)};
    case DType::kQ4_K: return {offsetof(BlockQ4_K, d), offsetof(BlockQ4_K, dmin)};
    case DType::kQ5_K: return {offsetof(BlockQ5_K, d), offsetof(BlockQ5_K, dmin)};
    case DType::kQ6_K: return {offsetof(BlockQ6_K, d)};
    case DType::kIQ4_NL: return {offsetof(BlockIQ4_NL, d)};
    case DType::kIQ4_XS: return {offsetof(BlockIQ4_XS, d)};
    case DType::kIQ2_XXS: return {offsetof(BlockIQ2_XXS, d)};
    case DType::kIQ3_XXS: return {offsetof(BlockIQ3_XXS, d)};
    case DType::kIQ3_S: return {offsetof(BlockIQ3_S, d)};
    case DType::kIQ2_XS: return {offsetof(BlockIQ2_XS, d)};
    case DType::kIQ2_S: return {offsetof(BlockIQ2_S, d)};
    case DType::kIQ1_S: return {offsetof(BlockIQ1_S, d)};
    default: return {};
  }
}

// Gives the f16 scales of one block the values next() returns (random blocks get finite
// scales this way): the fields at HalfScaleOffsets, or iq1_m's d, spread over the top
// nibbles of its four scale words.
template <class Next>
void SetHalfScales(DType t, uint8_t* blk, Next&& next) {
  if (t == DType::kIQ1_M) {
    const uint16_t h = next();
    uint8_t* hi = blk + offsetof(BlockIQ1_M, scales) + 1;  // high bytes of the words
    for (int i = 0; i < 4; ++i) {
      hi[2 * i] = static_cast<uint8_t>((hi[2 * i] & 0x0F) | (((h >> (4 * i)) & 0xF) << 4));
    }
    return;
  }
  for (size_t off : HalfScaleOffsets(t)) {
    const uint16_t h = next();
    std::memcpy(blk + off, &h, sizeof(h));
  }
}

}  // namespace moe::test
