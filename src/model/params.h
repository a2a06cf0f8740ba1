// The parameter store: a ModelConfig plus every parameter as an owned array named by its GGUF
// tensor name. The trainer computes on it (ModelForward / ModelBackward in train/), the optimizer
// and the checkpoints walk its named tensors, SaveParams exports it as GGUF, and Model::FromParams
// serves it to the inference forward (moe run's path) without a file in between. Loading a file
// into the store is reading it (LoadParams), saving is writing it: one set of names and shapes,
// those of ExpectedTensors (model/config.h).
//
// Layouts are the GGUF ones, row-major with ne[0] fastest: a matrix {in, out} is [out][in]; the
// MoE arrays are MoeWeights' (moe/moe_layer.h), which match their GGUF tensors one for one.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "formats/gguf.h"
#include "model/config.h"
#include "moe/moe_layer.h"
#include "tensor/dtype.h"

namespace moe {

// The dense arrays of one block (empty when the architecture does not have them). A dense block
// (ModelConfig::IsMoeLayer false) has empty MoE arrays.
template <typename T>
struct DenseLayerArrays {
  std::vector<T> attn_norm;   // [D]
  std::vector<T> wq, wk, wv;  // [n_q][D], [n_k][D], [n_v][D]
  std::vector<T> bq, bk, bv;  // [n_q], [n_k], [n_v]  (qwen2moe's optional biases)
  std::vector<T> wo;          // [D][n_q]
  std::vector<T> q_norm;      // [head_dim] (per head) or [n_q] (whole Q)
  std::vector<T> k_norm;      // [head_dim] or [n_k]
  std::vector<T> ffn_norm;    // [D]
  // deepseek2 (Dk = qk_nope + qk_rope, Kr = kv_lora_rank, Rq = q_lora_rank): Q through the q_lora
  // bottleneck (wq above when Rq = 0), the compressed KV and its norm, the per-head
  // up-projections, and a leading block's dense FFN of width n_ff.
  std::vector<T> wq_a, q_a_norm, wq_b;         // [Rq][D], [Rq], [H*Dk][Rq]
  std::vector<T> wkv_a, kv_a_norm;             // [Kr+Dr][D], [Kr]
  std::vector<T> wk_b, wv_b;                   // [H][Kr][qk_nope], [H][Dv][Kr]
  std::vector<T> ffn_gate, ffn_up, ffn_down;   // [n_ff][D], [n_ff][D], [D][n_ff]
};

template <typename T>
struct LayerParams : DenseLayerArrays<T> {
  MoeWeights<T> moe;
};
template <typename T>
struct LayerGrads : DenseLayerArrays<T> {
  MoeGrads<T> moe;
};

template <typename T, typename Layer>
struct ModelArrays {
  std::vector<T> token_embd;   // [V][D]
  std::vector<T> output_norm;  // [D]
  std::vector<T> output;       // [V][D]; empty when tied to token_embd
  std::vector<Layer> layers;
};

template <typename T>
struct ModelGrads : ModelArrays<T, LayerGrads<T>> {
  void Zero();
};

template <typename T>
struct ModelParams : ModelArrays<T, LayerParams<T>> {
  ModelConfig config;
  bool tied_output = false;  // no output.weight: the head is token_embd
  bool qkv_bias = false;     // attn_{q,k,v}.bias present
  // The tokenizer keys (and general.name) come from this file when saved or served; nullptr:
  // no vocabulary (tokenizer.ggml.model = "none").
  std::shared_ptr<const GgufFile> source;

  // Zero arrays of the right sizes for config (tied_output / qkv_bias as set).
  void Allocate();
  // The MoE layer of block il: config.moe, with no gating residual in block 0 (it has no previous
  // logits and no ffn_gate_res tensor).
  MoeLayerConfig LayerMoe(int il) const;
  // Gradients of matching sizes, zeroed.
  ModelGrads<T> NewGrads() const;
};

// One named tensor of the store: GGUF name, shape (ggml order), role, and its array.
template <typename T>
struct NamedArray {
  std::string name;
  std::vector<int64_t> ne;
  TensorRole role;
  std::vector<T>* data;
};

// Every tensor of the store in the order GGUF files are written (ExpectedTensors), each with its
// array. For gradients, the same list minus the tensors that have none (exp_probs_b: the
// selection bias is updated outside the optimizer, see UpdateBias).
template <typename T>
std::vector<NamedArray<T>> NamedTensors(ModelParams<T>& p);
template <typename T>
std::vector<NamedArray<T>> NamedTensors(const ModelParams<T>& p, ModelGrads<T>& g);

// Reads a model file into the store (every weight type dequantized to T). Throws moe::Error.
// allow_training_only: also files whose router only trains (expert_choice).
template <typename T>
ModelParams<T> LoadParams(const std::string& path, bool allow_training_only = false);
// The same from an open file, which becomes the store's source; extra_ok admits tensors beyond
// the model's (a checkpoint's optimizer state).
template <typename T>
ModelParams<T> LoadParamsFrom(std::shared_ptr<const GgufFile> file, bool allow_training_only,
                              const std::function<bool(const std::string&)>& extra_ok);

// Writes the store as a GGUF model file llama.cpp reads (when its router is one llama.cpp has):
// config keys, the source's tokenizer keys, tensors in GGUF order; matrices in `type` (norms,
// biases, router and its small matrices stay f32, as llama-quantize leaves them). `extra` may add
// keys and tensors (checkpoints). Written atomically (temporary file, fsync, rename).
void SaveParams(const ModelParams<float>& p, const std::string& path, DType type = DType::kF32,
                const std::function<void(GgufWriter&)>& extra = nullptr);

}  // namespace moe
