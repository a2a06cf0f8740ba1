// `moe init`: writes a randomly initialised model of a supported architecture as GGUF that
// llama.cpp loads. Weights are seeded normals scaled so activations stay O(1).
#pragma once

#include <cstdint>
#include <string>

#include "model/config.h"

namespace moe {

struct InitOptions {
  ModelConfig config;            // arch and sizes; traits are applied by InitRandomModel
  DType type = DType::kF32;      // type of the weight matrices (norms, router, gates stay f32)
  uint64_t seed = 0;
  float logit_scale = 1.0f;      // multiplies the output matrix: large values plant big margins
  bool tie_output = false;       // llama / qwen3moe only: no output.weight, reuse token_embd
  std::string tokenizer_from;    // copy tokenizer.* keys from this GGUF (vocab = its tokens)
};

// Fills defaults (heads, head dim, ...), validates everything (one-line moe::Error naming the
// flag to change), and writes the file.
void InitRandomModel(InitOptions opt, const std::string& path);

}  // namespace moe
