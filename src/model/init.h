// `moe init`: writes a randomly initialised model of a supported architecture as GGUF that
// llama.cpp loads. Weights are seeded normals scaled so activations stay O(1).
#pragma once

#include <cstdint>
#include <string>

#include "model/config.h"

namespace moe {

struct InitOptions {
  ModelConfig config;            // arch, sizes and router (router_kind, router_top_p,
                                 // router_hash_seed); traits are applied by InitRandomModel.
                                 // Any router may be written, also the training-only
                                 // expert_choice (which moe run then refuses).
  DType type = DType::kF32;      // type of the weight matrices (norms, router, gates stay f32)
  uint64_t seed = 0;
  float logit_scale = 1.0f;      // multiplies the output matrix
  // plant_margin C > 0: output row perm[t] gets C/sqrt(dim) * e_t/|e_t| added (e_t = token t's
  // embedding), so after token t the token perm[t] leads by about C logits. With embd_scale > 1
  // the residual stream stays near e_t, so greedy decoding of quantized models has one clear
  // winner per step and is not decided by rounding noise. (logit_scale alone scales the noise
  // with the margins.)
  float plant_margin = 0.0f;
  float embd_scale = 1.0f;
  bool tie_output = false;       // llama / qwen3moe / deepseek2: no output.weight, reuse token_embd
  uint32_t qk_nope = 0;          // deepseek2: unrotated part of a head (0 = dim / heads); the
                                 // config's n_rot (qk_rope), n_embd_head_v, n_lora_kv, n_ff
                                 // (dense width) and n_ff_shexp default from it when 0
  std::string tokenizer_from;    // copy tokenizer.* keys from this GGUF (vocab = its tokens)
};

// Fills defaults (heads, head dim, ...), validates everything (one-line moe::Error naming the
// flag to change), and writes the file.
void InitRandomModel(InitOptions opt, const std::string& path);

}  // namespace moe
