// Importance matrices ("imatrix"): for every weight matrix, the per-column sum of the squared
// activations that met it while the model read some text, per expert for 3-D expert tensors.
// Quantizers weight each column's squared error by the mean (sum / count): columns that carry
// large activations are kept more exactly (kernels::QuantizeRow with importance).
//
// Files use llama.cpp's imatrix GGUF format, so a file from llama-imatrix quantizes here and one
// gathered here quantizes in llama-quantize: tensors "<weight>.in_sum2" (f32, [ne0, n_mat]) and
// "<weight>.counts" (f32, [1, n_mat]: activation rows seen per matrix), keys imatrix.datasets,
// imatrix.chunk_count, imatrix.chunk_size. As llama-imatrix does by default, the output matrix
// is not gathered.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

namespace moe {

class Model;

class Imatrix {
 public:
  struct Entry {
    int64_t ne0 = 0;
    std::vector<float> sum2;    // [n_mat][ne0]
    std::vector<float> counts;  // [n_mat]
  };

  // Reads a llama.cpp imatrix GGUF. Throws moe::Error naming the file and the problem (not an
  // imatrix, a sums tensor without counts, non-finite values, sizes that disagree).
  static Imatrix Load(const std::string& path);
  // Writes it atomically (a failure leaves an existing file as it was).
  void Save(const std::string& path) const;

  // Adds n activation rows of ne0 floats that met matrix `mat` (of n_mat) of weight `name`.
  void Add(const std::string& name, int mat, int n_mat, int64_t ne0, const float* const* rows, int n);

  // The importance of matrix `mat` of weight `name` (ne0 values), or an empty vector if the
  // file has none for it. A matrix that never saw an activation gets ones (as llama-quantize).
  // Throws moe::Error if the entry's shape does not match (ne0, n_mat).
  std::vector<float> Values(const std::string& name, int mat, int n_mat, int64_t ne0) const;

  const std::map<std::string, Entry>& entries() const { return entries_; }
  std::vector<std::string> datasets;
  uint32_t chunk_count = 0, chunk_size = 0;

 private:
  std::map<std::string, Entry> entries_;
};

// Runs `model` over `tokens` in chunks of `chunk` tokens (each from an empty cache, the first
// token replaced by BOS when the tokenizer adds one, as llama-imatrix does) and gathers the
// importance of every weight matrix but the output. progress(done, total) after each chunk.
Imatrix GatherImatrix(const Model& model, const std::vector<int32_t>& tokens, int chunk,
                      int threads, const std::function<void(int, int)>& progress = {});

}  // namespace moe
