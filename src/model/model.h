// A loaded model: config, zero-copy weight views into the mapped GGUF, and the tokenizer.
#pragma once

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "formats/gguf.h"
#include "model/config.h"
#include "model/params.h"
#include "tokenizer/tokenizer.h"
#include "util/memory.h"
#include "util/threadpool.h"

namespace moe {

struct LayerWeights {
  const TensorView* attn_norm = nullptr;  // [n_embd]
  const TensorView* wq = nullptr;         // {n_embd, n_q}
  const TensorView* wk = nullptr;         // {n_embd, n_k}
  const TensorView* wv = nullptr;         // {n_embd, n_v}
  const TensorView* bq = nullptr;         // [n_q]   optional
  const TensorView* bk = nullptr;         // [n_k]   optional
  const TensorView* bv = nullptr;         // [n_v]   optional
  const TensorView* wo = nullptr;         // {n_q, n_embd}
  const TensorView* q_norm = nullptr;     // [head_dim] (per head) or [n_q] (full)
  const TensorView* k_norm = nullptr;
  // deepseek2 (MLA; Dk = qk_nope + qk_rope, Dr = qk_rope, Kr = kv_lora_rank, Rq = q_lora_rank).
  // wq above is {n_embd, H*Dk} when Rq = 0.
  const TensorView* wq_a = nullptr;       // {n_embd, Rq}
  const TensorView* q_a_norm = nullptr;   // [Rq]
  const TensorView* wq_b = nullptr;       // {Rq, H*Dk}
  const TensorView* wkv_a = nullptr;      // {n_embd, Kr + Dr}  attn_kv_a_mqa: latent, then rotated key
  const TensorView* kv_a_norm = nullptr;  // [Kr]
  // Per-head up-projections {Dn, Kr, H} (head h: Kr rows of Dn) and {Kr, Dv, H}; for legacy files
  // (one attn_kv_b) f32 copies the model derives from it.
  const TensorView* wk_b = nullptr;
  const TensorView* wv_b = nullptr;
  const TensorView* ffn_gate = nullptr;   // {n_embd, n_ff}  deepseek2's leading dense blocks
  const TensorView* ffn_up = nullptr;     // {n_embd, n_ff}
  const TensorView* ffn_down = nullptr;   // {n_ff, n_embd}
  const TensorView* ffn_norm = nullptr;   // [n_embd]
  const TensorView* gate_inp = nullptr;   // {n_embd, R}  router, R = ModelConfig::n_router() (hash: null)
  const TensorView* exp_probs_b = nullptr;  // [n_expert] selection-only bias (sigmoid_bias)
  const TensorView* zc_mix = nullptr;     // {n_embd, 2, n_const}  constant experts' W_c (f32)
  const TensorView* zc_const = nullptr;   // {n_embd, n_const}     constant experts' v (f32)
  const TensorView* gate_res = nullptr;   // {R, R} gating residual W_g (f32; layers > 0)
  const TensorView* gate_exps = nullptr;  // {n_embd, n_ff_exp, n_expert}
  const TensorView* up_exps = nullptr;    // {n_embd, n_ff_exp, n_expert}
  const TensorView* down_exps = nullptr;  // {n_ff_exp, n_embd, n_expert}
  const TensorView* gate_inp_shexp = nullptr;  // [n_embd]                 shared-expert gate
  const TensorView* gate_shexp = nullptr;      // {n_embd, n_ff_shexp}
  const TensorView* up_shexp = nullptr;        // {n_embd, n_ff_shexp}
  const TensorView* down_shexp = nullptr;      // {n_ff_shexp, n_embd}
};

// Checks a file's tensors against the config: every required tensor present with its shape and
// a supported type, and no tensor the architecture does not use (extra_ok may admit more, e.g. a
// checkpoint's optimizer state). Throws moe::Error naming the tensor.
void ValidateModelTensors(const GgufFile& f, const ModelConfig& c,
                          const std::function<bool(const std::string&)>& extra_ok = nullptr);

class Model {
 public:
  // Maps and validates the file: keys, every tensor's presence, shape and type, and that the
  // file has no tensor the architecture does not use. Throws moe::Error (one line).
  // allow_training_only: accept a training-only router (expert_choice) for inspection; Forward
  // still refuses to run such a model.
  static std::unique_ptr<Model> Load(const std::string& path, bool allow_training_only = false);
  // Serves a parameter store without a file: f32 views into its arrays (which must outlive the
  // model and not be resized), the config and vocabulary read back from a metadata-only GGUF
  // built from the store, exactly as Load would read SaveParams' file.
  static std::unique_ptr<Model> FromParams(const ModelParams<float>& p, bool allow_training_only = false);

  ~Model();
  const ModelConfig& config() const { return config_; }
  const GgufFile& file() const { return *file_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }

  const TensorView* token_embd = nullptr;   // {n_embd, n_vocab}
  const TensorView* output_norm = nullptr;  // [n_embd]
  const TensorView* output = nullptr;       // {n_embd, n_vocab} (token_embd when tied)
  std::vector<LayerWeights> layers;

  // Bytes of weights one generated token reads: the dense part, k routed experts and the
  // shared expert per layer, one embedding row and the whole output matrix (top_p: k = k_max,
  // an upper bound).
  uint64_t BytesPerToken() const;
  // The multiply-adds of one token's weight products over the same tensors (every element of
  // each matrix, and of k experts' three; the embedding is a row lookup, the norms, biases and
  // the selection bias no products; attention over the cache not counted). Prefill and
  // many-stream decode are bound by this over the machine's multiply-add rate.
  uint64_t MacsPerToken() const;
  // Bytes of one routed expert of one layer (gate + up + down).
  uint64_t BytesPerExpert() const;

  // For inference only: rewrites the matrices the forward pass multiplies into the layout the
  // running CPU's kernels stream fastest (kernels::RepackLayout: q8_0, q4_0, q2_K, q3_K, q4_K,
  // q5_K, iq4_xs and q6_K in tiles of 16 rows on AVX-512 VNNI; q5_0 widened exactly into q8_0 tiles), in memory of the
  // model's own, and hands each tensor's file pages back to the
  // kernel once it is copied, so resident memory stays near the file's size. Row() and
  // dequantization mean nothing for a repacked matrix afterwards (the token embedding, which
  // is read by rows, is never repacked). MOE_NO_REPACK=1 in the environment turns it off.
  // Returns the bytes repacked.
  uint64_t RepackForInference(ThreadPool& pool);

 private:
  // Points the weight fields at the tensors `find` returns (nullptr when absent).
  void Bind(const std::function<const TensorView*(const std::string&)>& find);
  // Legacy deepseek2 files: attn_k_b / attn_v_b as f32 copies of attn_kv_b's two parts.
  void SplitKvB(const std::function<const TensorView*(const std::string&)>& find);

  std::vector<uint8_t> meta_;            // FromParams: the metadata-only GGUF behind file_
  std::vector<TensorView> owned_views_;  // FromParams: views into the store
  std::deque<TensorView> repacked_views_;  // RepackForInference: views of repacked_
  std::deque<std::vector<float>> derived_;  // SplitKvB's arrays
  std::deque<TensorView> derived_views_;    // and their views
  std::vector<HugePageBuffer> repacked_;  // the repacked weights, unmapped with the model
  std::unique_ptr<GgufFile> file_;
  ModelConfig config_;
  std::unique_ptr<Tokenizer> tokenizer_;
};

}  // namespace moe
