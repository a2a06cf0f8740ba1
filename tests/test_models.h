// Small random models for tests, written by `moe init`'s code (InitRandomModel): an MoE block of
// 6 experts, 2 used, a vocabulary of 300 and a training context of 128 unless changed.
#pragma once

#include <cstdint>
#include <string>

#include "model/init.h"
#include "test_dir.h"

namespace moe {

inline InitOptions TestModelOptions(Arch arch, DType type, uint32_t layers, uint32_t dim, uint32_t ffn, uint32_t heads,
                                    uint32_t kv_heads, uint64_t seed) {
  InitOptions o;
  o.config.arch = arch;
  o.config.n_layer = layers;
  o.config.n_embd = dim;
  o.config.n_ff_exp = ffn;
  o.config.n_expert = 6;
  o.config.n_expert_used = 2;
  o.config.n_head = heads;
  o.config.n_head_kv = kv_heads;
  o.config.n_vocab = 300;
  o.config.n_ctx_train = 128;
  o.type = type;
  o.seed = seed;
  return o;
}

// Writes the model to TestDir(folder)/name.gguf and returns the path.
inline std::string WriteTestModel(const InitOptions& o, const std::string& folder, const std::string& name) {
  const std::string path = TestDir(folder) + "/" + name + ".gguf";
  InitRandomModel(o, path);
  return path;
}

}  // namespace moe
