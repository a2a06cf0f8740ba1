// Tensor views. Dimension order and matmul convention (stated once, used everywhere):
//   ne[0] is the fastest-varying (contiguous) dimension, as in ggml/GGUF. A weight matrix of
//   shape {in, out} holds `out` rows of `in` elements each and computes y = W x, y[o] =
//   dot(row o, x). A 3-D expert tensor {in, out, n_expert} holds expert e as the contiguous
//   slab starting at e * out * RowBytes(dtype, in).
// Activations are row-major [n_tokens][n] float arrays (token t's vector at t * n).
#pragma once

#include <cstdint>
#include <string>

#include "tensor/dtype.h"

namespace moe {

// How a weight matrix's bytes are arranged in memory. kRows: as in the file, row after row.
// kTiles16: repacked at load for the running CPU's kernels (kernels::Repack): 16 rows
// interleaved per tile, the same bytes in total; Row() means nothing in that layout.
enum class WeightLayout : uint8_t { kRows = 0, kTiles16 = 1 };

struct TensorView {
  std::string name;
  DType dtype = DType::kF32;
  int n_dims = 0;
  int64_t ne[4] = {1, 1, 1, 1};
  const void* data = nullptr;  // points into the mapped file (zero-copy) or owned storage
  WeightLayout layout = WeightLayout::kRows;

  int64_t NumElements() const { return ne[0] * ne[1] * ne[2] * ne[3]; }
  size_t RowBytes() const { return moe::RowBytes(dtype, ne[0]); }
  size_t NumBytes() const { return RowBytes() * static_cast<size_t>(ne[1] * ne[2] * ne[3]); }
  // Row r of a 2-D view (or of the flattened higher dims).
  const uint8_t* Row(int64_t r) const {
    return static_cast<const uint8_t*>(data) + static_cast<size_t>(r) * RowBytes();
  }
  // Slab i along ne[2] (expert i of a 3-D expert tensor).
  const uint8_t* Slab(int64_t i) const {
    return static_cast<const uint8_t*>(data) + static_cast<size_t>(i) * ne[1] * RowBytes();
  }
  const float* F32() const { return static_cast<const float*>(data); }
};

std::string ShapeString(const int64_t* ne, int n_dims);  // "{64, 128, 8}"

}  // namespace moe
