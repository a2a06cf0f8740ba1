// Element types. Ids are ggml's (GGUF tensor_info type field), so a DType casts to/from the
// file value directly. Quantized types are stored in blocks along ne[0] (the row).
#pragma once

#include <cstddef>
#include <cstdint>

namespace moe {

enum class DType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ8_0 = 8,
  kQ4_K = 12,
  kQ6_K = 14,
  kQ8_K = 15,  // activation-side only (dot products with k-quants); never a weight type here
  kI32 = 26,
  kBF16 = 30,
};

struct DTypeTraits {
  const char* name;       // "f32", "q8_0", ... (lower case, as llama.cpp prints them)
  int64_t block_size;     // elements per block (1 for plain types)
  size_t block_bytes;     // bytes per block
};

// Returns nullptr for a ggml type id moe.cpp does not support.
const DTypeTraits* FindDTypeTraits(uint32_t ggml_type);
const DTypeTraits& Traits(DType t);
inline const char* DTypeName(DType t) { return Traits(t).name; }
// Parses "f32", "F32", "q4_k", "Q4_K", ...; returns false if unknown.
bool ParseDType(const char* name, DType* out);

// Bytes of one row of n elements; n must be a multiple of the block size (checked by callers).
inline size_t RowBytes(DType t, int64_t n) {
  const DTypeTraits& tr = Traits(t);
  return static_cast<size_t>(n / tr.block_size) * tr.block_bytes;
}

// The type the activations are converted to before a dot product with weights of type w,
// exactly as ggml's CPU backend does (type_traits_cpu[w].vec_dot_type):
// f32->f32, f16->f16, bf16->bf16, q8_0/q4_0->q8_0, q4_k/q6_k->q8_k.
DType VecDotType(DType w);

// ---- Block layouts (ggml-common.h). All scales are IEEE binary16 stored as uint16_t. ----
constexpr int kQK8_0 = 32;
constexpr int kQK4_0 = 32;
constexpr int kQK_K = 256;

struct BlockQ8_0 {
  uint16_t d;
  int8_t qs[kQK8_0];
};
static_assert(sizeof(BlockQ8_0) == 34);

struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[kQK4_0 / 2];
};
static_assert(sizeof(BlockQ4_0) == 18);

struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qs[kQK_K / 2];
};
static_assert(sizeof(BlockQ4_K) == 144);

struct BlockQ6_K {
  uint8_t ql[kQK_K / 2];      // lower 4 bits
  uint8_t qh[kQK_K / 4];      // upper 2 bits
  int8_t scales[kQK_K / 16];  // 8-bit sub-block scales
  uint16_t d;                 // super-block scale
};
static_assert(sizeof(BlockQ6_K) == 210);

struct BlockQ8_K {
  float d;
  int8_t qs[kQK_K];
  int16_t bsums[kQK_K / 16];  // sum of qs in groups of 16
};
static_assert(sizeof(BlockQ8_K) == 292);

}  // namespace moe
