// ModelConfig: the architecture of a model, exactly what its GGUF keys say (DESIGN.md §8: never
// mixed with run-time settings). Field names follow GGUF's prefix family (n_expert,
// n_expert_used, n_ff_exp, ...). One ArchSpec per supported architecture (architectures.cc)
// maps between ModelConfig, GGUF keys and the tensor list.
//
// The router and the expert options are stored with these keys. llama.cpp's own keys, written
// only when they differ from the architecture's default:
//   <arch>.expert_gating_func       u32 (0 arch default, 1 softmax, 2 sigmoid): 2 for sigmoid_bias;
//                                   2 without expert_router reads as sigmoid_bias
//   <arch>.expert_group_count       u32, group-limited top-k (DeepSeek-V3 n_group; llama.cpp
//                                   applies it for every architecture)
//   <arch>.expert_group_used_count  u32, groups that compete (topk_group), 1..groups-1
//   <arch>.expert_weights_scale     f32, multiplies the gate weights (routed_scaling_factor)
//   <arch>.expert_shared_count      u32, shared experts (stored fused as one FFN of width
//                                   n_ff_shexp, as DeepSeek's files store them: the sum of S
//                                   SwiGLU experts is one SwiGLU with their rows concatenated)
// and moe.cpp's own (llama.cpp ignores unknown keys):
//   <arch>.expert_router            string, one of MoeRouterNames(); absent = softmax_topk
//   <arch>.expert_router_top_p      f32, top_p only (absent = 0.4)
//   <arch>.expert_router_hash_seed  u64 (u32 also read), hash only (absent = 0)
//   <arch>.expert_null_count        u32, AdaMoE null experts
//   <arch>.expert_zero_count / expert_copy_count / expert_const_count
//                                   u32, MoE++ zero-computation experts
//   <arch>.expert_gating_residual   bool, MoE++ gating residuals (layer > 0: logits += W_g prev)
// The router scores R = n_expert + null + zero + copy + const targets, so ffn_gate_inp is
// {n_embd, R}. Extra tensors: blk.N.exp_probs_b.bias [n_expert] (sigmoid_bias: selection-only
// bias, as DeepSeek-V3 in llama.cpp), blk.N.ffn_zc_mix.weight {n_embd, 2, n_const} and
// blk.N.ffn_zc_const.weight {n_embd, n_const} (constant experts), blk.N.ffn_gate_res.weight
// {R, R} (gating residual, layers 1..n-1). hash has no learned router: ffn_gate_inp is optional
// and ignored. WriteConfig writes a key only when it differs from the default, so files of the
// architectures' default routing are byte-identical to before. LlamaCppDifference says when
// llama.cpp would compute another model from a file (it hard-codes softmax top-k for these
// architectures).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "formats/gguf.h"
#include "moe/moe_config.h"
#include "tensor/dtype.h"

namespace moe {

enum class Arch { kLlama, kQwen2Moe, kQwen3Moe, kOlmoe, kDeepseek2 };
enum class RopeType { kNorm, kNeox };  // adjacent pairs (llama) | split halves (qwen, olmoe)
enum class RopeScalingType { kNone, kLinear, kYarn };
enum class QkNorm { kNone, kPerHead, kFull };  // qwen3moe: per head over head_dim; olmoe: whole Q/K

struct ModelConfig {
  Arch arch = Arch::kLlama;
  std::string arch_name = "llama";  // general.architecture

  uint32_t n_layer = 0;
  uint32_t n_embd = 0;
  uint32_t n_head = 0;
  uint32_t n_head_kv = 0;
  uint32_t n_embd_head_k = 0;  // head dim of Q/K
  uint32_t n_embd_head_v = 0;  // head dim of V
  uint32_t n_rot = 0;          // rotated dims per head
  uint32_t n_ctx_train = 0;
  uint32_t n_vocab = 0;
  uint32_t n_ff = 0;           // <arch>.feed_forward_length (dense / llama expert width)

  uint32_t n_expert = 0;
  uint32_t n_expert_used = 0;
  uint32_t n_ff_exp = 0;       // width of one routed expert
  uint32_t n_ff_shexp = 0;     // width of the shared expert (0 = none)

  float rms_eps = 1e-5f;
  float rope_freq_base = 10000.0f;

  // RoPE scaling (<arch>.rope.scaling.*) as llama.cpp applies it (kernels::RopeScaling, made by
  // RopeScalingOf in forward.cc).
  RopeScalingType rope_scaling = RopeScalingType::kNone;
  float rope_scaling_factor = 1.0f;  // rope.scaling.factor (positions divided by it; 1 = none)
  float rope_attn_factor = 1.0f;     // rope.scaling.attn_factor
  uint32_t n_ctx_orig_yarn = 0;      // rope.scaling.original_context_length (0 = n_ctx_train)
  float rope_yarn_log_mul = 0.0f;    // rope.scaling.yarn_log_multiplier as stored (0.1 * mscale_all_dim)
  float yarn_beta_fast = 32.0f;      // rope.scaling.yarn_beta_fast
  float yarn_beta_slow = 1.0f;       // rope.scaling.yarn_beta_slow

