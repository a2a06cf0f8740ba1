// Compute kernels: plain API (no Highway include). Implementations live in *-inl.h / *.cc with
// Highway dynamic dispatch (one HWY_DYNAMIC_DISPATCH per call; call them per row range or per
// vector, never per element). Every kernel has a scalar reference in kernels/ref/ (ops_ref.h, quant_ref.h).
// Single-threaded: the caller partitions work over the thread pool. Kernels never throw.
#pragma once

#include <cstddef>
#include <cstdint>

#include "tensor/dtype.h"
#include "tensor/tensor.h"

namespace moe::kernels {

// ---- scalar conversions (exact IEEE round-to-nearest-even, as ggml) ----
float F16ToF32(uint16_t h);
uint16_t F32ToF16(float f);
float BF16ToF32(uint16_t h);
uint16_t F32ToBF16(float f);  // round-to-nearest-even; NaN stays NaN

// ---- weight quantization (file writing) ----
// Quantizes n floats (n a multiple of the block size) into the block format of t, byte for
// byte what ggml_quantize_chunk writes (without an importance matrix: ggml's reference
// quantizers, quantize_row_*_ref), except the codebook types (kernels/quant_iq.h).
// t: any weight type (IsWeightType) or q8_K.
// importance (optional): importance[n] weights each column's squared error (per-column mean
// of the squared activations that meet it), as ggml_quantize_chunk does with an imatrix, for the
// types where QuantizerUsesImportance: byte for byte ggml's for the block-32 and k-quant types
// and iq4_nl/iq4_xs; the codebook types' own searches minimise the importance-weighted error.
// The others (q8_0, mxfp4, f16: ggml ignores it too) quantize without it.
void QuantizeRow(DType t, const float* x, void* y, int64_t n, const float* importance = nullptr);
bool QuantizerUsesImportance(DType t);
// Inverse: y = dequant(x), n elements, bit-identical to ggml's dequantize_row_*.
void DequantizeRow(DType t, const void* x, float* y, int64_t n);

// ---- activations ----
// Converts one activation row of n floats into VecDotType(w) (f32 copy, f16, bf16, q8_0 or
// q8_K blocks) with the same rounding as ggml's CPU backend, so dot products see the numbers
// llama.cpp sees. n must be a multiple of the weight block size.
void ConvertActivations(DType w, const float* x, void* y, int64_t n);
// Bytes of one converted row.
size_t ActivationRowBytes(DType w, int64_t n);

// ---- products ----
// For r in [r0, r1) and t in [0, n_tok):
//   y[t * y_stride + (r - r0)] = dot(row r of W, activation t)
// W points at row 0 of a weight matrix of type w with rows of n_in elements; activation t is
// at (const uint8_t*)xa + t * xa_stride, converted with ConvertActivations(w, ...).
// Blocks over tokens so each weight row is loaded once per group of tokens.
// W in layout kTiles16 (Repack): the same, for rows of whole tiles except that r0 and r1 may
// cut the first and last tile.
void MatMul(DType w, const void* W, int64_t n_in, int64_t r0, int64_t r1, const void* xa,
            size_t xa_stride, int64_t n_tok, float* y, int64_t y_stride,
            WeightLayout layout = WeightLayout::kRows);

// ---- repacking ----
// The layout the running CPU's kernels multiply a matrix of `rows` rows of n_in elements of type
// w fastest in: kTiles16 for q8_0 on CPUs with AVX-512 VNNI (rows a multiple of 16, n_in of 64),
// else kRows (keep the file's).
WeightLayout RepackLayout(DType w, int64_t n_in, int64_t rows);
// Writes the matrix src (kRows) into dst (as many bytes) in `layout`.
void Repack(DType w, WeightLayout layout, const void* src, void* dst, int64_t n_in, int64_t rows);

float DotF32(const float* a, const float* b, int64_t n);
// y[i] += a * x[i]
void Axpy(float a, const float* x, float* y, int64_t n);
// y[i] *= a
void Scale(float a, float* y, int64_t n);
// y[i] = a[i] + b[i]  (y may alias a or b)
void Add(const float* a, const float* b, float* y, int64_t n);

// ---- element-wise / normalisation ----
// out[i] = x[i] / sqrt(mean(x^2) + eps) * (w ? w[i] : 1). out may alias x.
void RmsNorm(const float* x, const float* w, int64_t n, float eps, float* out);
// RoPE scaling as ggml's rope_yarn applies it to pair i's angle t = pos * freq_base^(-2i/n_rot):
// theta = freq_scale t, or with ext_factor != 0 (YaRN) the mix freq_scale t (1 - r) + t r with
// r = ext_factor (1 - clamp((i - corr_dims[0]) / max(0.001, corr_dims[1] - corr_dims[0]), 0, 1)),
// and cos / sin times attn_factor (YaRN: times 1 + 0.1 ln(1 / freq_scale) too). The defaults are
// plain RoPE, bit for bit.
struct RopeScaling {
  float freq_scale = 1.0f;
  float ext_factor = 0.0f;
  float attn_factor = 1.0f;
  float corr_dims[2] = {0.0f, 0.0f};
};
// Rotary embedding in place on x = [n_heads][head_dim] for one position. The first n_rot dims
// of each head rotate with theta_i = pos * freq_base^(-2i/n_rot) (scaled by `scaling`).
// neox=false: pairs (2i, 2i+1) ("normal", llama); neox=true: pairs (i, i + n_rot/2) (qwen, olmoe).
void Rope(float* x, int n_heads, int head_dim, int n_rot, int pos, float freq_base, bool neox,
          const RopeScaling& scaling = RopeScaling());
// Rope in two steps, so a position's rotations are computed once for every head and layer (and
// training's backward rotates by the same tables): cos / sin tables [n_pos][n_rot/2] for
// positions pos0 .. pos0+n_pos-1, the angle as ggml computes it (theta = pos, theta *=
// base^(-2/n_rot) per pair, the scaling applied, cos and sin times its magnitude factor); then
// RopeApply rotates x = [n_heads][head_dim] of one position by a table row, or by -theta with
// inverse (the rotation's transpose, training's backward). Rope is the two, bit for bit.
void RopeTables(int n_rot, float freq_base, int pos0, int n_pos, float* cos_table, float* sin_table,
                const RopeScaling& scaling = RopeScaling());
void RopeApply(float* x, int n_heads, int head_dim, int n_rot, const float* cos_row,
               const float* sin_row, bool neox, bool inverse = false);
// In place, numerically stable (max subtracted).
void Softmax(float* x, int64_t n);
// out[i] = silu(gate[i]) * up[i], silu(g) = g / (1 + exp(-g)). out may alias gate or up.
void SiluMul(const float* gate, const float* up, float* out, int64_t n);
// Query rows that attend to the same keys and values (the heads of a GQA group, MLA's heads over
// its latent cache): rows queries q_stride floats apart give rows outputs out_stride apart.
struct AttendRows {
  const float* q = nullptr;
  int64_t q_stride = 0;
  float* out = nullptr;
  int64_t out_stride = 0;
  int rows = 0;
};
// Attention of each row over keys and values j < n (K rows of Dk elements, V rows of Dv
// elements, both of type kv: kF32, or kF16 widened as they load; V may alias K, the same base):
// out_r = softmax_j(scale * q_r.K_j) V_j, in one pass over the keys (an online softmax over
// blocks of kAttendKeys). Each key row is read once for two queries. A row's result is bitwise
// independent of the other rows. s: rows x kAttendKeys floats of scratch.
constexpr int64_t kAttendKeys = 16;
// The rows of one head in a KV cache, in elements: row j at base + (j / page_rows) * page_stride
// + (j % page_rows) * stride (a cache in pages of page_rows positions, a multiple of
// kAttendKeys; page_rows 0: one run, rows stride apart).
struct KvRows {
  const void* base = nullptr;
  int64_t stride = 0;
  int64_t page_rows = 0;
  int64_t page_stride = 0;
  int64_t Offset(int64_t j) const { return page_rows ? j / page_rows * page_stride + j % page_rows * stride : j * stride; }
};
void Attend(const AttendRows& a, DType kv, const KvRows& K, int64_t Dk, const KvRows& V, int64_t Dv, int64_t n,
            float scale, float* s);
// Batch invariance of MatMul (process-wide, off by default; `moe serve` turns it on): a token's
// products are then bitwise the same whatever other tokens share the call and wherever it sits
// among them. The tile kernels always are; the row kernels give a lone token a faster two-chain
// sum unless this is on (then it goes through the multi-token kernel, ~10-30% slower decode for
// the row-layout types).
void SetBatchInvariant(bool on);
bool BatchInvariant();
// Whether the one-token tile kernels whose tiles the hardware prefetcher streams on its own
// (q8_0, q4_0, q4_K, iq4_xs) also prefetch in software. Off on AMD family 0x19 (Zen 4, session
// 19: one thread from memory read q4_0/q8_0/q4_K 20-25% faster without it; medium model decode
// on one thread +11-17% q4_0, +5-9% Q4_K_M, +17-20% q8_0; two threads, which saturate this VM's
// memory either way, within the noise); on elsewhere, as on the Zen 5 and Intel hosts the kernels
// were tuned on. MOE_TILE_PREFETCH=0 or 1 overrides. Speed only: results are the same.
bool OneTokenTilePrefetch();
// The k largest of x[0..n) in descending order into idx; ties keep the lower index first.
void TopK(const float* x, int n, int k, int* idx);

// Name of the SIMD target dispatch chose on this machine ("AVX3_ZEN4", "AVX2", ...).
const char* ActiveTarget();

}  // namespace moe::kernels
