// Element types. Ids are ggml's (GGUF tensor_info type field), so a DType casts to/from the
// file value directly. Quantized types are stored in blocks along ne[0] (the row).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace moe {

enum class DType : uint32_t {
  kF32 = 0,
  kF16 = 1,
  kQ4_0 = 2,
  kQ4_1 = 3,
  kQ5_0 = 6,
  kQ5_1 = 7,
  kQ8_0 = 8,
  kQ8_1 = 9,   // activation-side only (dot products with q4_1 / q5_1)
  kQ2_K = 10,
  kQ3_K = 11,
  kQ4_K = 12,
  kQ5_K = 13,
  kQ6_K = 14,
  kQ8_K = 15,  // activation-side only (dot products with k-quants); never a weight type here
  kIQ2_XXS = 16,
  kIQ2_XS = 17,
  kIQ3_XXS = 18,
  kIQ1_S = 19,
  kIQ4_NL = 20,
  kIQ3_S = 21,
  kIQ2_S = 22,
  kIQ4_XS = 23,
  kIQ1_M = 29,
  kMXFP4 = 39,
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
// Parses a weight type's name in any case ("f32", "Q4_K", ...); false if it names none.
bool ParseDType(const char* name, DType* out);
// "f32, f16, q4_0, ...": the weight types, for messages.
std::string WeightTypeNames();

// Bytes of one row of n elements; n must be a multiple of the block size (checked by callers).
inline size_t RowBytes(DType t, int64_t n) {
  const DTypeTraits& tr = Traits(t);
  return static_cast<size_t>(n / tr.block_size) * tr.block_bytes;
}

// The type the activations are converted to before a dot product with weights of type w,
// exactly as ggml's CPU backend does (type_traits_cpu[w].vec_dot_type):
// f32->f32, f16->f16, bf16->bf16, q8_0/q4_0/q5_0->q8_0, q4_1/q5_1->q8_1, k-quants->q8_k.
DType VecDotType(DType w);

// True for the types a weight matrix may have here (all but i32 and the activation-only q8_1
// and q8_K).
bool IsWeightType(DType t);

// llama.cpp's general.file_type (llama_ftype) for a file whose matrices are all of type t, or
// 0 (all f32) where t has no such recipe.
uint32_t FileTypeOf(DType t);

// ---- Block layouts (ggml-common.h). All scales are IEEE binary16 stored as uint16_t. ----
constexpr int kQK8_0 = 32;
constexpr int kQK4_0 = 32;  // also q4_1, q5_0, q5_1, q8_1
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

struct BlockQ4_1 {  // x = d * q + m, q in 0..15
  uint16_t d;
  uint16_t m;
  uint8_t qs[kQK4_0 / 2];  // element j in the low nibble of qs[j], j + 16 in the high one
};
static_assert(sizeof(BlockQ4_1) == 20);

struct BlockQ5_0 {  // x = d * (q - 16), q in 0..31
  uint16_t d;
  uint8_t qh[4];  // 5th bits: bit j of the little-endian uint32 belongs to element j
  uint8_t qs[kQK4_0 / 2];
};
static_assert(sizeof(BlockQ5_0) == 22);

struct BlockQ5_1 {  // x = d * q + m, q in 0..31
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[kQK4_0 / 2];
};
static_assert(sizeof(BlockQ5_1) == 24);

struct BlockQ8_1 {  // activations for q4_1 / q5_1: q8_0's quants plus s = d * sum(qs)
  uint16_t d;
  uint16_t s;
  int8_t qs[kQK8_0];
};
static_assert(sizeof(BlockQ8_1) == 36);

struct BlockQ2_K {  // 16 sub-blocks of 16: x = d * (scales[j] & 15) * q - dmin * (scales[j] >> 4)
  uint8_t scales[kQK_K / 16];
  uint8_t qs[kQK_K / 4];  // 2-bit quants: element 128h + 32k + l at bits 2k of qs[32h + l]
  uint16_t d;
  uint16_t dmin;
};
static_assert(sizeof(BlockQ2_K) == 84);

struct BlockQ3_K {  // 16 sub-blocks of 16: x = d * (scale_j - 32) * (q - 4), q in 0..7
  uint8_t hmask[kQK_K / 8];  // 3rd bits: element e at bit e / 32 of hmask[e % 32]
  uint8_t qs[kQK_K / 4];     // low 2 bits, as q2_K
  uint8_t scales[12];        // 16 6-bit scales (+32)
  uint16_t d;
};
static_assert(sizeof(BlockQ3_K) == 110);

struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qs[kQK_K / 2];
};
static_assert(sizeof(BlockQ4_K) == 144);

struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];      // 6-bit scales and mins of 8 sub-blocks, packed as in q4_K
  uint8_t qh[kQK_K / 8];   // 5th bits: bit j of qh[l] belongs to quant l of sub-block j
  uint8_t qs[kQK_K / 2];   // low 4 bits, packed as in q4_K
};
static_assert(sizeof(BlockQ5_K) == 176);

struct BlockQ6_K {
  uint8_t ql[kQK_K / 2];      // lower 4 bits
  uint8_t qh[kQK_K / 4];      // upper 2 bits
  int8_t scales[kQK_K / 16];  // 8-bit sub-block scales
  uint16_t d;                 // super-block scale
};
static_assert(sizeof(BlockQ6_K) == 210);

// The 16 levels of iq4_nl / iq4_xs quants (ggml's kvalues_iq4nl): a non-uniform 4-bit grid.
inline constexpr int8_t kIQ4NLValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10,
                                            1,    13,   25,  38,  53,  69,  89,  113};

struct BlockIQ4_NL {  // x = d * kIQ4NLValues[q]
  uint16_t d;
  uint8_t qs[kQK4_0 / 2];  // element j in the low nibble of qs[j], j + 16 in the high one
};
static_assert(sizeof(BlockIQ4_NL) == 18);

struct BlockIQ4_XS {  // 8 sub-blocks of 32: x = d * (ls_j - 32) * kIQ4NLValues[q]
  uint16_t d;
  uint16_t scales_h;       // the top 2 bits of ls_j at bits 2j
  uint8_t scales_l[kQK_K / 64];  // the low 4 bits of ls_j in nibble j % 2 of byte j / 2
  uint8_t qs[kQK_K / 2];   // sub-block j: qs[16j..16j+15] packed as iq4_nl
};
static_assert(sizeof(BlockIQ4_XS) == 136);

// ---- i-quants on a codebook ("grid", tensor/iq_tables.h): groups of 8 quants are one grid
// entry's magnitudes (iq2: one 8-byte entry, iq3: two 4-byte entries) with a sign byte; the 8
// signs of iq2_xxs / iq3_xxs are 7 stored bits plus even parity (IQ2SignByte).

// The sign byte of a 7-bit index: bit j set = element j negative; bit 7 makes the count even
// (ggml's ksigns_iq2xs table).
inline constexpr uint8_t IQ2SignByte(uint32_t i7) {
  return static_cast<uint8_t>(i7 | ((__builtin_popcount(i7) & 1) << 7));
}

struct BlockIQ2_XXS {  // 8 sub-blocks of 32 = 4 groups of 8; x = d (0.5 + ls) / 4 * grid * sign
  uint16_t d;
  // Sub-block j: two little-endian uint32 at qs + 4j: the first holds the 4 groups' 8-bit grid
  // indices (byte l), the second their 7-bit sign indices (bits 7l..7l+6) and ls (bits 28..31).
  uint16_t qs[kQK_K / 8];
};
static_assert(sizeof(BlockIQ2_XXS) == 66);

struct BlockIQ2_XS {  // 16 sub-blocks of 16 = 2 groups of 8; x = d (0.5 + ls) / 4 * grid * sign
  uint16_t d;
  uint16_t qs[kQK_K / 8];      // group g: grid index bits 0..8, 7-bit sign index bits 9..15
  uint8_t scales[kQK_K / 32];  // ls of sub-block j: nibble j % 2 of scales[j / 2]
};
static_assert(sizeof(BlockIQ2_XS) == 74);

struct BlockIQ2_S {  // 16 sub-blocks of 16 = 2 groups of 8; x = d (0.5 + ls) / 4 * grid * sign
  uint16_t d;
  uint8_t qs[kQK_K / 4];       // qs[g]: the low 8 bits of group g's grid index; qs[32 + g]: its signs
  uint8_t qh[kQK_K / 32];      // index bits 8..9 of group 4j + l: bits 2l, 2l+1 of qh[j]
  uint8_t scales[kQK_K / 32];  // ls of sub-block j (of 16): nibble j % 2 of scales[j / 2]
};
static_assert(sizeof(BlockIQ2_S) == 82);

