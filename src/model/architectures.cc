// The supported architectures: their GGUF keys, traits and tensor lists, one section each.
// Facts from llama.cpp's loaders (src/models/<arch>.cpp); see ../shared/GGUF-MOE.md §4-6.
#include <cmath>
#include <optional>
#include <string>

#include "model/config.h"
#include "util/error.h"

namespace moe {

namespace {

struct ArchInfo {
  Arch arch;
  const char* name;
};
constexpr ArchInfo kArchs[] = {
    {Arch::kLlama, "llama"},
    {Arch::kQwen2Moe, "qwen2moe"},
    {Arch::kQwen3Moe, "qwen3moe"},
    {Arch::kOlmoe, "olmoe"},
    {Arch::kDeepseek2, "deepseek2"},
};

std::string Key(const ModelConfig& c, const char* suffix) { return c.arch_name + "." + suffix; }

uint32_t ReadUniform(const GgufFile& f, const std::string& key, uint32_t n_layer, bool required,
                     uint32_t fallback) {
  auto v = f.GetPerLayerOpt(key, n_layer);
  if (!v) {
    if (required) f.Throw("required key '" + key + "' is missing");
    return fallback;
  }
  for (uint32_t x : *v) {
    if (x != (*v)[0])
      f.Throw("key '" + key + "' varies per layer; moe.cpp supports one value for all layers");
  }
  return v->empty() ? fallback : (*v)[0];
}

}  // namespace

bool ParseArch(const std::string& name, Arch* out) {
  for (const ArchInfo& a : kArchs) {
    if (name == a.name) {
      *out = a.arch;
      return true;
    }
  }
  return false;
}

const char* ArchName(Arch a) {
  for (const ArchInfo& i : kArchs)
    if (i.arch == a) return i.name;
  return "?";
}

void ApplyArchTraits(ModelConfig& c) {
  c.arch_name = ArchName(c.arch);
  bool norm_topk = false;
  switch (c.arch) {
    case Arch::kLlama:  // Mixtral: softmax -> top-k -> renormalise; RoPE on adjacent pairs
      c.rope_type = RopeType::kNorm;
      c.qk_norm = QkNorm::kNone;
      norm_topk = true;
      c.shared_expert_gate = false;
      break;
    case Arch::kQwen2Moe:  // no renormalisation; sigmoid-gated shared expert
      c.rope_type = RopeType::kNeox;
      c.qk_norm = QkNorm::kNone;
      norm_topk = false;
      c.shared_expert_gate = true;
      break;
    case Arch::kQwen3Moe:  // per-head Q/K RMSNorm; renormalised top-k
      c.rope_type = RopeType::kNeox;
      c.qk_norm = QkNorm::kPerHead;
      norm_topk = true;
      c.shared_expert_gate = false;
      break;
    case Arch::kOlmoe:  // Q/K RMSNorm over the whole projection; no renormalisation
      c.rope_type = RopeType::kNeox;
      c.qk_norm = QkNorm::kFull;
      norm_topk = false;
      c.shared_expert_gate = false;
      break;
    case Arch::kDeepseek2:  // MLA; RoPE on adjacent pairs of the qk_rope part; the file says
      c.rope_type = RopeType::kNorm;  // whether the top-k weights are renormalised
      c.qk_norm = QkNorm::kNone;
      norm_topk = c.expert_weights_norm;
      c.shared_expert_gate = false;
      break;
  }
  MoeLayerConfig& m = c.moe;
  m.d_model = static_cast<int>(c.n_embd);
  m.d_ff = static_cast<int>(c.n_ff_exp);
  m.n_expert = static_cast<int>(c.n_expert);
  m.router = c.router_kind;
  // expert_choice represents its choices with one slot per expert.
  m.k = c.router_kind == MoeRouterKind::kExpertChoice ? m.n_expert : static_cast<int>(c.n_expert_used);
  // The architecture's normalisation (top_p too); hash and expert choice weigh without it.
  m.norm_topk = norm_topk && c.router_kind != MoeRouterKind::kHash &&
                c.router_kind != MoeRouterKind::kExpertChoice;
  m.weights_scale = c.expert_weights_scale;
  m.n_group = c.n_expert_groups > 1 ? static_cast<int>(c.n_expert_groups) : 0;
  m.topk_group = c.n_expert_groups > 1 ? static_cast<int>(c.n_group_used) : 0;
  m.hash_seed = c.router_hash_seed;
  m.top_p = c.router_top_p;
  m.n_null = static_cast<int>(c.n_expert_null);
  m.n_zero = static_cast<int>(c.n_expert_zero);
  m.n_copy = static_cast<int>(c.n_expert_copy);
  m.n_const = static_cast<int>(c.n_expert_const);
  m.gating_residual = c.expert_gating_residual;
  m.n_shared = c.n_ff_shexp > 0 ? 1 : 0;  // S shared experts are one fused FFN (config.h)
  m.d_ff_shared = static_cast<int>(c.n_ff_shexp);
  m.shared_gate = c.shared_expert_gate && c.n_ff_shexp > 0;
}

std::string LlamaCppDifference(const ModelConfig& c) {
  std::vector<std::string> why;
  // deepseek2's loader reads the gating function, the weights' scale and normalisation and the
  // shared experts; the other architectures hard-code softmax top-k.
  const bool deepseek = c.arch == Arch::kDeepseek2;
  if (c.router_kind != MoeRouterKind::kSoftmaxTopK && !(deepseek && c.router_kind == MoeRouterKind::kSigmoidBias))
    why.push_back(std::string("router ") + MoeRouterName(c.router_kind));
  if (c.expert_weights_scale != 1.0f && !deepseek) why.push_back("expert_weights_scale");
  if (c.n_expert_null > 0) why.push_back("null experts");
  if (c.n_expert_zero + c.n_expert_copy + c.n_expert_const > 0) why.push_back("zero-computation experts");
  if (c.expert_gating_residual) why.push_back("gating residuals");
  if (c.n_ff_shexp > 0 && c.arch != Arch::kQwen2Moe && !deepseek) why.push_back("shared experts on " + c.arch_name);
  std::string s;
  for (const std::string& w : why) s += (s.empty() ? "" : ", ") + w;
  if (!s.empty()) s += ": llama.cpp computes " + c.arch_name + " models with its own fixed routing";
  return s;
}

std::string UnservableRouterReason(const ModelConfig& c) {
  if (c.router_kind == MoeRouterKind::kExpertChoice)
    return "model router expert_choice is training-only (each expert picks tokens from the whole "
           "batch): moe run cannot serve it; export the model with a token-choice router";
  return "";
}

void ValidateConfig(const ModelConfig& c) {
  auto need = [](bool ok, const std::string& msg) {
    if (!ok) throw Error(msg);
  };
  need(c.n_layer >= 1 && c.n_layer <= 4096, StrFormat("block_count %u must be in 1..4096", c.n_layer));
  need(c.n_embd >= 1 && c.n_embd <= (1u << 20), StrFormat("embedding_length %u must be in 1..1048576", c.n_embd));
  need(c.n_head >= 1, "attention.head_count must be >= 1");
  need(c.n_head_kv >= 1 && c.n_head % c.n_head_kv == 0,
       StrFormat("attention.head_count (%u) must be a multiple of head_count_kv (%u)", c.n_head,
                 c.n_head_kv));
  if (c.is_mla()) {
    need(c.n_lora_kv >= 1 && c.n_lora_kv <= 65536, StrFormat("attention.kv_lora_rank %u must be in 1..65536", c.n_lora_kv));
    need(c.n_lora_q <= 65536, StrFormat("attention.q_lora_rank %u must be at most 65536", c.n_lora_q));
    need(c.n_rot >= 2 && c.n_rot % 2 == 0 && c.n_rot < c.n_embd_head_k,
         StrFormat("rope.dimension_count (qk_rope, %u) must be even, >= 2 and less than the MLA key head "
                   "dimension qk_nope + qk_rope (%u)", c.n_rot, c.n_embd_head_k));
    need(c.n_embd_head_v >= 1, "the MLA value head dimension (value_length_mla) must be >= 1");
    need(c.n_embd_head_k <= 4096 && c.n_embd_head_v <= 4096, "MLA head dimensions must be at most 4096");
    need(c.n_layer_dense_lead < c.n_layer,
         StrFormat("leading_dense_block_count %u leaves no MoE block of %u", c.n_layer_dense_lead, c.n_layer));
    need(c.n_layer_dense_lead == 0 || c.n_ff >= 1, "leading dense blocks need feed_forward_length >= 1");
    need(c.n_layer_dense_lead == 0 || !c.expert_gating_residual,
         "gating residuals need a router in every block, but leading_dense_block_count is set");
    need(c.n_expert_shared >= 1, "deepseek2 needs expert_shared_count >= 1 (--shared-experts)");
    need(c.n_ff_shexp == c.n_ff_exp * c.n_expert_shared,
         StrFormat("deepseek2's shared experts are expert_shared_count x expert_feed_forward_length wide "
                   "(%u x %u), not %u", c.n_expert_shared, c.n_ff_exp, c.n_ff_shexp));
  } else {
    need(c.n_embd_head_k >= 2 && c.n_embd_head_k % 2 == 0,
         StrFormat("head dimension %u must be even and >= 2", c.n_embd_head_k));
    need(c.n_layer_dense_lead == 0, "leading dense blocks are supported for deepseek2 only");
    need(c.n_embd_head_v == c.n_embd_head_k,
         StrFormat("key_length (%u) != value_length (%u) is not supported for %s", c.n_embd_head_k,
                   c.n_embd_head_v, c.arch_name.c_str()));
    need(c.n_rot == c.n_embd_head_k,
         StrFormat("rope.dimension_count (%u) must equal the head dimension (%u) for %s", c.n_rot,
                   c.n_embd_head_k, c.arch_name.c_str()));
  }
  need(std::isfinite(c.rope_scaling_factor) && c.rope_scaling_factor > 0 && c.rope_scaling_factor <= 1e6,
       StrFormat("rope.scaling.factor %g must be in (0, 1e6]", c.rope_scaling_factor));
  need(std::isfinite(c.rope_yarn_log_mul) && std::fabs(c.rope_yarn_log_mul) <= 100,
       StrFormat("rope.scaling.yarn_log_multiplier %g is out of range", c.rope_yarn_log_mul));
  need(std::isfinite(c.yarn_beta_fast) && std::isfinite(c.yarn_beta_slow) && c.yarn_beta_fast > 0 && c.yarn_beta_slow > 0,
       "rope.scaling.yarn_beta_fast and yarn_beta_slow must be > 0");
  need(c.n_vocab >= 1, "vocab_size must be >= 1");
  need(c.n_expert >= 1 && c.n_expert <= 512,
       StrFormat("expert_count %u must be in 1..512 (dense models are not MoE)", c.n_expert));
  need(c.n_expert_used >= 1 && c.n_expert_used <= c.n_expert,
       StrFormat("expert_used_count %u must be in 1..expert_count (%u)", c.n_expert_used,
                 c.n_expert));
  need(c.n_ff_exp >= 1, "expert feed-forward length must be >= 1");
  // Ranges no real model leaves, which otherwise give NaN or constant logits: epsilons up to
  // 0.1 (models use 1e-6 .. 1e-5), frequency bases of at least 1 (models use 1e4 .. 1e8).
  need(std::isfinite(c.rms_eps) && c.rms_eps > 0 && c.rms_eps <= 0.1f,
       StrFormat("layer_norm_rms_epsilon %g must be in (0, 0.1]", c.rms_eps));
  need(std::isfinite(c.rope_freq_base) && c.rope_freq_base >= 1.0f,
       StrFormat("rope.freq_base %g must be a finite number >= 1", c.rope_freq_base));
  need(c.n_ctx_train >= 1, "context_length must be >= 1");
  if (c.arch == Arch::kQwen2Moe || c.arch == Arch::kOlmoe) {
    need(c.n_head * c.n_embd_head_k == c.n_embd,
         StrFormat("%s needs head_count x head dim (%u x %u) == embedding_length (%u)",
                   c.arch_name.c_str(), c.n_head, c.n_embd_head_k, c.n_embd));
  }
  if (c.arch == Arch::kOlmoe) {
    // llama.cpp's olmoe loader gives attn_k_norm n_embd entries, so K must be n_embd wide.
    need(c.n_head_kv == c.n_head,
         StrFormat("olmoe normalises K over n_embd: head_count_kv (%u) must equal head_count (%u)",
                   c.n_head_kv, c.n_head));
  }
  if (c.arch == Arch::kQwen2Moe) need(c.n_ff_shexp >= 1, "qwen2moe needs a shared expert (--shared-ffn)");
  if (c.router_kind == MoeRouterKind::kTopP)
    need(std::isfinite(c.router_top_p) && c.router_top_p > 0 && c.router_top_p <= 1,
         StrFormat("expert_router_top_p %g must be in (0, 1] (--top-p)", c.router_top_p));
  need(std::isfinite(c.expert_weights_scale) && c.expert_weights_scale > 0,
       StrFormat("expert_weights_scale %g must be > 0", c.expert_weights_scale));
  const bool softmax_router = c.router_kind == MoeRouterKind::kSoftmaxTopK || c.router_kind == MoeRouterKind::kTopP;
  const uint32_t n_zc = c.n_expert_null + c.n_expert_zero + c.n_expert_copy + c.n_expert_const;
  need(n_zc <= 512, StrFormat("%u null and zero-computation experts: at most 512", n_zc));
  need(n_zc == 0 || softmax_router,
       StrFormat("null and zero-computation experts need router softmax_topk or top_p, not %s",
                 MoeRouterName(c.router_kind)));
  need(!c.expert_gating_residual || softmax_router,
       StrFormat("gating residuals need router softmax_topk or top_p, not %s", MoeRouterName(c.router_kind)));
  need(c.n_expert_used <= c.n_expert + n_zc,
       StrFormat("expert_used_count %u is more than the router's %u targets", c.n_expert_used, c.n_expert + n_zc));
  if (c.n_expert_groups > 1) {
    need(c.router_kind == MoeRouterKind::kSoftmaxTopK || c.router_kind == MoeRouterKind::kSigmoidBias,
         StrFormat("expert groups need router softmax_topk or sigmoid_bias, not %s", MoeRouterName(c.router_kind)));
    need(n_zc == 0, "expert groups do not combine with null or zero-computation experts");
    need(c.n_expert % c.n_expert_groups == 0,
         StrFormat("expert_count %u is not a multiple of expert_group_count %u", c.n_expert, c.n_expert_groups));
    // llama.cpp asserts (aborts) unless groups < experts and 0 < used < groups.
    need(c.n_expert_groups < c.n_expert,
         StrFormat("expert_group_count %u must be less than expert_count %u", c.n_expert_groups, c.n_expert));
    need(c.n_group_used >= 1 && c.n_group_used < c.n_expert_groups,
         StrFormat("expert_group_used_count %u must be in 1..expert_group_count-1 (%u groups; all groups is no limit)",
                   c.n_group_used, c.n_expert_groups));
    need(c.n_group_used * (c.n_expert / c.n_expert_groups) >= c.n_expert_used,
         StrFormat("expert_group_used_count %u groups of %u experts hold fewer than expert_used_count %u",
                   c.n_group_used, c.n_expert / c.n_expert_groups, c.n_expert_used));
  }
  need(c.n_expert_shared == 0 || c.n_ff_shexp > 0, "expert_shared_count is set but there is no shared expert");
  need(c.n_expert_shared == 0 || c.n_ff_shexp % c.n_expert_shared == 0,
       StrFormat("shared expert width %u is not a multiple of expert_shared_count %u", c.n_ff_shexp, c.n_expert_shared));
  ModelConfig derived = c;  // the layer config derived from the fields (a safety net: the checks
  ApplyArchTraits(derived); // above name the keys)
  ValidateMoeConfig(derived.moe);
}

namespace {

// The router keys (config.h): expert_router, its parameters and llama.cpp's expert_gating_func.
void ReadRouter(const GgufFile& f, ModelConfig& c) {
  const std::string router_key = Key(c, "expert_router");
  const std::optional<std::string> name = f.GetStringOpt(router_key);
  if (name && !ParseMoeRouterKind(*name, &c.router_kind))
    f.Throw("key '" + router_key + "' names router '" + *name + "', which moe.cpp does not know (use one of: " +
            MoeRouterNames() + ")");
  const std::string gating_key = Key(c, "expert_gating_func");
  if (auto g = f.GetU32Opt(gating_key)) {
    const bool sigmoid_router = c.router_kind == MoeRouterKind::kSigmoidBias;
    if (*g == 2 && !name) {
      c.router_kind = MoeRouterKind::kSigmoidBias;
    } else if (*g == 2 && !sigmoid_router) {
      f.Throw(StrFormat("key '%s' = 2 (sigmoid) contradicts '%s' = %s: sigmoid gating is router sigmoid_bias",
                        gating_key.c_str(), router_key.c_str(), name->c_str()));
    } else if (*g == 1 && sigmoid_router) {
      f.Throw(StrFormat("key '%s' = 1 (softmax) contradicts '%s' = sigmoid_bias (which needs 2)",
                        gating_key.c_str(), router_key.c_str()));
    } else if (*g > 2) {
      f.Throw(StrFormat("key '%s' = %u is not supported (moe.cpp has 0 or 1 softmax, 2 sigmoid)",
                        gating_key.c_str(), *g));
    }
  }
  const std::string top_p_key = Key(c, "expert_router_top_p");
  const std::string seed_key = Key(c, "expert_router_hash_seed");
  auto only_for = [&](const std::string& key, MoeRouterKind kind) {
    if (f.Has(key) && c.router_kind != kind)
      f.Throw(StrFormat("key '%s' applies to router %s, but the model's router is %s", key.c_str(),
                        MoeRouterName(kind), MoeRouterName(c.router_kind)));
  };
  only_for(top_p_key, MoeRouterKind::kTopP);
  only_for(seed_key, MoeRouterKind::kHash);
  if (c.router_kind == MoeRouterKind::kTopP) c.router_top_p = f.GetF32Opt(top_p_key).value_or(0.4f);
  if (const GgufValue* v = f.Find(seed_key)) {
    if (v->type != GgufType::kU64 && v->type != GgufType::kU32)
      f.Throw(StrFormat("key '%s' has type %s but expected u64 (or u32)", seed_key.c_str(),
                        GgufTypeName(v->type)));
    c.router_hash_seed = v->num.u64;
  }
  auto u32 = [&](const char* suffix) { return f.GetU32Opt(Key(c, suffix)).value_or(0); };
  c.n_expert_groups = u32("expert_group_count");
  c.n_group_used = u32("expert_group_used_count");
  if (c.n_expert_groups <= 1 && f.Has(Key(c, "expert_group_used_count")) && c.n_group_used != 0 &&
      c.n_group_used != c.n_expert_groups)
    f.Throw("key '" + Key(c, "expert_group_used_count") + "' is set without expert_group_count > 1");
  c.expert_weights_scale = f.GetF32Opt(Key(c, "expert_weights_scale")).value_or(1.0f);
  if (c.expert_weights_scale == 0.0f) c.expert_weights_scale = 1.0f;  // llama.cpp: 0 = not set
  // expert_weights_norm: deepseek2 reads it; llama.cpp ignores it for the other architectures
  // (their normalisation is fixed), so moe.cpp does too.
  if (c.arch == Arch::kDeepseek2)
    c.expert_weights_norm = f.GetBoolOpt(Key(c, "expert_weights_norm")).value_or(false);
  c.n_expert_shared = u32("expert_shared_count");
  c.n_expert_null = u32("expert_null_count");
  c.n_expert_zero = u32("expert_zero_count");
  c.n_expert_copy = u32("expert_copy_count");
  c.n_expert_const = u32("expert_const_count");
  c.expert_gating_residual = f.GetBoolOpt(Key(c, "expert_gating_residual")).value_or(false);
}

// rope.scaling.*: none (or absent), linear or yarn, with llama.cpp's defaults.
void ReadRopeScaling(const GgufFile& f, ModelConfig& c) {
  const std::string type = f.GetStringOpt(Key(c, "rope.scaling.type")).value_or("none");
  if (type == "none") {
    c.rope_scaling = RopeScalingType::kNone;
  } else if (type == "linear") {
    c.rope_scaling = RopeScalingType::kLinear;
  } else if (type == "yarn") {
    c.rope_scaling = RopeScalingType::kYarn;
  } else {
    f.Throw("rope.scaling.type '" + type + "' is not supported (none, linear or yarn)");
  }
  c.rope_scaling_factor = f.GetF32Opt(Key(c, "rope.scaling.factor")).value_or(0.0f);
  if (c.rope_scaling_factor == 0.0f) c.rope_scaling_factor = 1.0f;  // llama.cpp: 0 = not set
  c.rope_attn_factor = f.GetF32Opt(Key(c, "rope.scaling.attn_factor")).value_or(1.0f);
  c.n_ctx_orig_yarn = f.GetU32Opt(Key(c, "rope.scaling.original_context_length")).value_or(0);
  if (!std::isfinite(c.rope_attn_factor) || c.rope_attn_factor <= 0 || c.rope_attn_factor > 100)
    f.Throw(StrFormat("rope.scaling.attn_factor %g must be in (0, 100]", c.rope_attn_factor));
}

// deepseek2's attention and FFN keys (GGUF-MOE.md, deepseek2).
void ReadMla(const GgufFile& f, ModelConfig& c) {
  c.n_lora_kv = f.GetU32(Key(c, "attention.kv_lora_rank"));
  c.n_lora_q = f.GetU32Opt(Key(c, "attention.q_lora_rank")).value_or(0);
  if (!f.Has(Key(c, "rope.dimension_count")))
    f.Throw("required key '" + Key(c, "rope.dimension_count") + "' (qk_rope) is missing");
  const auto k_mla = f.GetU32Opt(Key(c, "attention.key_length_mla"));
  const auto v_mla = f.GetU32Opt(Key(c, "attention.value_length_mla"));
  if (k_mla.has_value() != v_mla.has_value())
    f.Throw("keys attention.key_length_mla and attention.value_length_mla must be given together");
  if (k_mla) {  // split attn_k_b / attn_v_b; the latent cache is one MQA head of kv_lora + qk_rope
    c.mla_kv_b_legacy = false;
    c.n_embd_head_k = *k_mla;
    c.n_embd_head_v = *v_mla;
    if (const auto kl = f.GetU32Opt(Key(c, "attention.key_length")); kl && *kl != c.n_lora_kv + c.n_rot)
      f.Throw(StrFormat("key '%s' = %u, but MLA caches kv_lora_rank + qk_rope = %u per token",
                        Key(c, "attention.key_length").c_str(), *kl, c.n_lora_kv + c.n_rot));
    if (const auto vl = f.GetU32Opt(Key(c, "attention.value_length")); vl && *vl != c.n_lora_kv)
      f.Throw(StrFormat("key '%s' = %u, but MLA's values are the kv_lora_rank = %u latent",
                        Key(c, "attention.value_length").c_str(), *vl, c.n_lora_kv));
    if (c.n_head_kv != 1)
      f.Throw(StrFormat("key '%s' = %u: MLA with attn_k_b/attn_v_b is one shared latent head (1)",
                        Key(c, "attention.head_count_kv").c_str(), c.n_head_kv));
  } else {  // legacy attn_kv_b: key_length / value_length are the heads' own sizes
    c.mla_kv_b_legacy = true;
  }
  c.n_layer_dense_lead = f.GetU32Opt(Key(c, "leading_dense_block_count")).value_or(0);
  c.n_ff_exp = ReadUniform(f, Key(c, "expert_feed_forward_length"), c.n_layer, true, 0);
  // rope.scaling.yarn_log_multiplier is stored as 0.1 * mscale_all_dim (the converter's factor,
  // which llama.cpp divides out again).
  c.rope_yarn_log_mul = f.GetF32Opt(Key(c, "rope.scaling.yarn_log_multiplier")).value_or(0.0f);
}

}  // namespace

ModelConfig ReadConfig(const GgufFile& f, bool allow_training_only) {
  ModelConfig c;
  c.arch_name = f.GetString("general.architecture");
  if (!ParseArch(c.arch_name, &c.arch))
    f.Throw("general.architecture '" + c.arch_name +
            "' is not supported (supported: llama, qwen2moe, qwen3moe, olmoe, deepseek2)");
  ApplyArchTraits(c);
  c.n_layer = f.GetU32(Key(c, "block_count"));
  c.n_embd = f.GetU32(Key(c, "embedding_length"));
  c.n_ctx_train = f.GetU32(Key(c, "context_length"));
  if (c.n_layer == 0 || c.n_layer > 4096) f.Throw(StrFormat("block_count %u is out of range", c.n_layer));
  c.n_head = ReadUniform(f, Key(c, "attention.head_count"), c.n_layer, true, 0);
  c.n_head_kv = ReadUniform(f, Key(c, "attention.head_count_kv"), c.n_layer, false, c.n_head);
  c.n_ff = ReadUniform(f, Key(c, "feed_forward_length"), c.n_layer, false, 0);
  if (c.n_head == 0) f.Throw("key '" + Key(c, "attention.head_count") + "' is 0");
  c.n_embd_head_k = f.GetU32Opt(Key(c, "attention.key_length")).value_or(c.n_embd / c.n_head);
  c.n_embd_head_v = f.GetU32Opt(Key(c, "attention.value_length")).value_or(c.n_embd / c.n_head);
  c.n_rot = f.GetU32Opt(Key(c, "rope.dimension_count")).value_or(c.n_embd_head_k);
  c.rope_freq_base = f.GetF32Opt(Key(c, "rope.freq_base")).value_or(10000.0f);
  c.rms_eps = f.GetF32(Key(c, "attention.layer_norm_rms_epsilon"));
  c.n_expert = f.GetU32Opt(Key(c, "expert_count")).value_or(0);
  c.n_expert_used = f.GetU32Opt(Key(c, "expert_used_count")).value_or(0);
  ReadRopeScaling(f, c);
  if (c.n_expert == 0)
    f.Throw("key '" + Key(c, "expert_count") + "' is missing or 0: this is a dense model, not MoE");
  if (c.n_expert_used == 0)
    f.Throw("key '" + Key(c, "expert_used_count") + "' is missing or 0");
  switch (c.arch) {
    case Arch::kLlama:
    case Arch::kOlmoe:
      c.n_ff_exp = c.n_ff;
      if (c.n_ff_exp == 0) f.Throw("required key '" + Key(c, "feed_forward_length") + "' is missing");
      c.n_ff_shexp = f.GetU32Opt(Key(c, "expert_shared_feed_forward_length")).value_or(0);
      break;
    case Arch::kQwen2Moe:
    case Arch::kQwen3Moe:
      c.n_ff_exp = ReadUniform(f, Key(c, "expert_feed_forward_length"), c.n_layer, false,
                               c.n_ff / c.n_expert_used);
      c.n_ff_shexp = f.GetU32Opt(Key(c, "expert_shared_feed_forward_length"))
                         .value_or(c.arch == Arch::kQwen2Moe ? c.n_ff : 0);
      break;
    case Arch::kDeepseek2:
      ReadMla(f, c);
      break;
  }
  // Vocabulary size: <arch>.vocab_size, else the token list (checked against token_embd later).
  if (auto v = f.GetU32Opt(Key(c, "vocab_size"))) {
    c.n_vocab = *v;
  } else if (f.Has("tokenizer.ggml.tokens")) {
    c.n_vocab = static_cast<uint32_t>(f.GetStringArray("tokenizer.ggml.tokens").size());
  } else if (const TensorView* t = f.FindTensor("token_embd.weight")) {
    c.n_vocab = static_cast<uint32_t>(t->ne[1]);
  }
  ReadRouter(f, c);
  if (c.arch == Arch::kDeepseek2) {  // S shared experts of the routed experts' width, fused
    if (!f.Has(Key(c, "expert_shared_count"))) f.Throw("required key '" + Key(c, "expert_shared_count") + "' is missing");
    c.n_ff_shexp = c.n_ff_exp * c.n_expert_shared;
  }
  ApplyArchTraits(c);  // again: the router and the expert counts are known now
  try {
    ValidateConfig(c);
  } catch (const Error& e) {
    f.Throw(e.what());
  }
  if (const std::string why = UnservableRouterReason(c); !why.empty() && !allow_training_only) f.Throw(why);
  return c;
}

void WriteConfig(const ModelConfig& c, GgufWriter& w) {
  w.SetString("general.architecture", c.arch_name);
  w.SetU32(Key(c, "context_length"), c.n_ctx_train);
  w.SetU32(Key(c, "embedding_length"), c.n_embd);
  w.SetU32(Key(c, "block_count"), c.n_layer);
  w.SetU32(Key(c, "attention.head_count"), c.n_head);
  w.SetU32(Key(c, "attention.head_count_kv"), c.n_head_kv);
  w.SetF32(Key(c, "attention.layer_norm_rms_epsilon"), c.rms_eps);
  w.SetU32(Key(c, "rope.dimension_count"), c.n_rot);
  w.SetF32(Key(c, "rope.freq_base"), c.rope_freq_base);
  w.SetU32(Key(c, "expert_count"), c.n_expert);
  w.SetU32(Key(c, "expert_used_count"), c.n_expert_used);
  w.SetU32(Key(c, "vocab_size"), c.n_vocab);
  if (c.arch != Arch::kDeepseek2 && (c.n_embd_head_k != c.n_embd / c.n_head || c.arch == Arch::kQwen3Moe)) {
    w.SetU32(Key(c, "attention.key_length"), c.n_embd_head_k);
    w.SetU32(Key(c, "attention.value_length"), c.n_embd_head_v);
  }
  switch (c.arch) {
    case Arch::kLlama:
    case Arch::kOlmoe:
      w.SetU32(Key(c, "feed_forward_length"), c.n_ff_exp);
      break;
    case Arch::kQwen2Moe:
      w.SetU32(Key(c, "feed_forward_length"), c.n_ff_shexp);
      w.SetU32(Key(c, "expert_feed_forward_length"), c.n_ff_exp);
      w.SetU32(Key(c, "expert_shared_feed_forward_length"), c.n_ff_shexp);
      break;
    case Arch::kQwen3Moe:
      w.SetU32(Key(c, "feed_forward_length"), c.n_ff_exp * c.n_expert_used);
      w.SetU32(Key(c, "expert_feed_forward_length"), c.n_ff_exp);
      break;
    case Arch::kDeepseek2:
      if (c.mla_kv_b_legacy) {  // the old layout: one attn_kv_b, heads as MHA
        w.SetU32(Key(c, "attention.key_length"), c.n_embd_head_k);
        w.SetU32(Key(c, "attention.value_length"), c.n_embd_head_v);
      } else {  // split attn_k_b / attn_v_b; the cache "head" is the latent
        w.SetU32(Key(c, "attention.key_length"), c.n_lora_kv + c.n_rot);
        w.SetU32(Key(c, "attention.value_length"), c.n_lora_kv);
        w.SetU32(Key(c, "attention.key_length_mla"), c.n_embd_head_k);
        w.SetU32(Key(c, "attention.value_length_mla"), c.n_embd_head_v);
      }
      w.SetU32(Key(c, "attention.q_lora_rank"), c.n_lora_q);
      w.SetU32(Key(c, "attention.kv_lora_rank"), c.n_lora_kv);
      w.SetU32(Key(c, "leading_dense_block_count"), c.n_layer_dense_lead);
      w.SetU32(Key(c, "feed_forward_length"), c.n_layer_dense_lead > 0 ? c.n_ff : c.n_ff_exp);
      w.SetU32(Key(c, "expert_feed_forward_length"), c.n_ff_exp);
      w.SetU32(Key(c, "expert_shared_count"), c.n_expert_shared);
      w.SetBool(Key(c, "expert_weights_norm"), c.expert_weights_norm);
      w.SetU32(Key(c, "expert_gating_func"), c.router_kind == MoeRouterKind::kSigmoidBias ? 2 : 1);
      break;
  }
  if (c.rope_scaling != RopeScalingType::kNone) {
    w.SetString(Key(c, "rope.scaling.type"), c.rope_scaling == RopeScalingType::kYarn ? "yarn" : "linear");
    w.SetF32(Key(c, "rope.scaling.factor"), c.rope_scaling_factor);
    if (c.n_ctx_orig_yarn) w.SetU32(Key(c, "rope.scaling.original_context_length"), c.n_ctx_orig_yarn);
    if (c.rope_yarn_log_mul != 0.0f && c.arch == Arch::kDeepseek2)
      w.SetF32(Key(c, "rope.scaling.yarn_log_multiplier"), c.rope_yarn_log_mul);
  }
  if (c.rope_attn_factor != 1.0f) w.SetF32(Key(c, "rope.scaling.attn_factor"), c.rope_attn_factor);
  // The router and expert options, only where they differ from the default (default files stay
  // as llama.cpp writes them).
  if (c.router_kind != MoeRouterKind::kSoftmaxTopK)
    w.SetString(Key(c, "expert_router"), MoeRouterName(c.router_kind));
  if (c.router_kind == MoeRouterKind::kSigmoidBias && c.arch != Arch::kDeepseek2)  // deepseek2: above
    w.SetU32(Key(c, "expert_gating_func"), 2);
  if (c.router_kind == MoeRouterKind::kTopP) w.SetF32(Key(c, "expert_router_top_p"), c.router_top_p);
  if (c.router_kind == MoeRouterKind::kHash) w.SetU64(Key(c, "expert_router_hash_seed"), c.router_hash_seed);
  if (c.n_expert_groups > 1) {
    w.SetU32(Key(c, "expert_group_count"), c.n_expert_groups);
    w.SetU32(Key(c, "expert_group_used_count"), c.n_group_used);
  }
  if (c.expert_weights_scale != 1.0f) w.SetF32(Key(c, "expert_weights_scale"), c.expert_weights_scale);
  if (c.n_expert_shared > 0 && c.arch != Arch::kDeepseek2) w.SetU32(Key(c, "expert_shared_count"), c.n_expert_shared);
  if (c.n_ff_shexp > 0 && c.arch != Arch::kQwen2Moe && c.arch != Arch::kDeepseek2)  // qwen2moe: above; deepseek2: S x F
    w.SetU32(Key(c, "expert_shared_feed_forward_length"), c.n_ff_shexp);
  if (c.n_expert_null > 0) w.SetU32(Key(c, "expert_null_count"), c.n_expert_null);
  if (c.n_expert_zero > 0) w.SetU32(Key(c, "expert_zero_count"), c.n_expert_zero);
  if (c.n_expert_copy > 0) w.SetU32(Key(c, "expert_copy_count"), c.n_expert_copy);
  if (c.n_expert_const > 0) w.SetU32(Key(c, "expert_const_count"), c.n_expert_const);
  if (c.expert_gating_residual) w.SetBool(Key(c, "expert_gating_residual"), true);
}

namespace {

// The FFN tensors of block p (a dense FFN in deepseek2's leading blocks, else the routed experts,
// the router and the shared experts).
void MoeTensors(const ModelConfig& c, uint32_t i, const std::string& p, std::vector<TensorSpec>& t) {
  const int64_t E = c.n_embd, X = c.n_expert, F = c.n_ff_exp, R = c.n_router();
  if (!c.IsMoeLayer(i)) {
    const int64_t N = c.n_ff;
    t.push_back({p + "ffn_gate.weight", {E, N}, TensorRole::kMatrix});
    t.push_back({p + "ffn_down.weight", {N, E}, TensorRole::kMatrix});
    t.push_back({p + "ffn_up.weight", {E, N}, TensorRole::kMatrix});
    return;
  }
  // hash routing has no learned router: ffn_gate_inp may be present (ignored) or absent.
  t.push_back({p + "ffn_gate_inp.weight", {E, R}, TensorRole::kRouter,
               c.router_kind == MoeRouterKind::kHash});
  if (c.n_expert_const > 0) {  // MoE++ constant experts: W_c and v
    t.push_back({p + "ffn_zc_mix.weight", {E, 2, c.n_expert_const}, TensorRole::kRouterAux});
    t.push_back({p + "ffn_zc_const.weight", {E, c.n_expert_const}, TensorRole::kRouterAux});
  }
  if (c.expert_gating_residual && i > 0)  // MoE++ gating residual from the previous layer
    t.push_back({p + "ffn_gate_res.weight", {R, R}, TensorRole::kRouterAux});
  if (c.router_kind == MoeRouterKind::kSigmoidBias)  // selection-only bias (DeepSeek-V3; deepseek2
    t.push_back({p + "exp_probs_b.bias", {X}, TensorRole::kBias, c.is_mla()});  // files may omit it)
  t.push_back({p + "ffn_gate_exps.weight", {E, F, X}, TensorRole::kExperts});
  t.push_back({p + "ffn_down_exps.weight", {F, E, X}, TensorRole::kExperts});
  t.push_back({p + "ffn_up_exps.weight", {E, F, X}, TensorRole::kExperts});
  if (c.n_ff_shexp > 0) {
    const int64_t S = c.n_ff_shexp;
    if (c.shared_expert_gate) t.push_back({p + "ffn_gate_inp_shexp.weight", {E}, TensorRole::kGate});
    t.push_back({p + "ffn_gate_shexp.weight", {E, S}, TensorRole::kMatrix});
    t.push_back({p + "ffn_down_shexp.weight", {S, E}, TensorRole::kMatrix});
    t.push_back({p + "ffn_up_shexp.weight", {E, S}, TensorRole::kMatrix});
  }
}

// deepseek2's attention tensors of block p: Q (plain, or through the q_lora_rank bottleneck),
// the compressed KV projection and its norm, the per-head up-projections (split, or the legacy
// fused attn_kv_b) and the output.
void MlaTensors(const ModelConfig& c, uint32_t i, const std::string& p, std::vector<TensorSpec>& t) {
  const int64_t E = c.n_embd, H = c.n_head, Dk = c.n_embd_head_k, Dv = c.n_embd_head_v;
  const int64_t Dn = c.qk_nope(), Dr = c.n_rot, Kr = c.n_lora_kv, Rq = c.n_lora_q;
  if (Rq > 0) {
    t.push_back({p + "attn_q_a_norm.weight", {Rq}, TensorRole::kNorm});
    t.push_back({p + "attn_q_a.weight", {E, Rq}, TensorRole::kMatrix});
    t.push_back({p + "attn_q_b.weight", {Rq, H * Dk}, TensorRole::kMatrix});
  } else {
    t.push_back({p + "attn_q.weight", {E, H * Dk}, TensorRole::kMatrix});
  }
  t.push_back({p + "attn_kv_a_norm.weight", {Kr}, TensorRole::kNorm});
  t.push_back({p + "attn_kv_a_mqa.weight", {E, Kr + Dr}, TensorRole::kMatrix});
  if (c.mla_kv_b_legacy) {
    t.push_back({p + "attn_kv_b.weight", {Kr, H * (Dn + Dv)}, TensorRole::kMatrix});
  } else {
    t.push_back({p + "attn_k_b.weight", {Dn, Kr, H}, TensorRole::kMatrix});
    t.push_back({p + "attn_v_b.weight", {Kr, Dv, H}, TensorRole::kMatrix});
  }
  t.push_back({p + "attn_output.weight", {H * Dv, E}, TensorRole::kMatrix});
  t.push_back({p + "ffn_norm.weight", {E}, TensorRole::kNorm});
  MoeTensors(c, i, p, t);
}

}  // namespace

std::vector<TensorSpec> ExpectedTensors(const ModelConfig& c, bool with_output, bool with_qkv_bias) {
  const int64_t E = c.n_embd, V = c.n_vocab;
  const int64_t nq = c.n_q(), nk = c.n_k(), nv = c.n_v();
  std::vector<TensorSpec> t;
  t.push_back({"token_embd.weight", {E, V}, TensorRole::kEmbedding});
  t.push_back({"output_norm.weight", {E}, TensorRole::kNorm});
  // llama, qwen3moe and deepseek2 tie the output to token_embd when it is absent; qwen2moe and
  // olmoe require it in llama.cpp, so moe init always writes it for them.
  const bool output_optional = c.arch == Arch::kLlama || c.arch == Arch::kQwen3Moe || c.arch == Arch::kDeepseek2;
  if (with_output || !output_optional)
    t.push_back({"output.weight", {E, V}, TensorRole::kOutput, output_optional});
  for (uint32_t i = 0; i < c.n_layer; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    t.push_back({p + "attn_norm.weight", {E}, TensorRole::kNorm});
    if (c.is_mla()) {
      MlaTensors(c, i, p, t);
      continue;
    }
    t.push_back({p + "attn_q.weight", {E, nq}, TensorRole::kMatrix});
    t.push_back({p + "attn_k.weight", {E, nk}, TensorRole::kMatrix});
    t.push_back({p + "attn_v.weight", {E, nv}, TensorRole::kMatrix});
    if (with_qkv_bias) {
      t.push_back({p + "attn_q.bias", {nq}, TensorRole::kBias, true});
      t.push_back({p + "attn_k.bias", {nk}, TensorRole::kBias, true});
      t.push_back({p + "attn_v.bias", {nv}, TensorRole::kBias, true});
    }
    t.push_back({p + "attn_output.weight", {nq, E}, TensorRole::kMatrix});
    if (c.qk_norm == QkNorm::kPerHead) {
      t.push_back({p + "attn_q_norm.weight", {c.n_embd_head_k}, TensorRole::kNorm});
      t.push_back({p + "attn_k_norm.weight", {c.n_embd_head_k}, TensorRole::kNorm});
    } else if (c.qk_norm == QkNorm::kFull) {
      t.push_back({p + "attn_q_norm.weight", {nq}, TensorRole::kNorm});
      t.push_back({p + "attn_k_norm.weight", {nk}, TensorRole::kNorm});
    }
    t.push_back({p + "ffn_norm.weight", {E}, TensorRole::kNorm});
    MoeTensors(c, i, p, t);
  }
  return t;
}

}  // namespace moe
