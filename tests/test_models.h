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

// A deepseek2 model: 3 blocks (the first dense), MLA with 4 heads, qk_nope 32, qk_rope 16, v 32,
// kv_lora 64, 8 experts (2 used) and 2 shared; optionally the q_lora bottleneck, the legacy
// attn_kv_b layout or V3 routing (sigmoid + bias, 4 groups, 2 used, normalised, scale 2.5).
inline InitOptions DeepseekTestOptions(DType type, uint32_t q_lora, bool legacy, bool v3 = false) {
  InitOptions o = TestModelOptions(Arch::kDeepseek2, type, 3, 128, 64, 4, 0, 43);
  ModelConfig& c = o.config;
  c.n_expert = 8;
  o.qk_nope = 32;
  c.n_rot = 16;
  c.n_embd_head_v = 32;
  c.n_lora_kv = 64;
  c.n_lora_q = q_lora;
  c.n_layer_dense_lead = 1;
  c.n_expert_shared = 2;
  c.mla_kv_b_legacy = legacy;
  if (v3) {
    c.router_kind = MoeRouterKind::kSigmoidBias;
    c.expert_weights_norm = true;
    c.n_expert_groups = 4;
    c.n_group_used = 2;
    c.expert_weights_scale = 2.5f;
  }
  return o;
}

// Writes the model to TestDir(folder)/name.gguf and returns the path.
inline std::string WriteTestModel(const InitOptions& o, const std::string& folder, const std::string& name) {
  const std::string path = TestDir(folder) + "/" + name + ".gguf";
  InitRandomModel(o, path);
  return path;
}

}  // namespace moe
