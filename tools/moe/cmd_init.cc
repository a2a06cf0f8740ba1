#include <memory>
#include <string>

#include "commands.h"
#include "model/init.h"
#include "moe/moe_layer.h"
#include "util/error.h"

namespace moe::cli {

Runner AddInit(CLI::App& app) {
  auto o = std::make_shared<InitOptions>();
  auto arch = std::make_shared<std::string>();
  auto type = std::make_shared<std::string>("f32");
  auto out = std::make_shared<std::string>();
  auto router = std::make_shared<std::string>("softmax_topk");
  auto gating_name = std::make_shared<std::string>();
  auto rope_scaling = std::make_shared<std::string>("none");
  ModelConfig& c = o->config;
  app.add_option("--arch", *arch, "architecture: llama (Mixtral), qwen2moe, qwen3moe, olmoe, deepseek2")->required();
  app.add_option("--layers", c.n_layer, "number of blocks")->required();
  app.add_option("--dim", c.n_embd, "embedding width")->required();
  app.add_option("--ffn", c.n_ff_exp, "width of one routed expert")->required();
  app.add_option("--experts", c.n_expert, "routed experts per layer")->required();
  app.add_option("--experts-used", c.n_expert_used, "experts per token (k)")->required();
  app.add_option("--shared-ffn", c.n_ff_shexp, "width of the shared experts, all together (qwen2moe: default --ffn)");
  app.add_option("--shared-experts", c.n_expert_shared, "shared experts (stored fused, --shared-ffn wide in all)");
  app.add_option("--heads", c.n_head, "attention heads (default dim/64)");
  app.add_option("--kv-heads", c.n_head_kv, "key/value heads (GQA; default --heads)");
  app.add_option("--head-dim", c.n_embd_head_k, "head dimension (default dim/heads)");
  app.add_option("--vocab", c.n_vocab, "vocabulary size (default 32000, or the --tokenizer's)");
  app.add_option("--ctx", c.n_ctx_train, "context length")->default_val(2048);
  app.add_option("--rope-base", c.rope_freq_base, "RoPE frequency base")->default_val(10000.0f);
  app.add_option("--eps", c.rms_eps, "RMSNorm epsilon")->default_val(1e-5f);
  app.add_option("--router", *router,
                 std::string("router: ") + MoeRouterNames() + " (expert_choice is training-only: moe run refuses it)")
      ->default_val("softmax_topk");
  CLI::Option* top_p = app.add_option("--top-p", c.router_top_p, "top_p router: cumulative probability threshold in (0, 1]")
                           ->default_val(0.4f);
  CLI::Option* hash_seed = app.add_option("--hash-seed", c.router_hash_seed, "hash router: seed of the token -> expert hash")
                               ->default_val(0);
  app.add_option("--expert-groups,--n-group", c.n_expert_groups, "group-limited top-k: expert groups (DeepSeek-V3)");
  app.add_option("--groups-used,--topk-group", c.n_group_used, "group-limited top-k: groups that compete");
  // deepseek2 (multi-head latent attention, leading dense blocks).
  app.add_option("--kv-lora-rank", c.n_lora_kv, "deepseek2: latent KV width, what the cache holds (default 4 x head dim)");
  app.add_option("--q-lora-rank", c.n_lora_q, "deepseek2: query bottleneck width (0 = a plain attn_q)")->default_val(0);
  app.add_option("--qk-nope", o->qk_nope, "deepseek2: unrotated part of a query/key head (default dim/heads)");
  app.add_option("--qk-rope", c.n_rot, "deepseek2: rotated part of a query/key head (default qk-nope/2)");
  app.add_option("--v-head-dim", c.n_embd_head_v, "deepseek2: value head dimension (default qk-nope)");
  app.add_option("--leading-dense", c.n_layer_dense_lead, "deepseek2: leading blocks with a dense FFN")->default_val(0);
  app.add_option("--dense-ffn", c.n_ff, "deepseek2: dense FFN width (default ffn x (experts-used + shared-experts))");
  CLI::Option* gating = app.add_option("--gating", *gating_name, "deepseek2: softmax (V2) or sigmoid (V3: router sigmoid_bias)");
  app.add_flag("--weights-norm", c.expert_weights_norm, "deepseek2: renormalise the top-k gate weights (V3)");
  app.add_flag("--mla-legacy", c.mla_kv_b_legacy,
               "deepseek2: write the pre-split layout (one attn_kv_b per block, as older GGUF files have)");
  // RoPE scaling keys, as context-extended checkpoints carry them.
  app.add_option("--rope-scaling", *rope_scaling, "RoPE scaling: none, linear or yarn")->default_val("none");
  app.add_option("--rope-scale", c.rope_scaling_factor, "RoPE scaling factor (context extension)")->default_val(1.0f);
  app.add_option("--rope-orig-ctx", c.n_ctx_orig_yarn, "YaRN: the original training context (default --ctx)");
  app.add_option("--yarn-log-mul", c.rope_yarn_log_mul,
                 "deepseek2 YaRN: rope.scaling.yarn_log_multiplier as stored (0.1 x mscale_all_dim)");
  app.add_option("--weights-scale", c.expert_weights_scale, "multiplies the gate weights")->default_val(1.0f);
  app.add_option("--null-experts", c.n_expert_null, "AdaMoE null experts (softmax routers)");
  app.add_option("--zero-experts", c.n_expert_zero, "MoE++ zero experts (softmax routers)");
  app.add_option("--copy-experts", c.n_expert_copy, "MoE++ copy experts (softmax routers)");
  app.add_option("--const-experts", c.n_expert_const, "MoE++ constant experts (softmax routers)");
  app.add_flag("--gating-residual", c.expert_gating_residual, "MoE++ gating residuals between layers");
  app.add_option("--type", *type, "weight type: " + WeightTypeNames())->default_val("f32");
  app.add_option("--seed", o->seed, "random seed")->default_val(0);
  app.add_option("--logit-scale", o->logit_scale, "scale of the output matrix (large = big margins)")->default_val(1.0f);
  app.add_option("--plant-margin", o->plant_margin, "plant a next-token margin of about C logits per token (0 = off)")->default_val(0.0f);
  app.add_option("--embd-scale", o->embd_scale, "scale of the token embeddings")->default_val(1.0f);
  app.add_flag("--tie-output", o->tie_output, "no output.weight: reuse token_embd (llama, qwen3moe)");
  app.add_option("--tokenizer", o->tokenizer_from, "copy the tokenizer of this GGUF file");
  app.add_option("-o,--output", *out, "output GGUF file")->required();
  CLI::App* cmd = &app;
  return [=]() {
    if (!ParseArch(*arch, &o->config.arch))
      Fail("--arch '%s' is not supported (use llama, qwen2moe, qwen3moe, olmoe or deepseek2)", arch->c_str());
    if (!ParseDType(type->c_str(), &o->type))
      Fail("--type '%s' is not a weight type (use one of: %s)", type->c_str(), WeightTypeNames().c_str());
    if (!ParseMoeRouterKind(*router, &o->config.router_kind))
      Fail("--router '%s' is not a router (use one of: %s)", router->c_str(), MoeRouterNames());
    if (gating->count() > 0) {
      if (o->config.arch != Arch::kDeepseek2) Fail("--gating applies to --arch deepseek2 (others: --router)");
      if (*gating_name == "sigmoid") {
        o->config.router_kind = MoeRouterKind::kSigmoidBias;
      } else if (*gating_name != "softmax") {
        Fail("--gating '%s' is not a gating function (use softmax or sigmoid)", gating_name->c_str());
      }
    }
    if (*rope_scaling == "linear") {
      o->config.rope_scaling = RopeScalingType::kLinear;
    } else if (*rope_scaling == "yarn") {
      o->config.rope_scaling = RopeScalingType::kYarn;
    } else if (*rope_scaling != "none") {
      Fail("--rope-scaling '%s' is not a RoPE scaling (use none, linear or yarn)", rope_scaling->c_str());
    }
    if (o->config.rope_scaling == RopeScalingType::kNone && (cmd->count("--rope-scale") || cmd->count("--rope-orig-ctx")))
      Fail("--rope-scale and --rope-orig-ctx need --rope-scaling linear or yarn");
    if (o->config.arch != Arch::kDeepseek2) {
      for (const char* flag : {"--kv-lora-rank", "--q-lora-rank", "--qk-nope", "--qk-rope", "--v-head-dim",
                               "--leading-dense", "--dense-ffn", "--weights-norm", "--mla-legacy", "--yarn-log-mul"})
        if (cmd->count(flag) > 0) Fail("%s applies to --arch deepseek2 only", flag);
    }
    if (top_p->count() > 0 && o->config.router_kind != MoeRouterKind::kTopP)
      Fail("--top-p applies to --router top_p only, not %s", router->c_str());
    if (hash_seed->count() > 0 && o->config.router_kind != MoeRouterKind::kHash)
      Fail("--hash-seed applies to --router hash only, not %s", router->c_str());
    InitRandomModel(*o, *out);
    return 0;
  };
}

}  // namespace moe::cli