  // deepseek2 (multi-head latent attention; 0 elsewhere). The MLA head sizes are n_embd_head_k
  // (= qk_nope + qk_rope, the key_length_mla key) and n_embd_head_v (value_length_mla); n_rot is
  // qk_rope. Files store key_length = kv_lora + qk_rope and value_length = kv_lora (the latent
  // cache's "head" as MQA).
  uint32_t n_lora_q = 0;             // attention.q_lora_rank (0: plain attn_q)
  uint32_t n_lora_kv = 0;            // attention.kv_lora_rank
  bool mla_kv_b_legacy = false;      // one attn_kv_b per layer instead of attn_k_b + attn_v_b
  uint32_t n_layer_dense_lead = 0;   // leading_dense_block_count: blocks with a dense FFN (n_ff)
  bool expert_weights_norm = false;  // renormalise the top-k weights (deepseek2 reads the key)

  // Architecture traits (fixed per arch, not stored as keys).
  RopeType rope_type = RopeType::kNorm;
  QkNorm qk_norm = QkNorm::kNone;
  bool qkv_bias = false;          // qwen2moe: optional Q/K/V biases
  bool shared_expert_gate = false;  // qwen2moe: sigmoid(ffn_gate_inp_shexp . x) scales shexp

  // Router by name (keys above). expert_choice is training-only: ReadConfig refuses it unless
  // the caller only inspects the file.
  MoeRouterKind router_kind = MoeRouterKind::kSoftmaxTopK;
  float router_top_p = 0.4f;      // top_p: cumulative probability threshold, in (0, 1]
  uint64_t router_hash_seed = 0;  // hash: seed of HashExperts
  uint32_t n_expert_groups = 0;   // group-limited top-k: groups (0 or 1 = off)
  uint32_t n_group_used = 0;      // groups that compete
  float expert_weights_scale = 1.0f;
  uint32_t n_expert_shared = 0;   // shared experts, fused into one FFN of width n_ff_shexp
  uint32_t n_expert_null = 0;     // AdaMoE null experts
  uint32_t n_expert_zero = 0;     // MoE++ zero-computation experts
  uint32_t n_expert_copy = 0;
  uint32_t n_expert_const = 0;
  bool expert_gating_residual = false;

  // The MoE layer of every block, derived from the fields above by ApplyArchTraits: the router
  // (routing.h) and the inference forward read only this. Loss weights and training-only options
  // keep their defaults; the trainer sets them from its own config.
  MoeLayerConfig moe;

  bool is_mla() const { return arch == Arch::kDeepseek2; }
  uint32_t qk_nope() const { return n_embd_head_k - n_rot; }  // deepseek2: unrotated part of a head
  uint32_t n_q() const { return n_head * n_embd_head_k; }     // Q width
  uint32_t n_k() const { return n_head_kv * n_embd_head_k; }  // K width (not MLA)
  uint32_t n_v() const { return n_head_kv * n_embd_head_v; }  // V width (not MLA)
  // Floats one position of one layer's cache holds: K and V, or MLA's latent (kv_lora) and its
  // rotated key part (qk_rope), which every head shares.
  uint32_t KvFloatsPerLayer() const { return is_mla() ? n_lora_kv + n_rot : n_k() + n_v(); }
  // Bytes the KV cache (f32, every layer) holds per position.
  // bytes_per_element: 4 for an F32 cache, 2 for F16.
  uint64_t KvBytesPerPosition(uint64_t bytes_per_element = sizeof(float)) const {
    return uint64_t{n_layer} * KvFloatsPerLayer() * bytes_per_element;
  }
  // Whether block il has the routed experts (deepseek2's leading blocks are dense).
  bool IsMoeLayer(uint32_t il) const { return il >= n_layer_dense_lead; }
  uint32_t n_router() const { return static_cast<uint32_t>(moe.router_width()); }  // R
};

// How a tensor of an architecture is used: decides its dtype in `moe init` and which checks
// apply (norms, routers and gates stay F32, as llama-quantize leaves them).
enum class TensorRole {
  kNorm, kBias, kMatrix, kRouter, kExperts, kEmbedding, kOutput,
  kGate,      // 1-D gate vector (qwen2moe's shared-expert gate)
  kRouterAux, // small f32 matrices of the router: constant experts' W_c and v, gating residual
};

struct TensorSpec {
  std::string name;             // GGUF name, e.g. "blk.3.ffn_up_exps.weight"
  std::vector<int64_t> ne;      // expected shape, ggml order
  TensorRole role;
  bool optional = false;
};

// Parses an architecture name; returns false if moe.cpp does not support it.
bool ParseArch(const std::string& name, Arch* out);
const char* ArchName(Arch a);

// Reads and validates the config from GGUF keys (throws moe::Error naming the key). A
// training-only router (expert_choice) is an error unless allow_training_only (moe inspect).
ModelConfig ReadConfig(const GgufFile& f, bool allow_training_only = false);
// Why a forward pass cannot serve this config's router, or "" when it can (expert_choice: each
// expert picks tokens from the whole batch, which generation does not have).
std::string UnservableRouterReason(const ModelConfig& c);
// Writes every key llama.cpp needs for this architecture, with the exact types it checks.
void WriteConfig(const ModelConfig& c, GgufWriter& w);
// Fills the architecture traits (rope type, norms, routing) for c.arch, and c.moe from the
// sizes, the router fields and the expert options.
void ApplyArchTraits(ModelConfig& c);
// Why llama.cpp would compute a different model from a file of this config (a router or expert
// option it does not implement for the architecture), or "" when it computes the same one.
std::string LlamaCppDifference(const ModelConfig& c);
// Checks that the hyper-parameters are self-consistent; throws moe::Error on the first problem.
void ValidateConfig(const ModelConfig& c);
// The tensors a model of this config has, in the order moe writes them.
std::vector<TensorSpec> ExpectedTensors(const ModelConfig& c, bool with_output, bool with_qkv_bias);

}  // namespace moe