struct BlockIQ1_S {  // 8 sub-blocks of 32 = 4 groups of 8; x = d (2 ls + 1) (grid + delta)
  uint16_t d;
  uint8_t qs[kQK_K / 8];    // group l of sub-block j: the low 8 bits of its 11-bit grid index
  // Sub-block j: bits 3l..3l+2 the index's top bits for group l, bits 12..14 ls, bit 15 the
  // sign of delta (set: -1/8, clear: +1/8). The grid (kIQ1SGrid) holds signed bytes -1, 0, 1.
  uint16_t qh[kQK_K / 32];
};
static_assert(sizeof(BlockIQ1_S) == 50);
inline constexpr float kIQ1SDelta = 0.125f;

// iq1_m: iq1_s's grid in 16 sub-blocks of 16 with 3-bit scales, a delta sign per group of 8,
// and no d field: the super-block's f16 d is spread over the top nibbles of the four scale words.
struct BlockIQ1_M {
  uint8_t qs[kQK_K / 8];   // group g: the low 8 bits of its 11-bit grid index
  // Byte g / 2: group g's index top bits in bits 0..2 (g even) or 4..6 (g odd); bit 3 / 7 the
  // sign of its delta (set: -1/8).
  uint8_t qh[kQK_K / 16];
  // Four little-endian uint16 words: ls of sub-block j (of 16) in bits 3 (j % 4).. of word j / 4;
  // bits 12..15 of word w are bits 4w..4w+3 of d.
  uint8_t scales[kQK_K / 32];
};
static_assert(sizeof(BlockIQ1_M) == 56);

// d of an iq1_m block (f16 bits).
inline uint16_t IQ1MScaleBits(const uint8_t* scales) {
  uint16_t w[4];
  for (int i = 0; i < 4; ++i) w[i] = static_cast<uint16_t>(scales[2 * i] | (scales[2 * i + 1] << 8));
  return static_cast<uint16_t>((w[0] >> 12) | ((w[1] >> 8) & 0x00F0) | ((w[2] >> 4) & 0x0F00) | (w[3] & 0xF000));
}

struct BlockIQ3_XXS {  // 8 sub-blocks of 32 = 4 groups of 8; x = d (0.5 + ls) / 2 * grid * sign
  uint16_t d;
  // qs[0..63]: two 8-bit grid indices (4 quants each) per group; then per sub-block one
  // little-endian uint32 of 7-bit sign indices (bits 7l..7l+6) and ls (bits 28..31).
  uint8_t qs[3 * kQK_K / 8];
};
static_assert(sizeof(BlockIQ3_XXS) == 98);

struct BlockIQ3_S {  // 8 sub-blocks of 32 = 4 groups of 8; x = d (1 + 2 ls) * grid * sign
  uint16_t d;
  uint8_t qs[kQK_K / 4];      // group l of sub-block j: grid indices qs[8j + 2l], qs[8j + 2l + 1]
  uint8_t qh[kQK_K / 32];     // their 9th bits: bits 2l and 2l + 1 of qh[j]
  uint8_t signs[kQK_K / 8];   // signs[4j + l]: bit k set = element k of the group negative
  uint8_t scales[kQK_K / 64]; // ls of sub-block j: nibble j % 2 of scales[j / 2]
};
static_assert(sizeof(BlockIQ3_S) == 110);

// MXFP4 (OCP microscaling): e2m1 values, stored doubled as ggml's kvalues_mxfp4, and one
// E8M0 scale per 32: x = 2^(e - 128) * kMXFP4Values[q] (half of 2^(e - 127) times the doubled value).
inline constexpr int8_t kMXFP4Values[16] = {0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12};

struct BlockMXFP4 {
  uint8_t e;               // E8M0 exponent
  uint8_t qs[kQK4_0 / 2];  // element j in the low nibble of qs[j], j + 16 in the high one
};
static_assert(sizeof(BlockMXFP4) == 17);

// 2^(e - 128) as a float (subnormal for e < 2), exactly as ggml's GGML_E8M0_TO_FP32_HALF.
inline float E8M0Half(uint8_t e) {
  const uint32_t bits = e < 2 ? uint32_t{0x00200000} << e : uint32_t{e - 1u} << 23;
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

struct BlockQ8_K {
  float d;
  int8_t qs[kQK_K];
  int16_t bsums[kQK_K / 16];  // sum of qs in groups of 16
};
static_assert(sizeof(BlockQ8_K) == 292);

}  // namespace moe
