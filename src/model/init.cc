#include "model/init.h"

#include <algorithm>
#include <cmath>
#include <random>

#include "formats/gguf.h"
#include "kernels/kernels.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe {

namespace {

// Writes the "in" dimension of a matrix for an error message: the row length must hold whole
// quantization blocks.
void CheckRowLength(const TensorSpec& s, DType t) {
  const int64_t bs = Traits(t).block_size;
  if (s.ne[0] % bs != 0)
    Fail("--type %s needs rows that are multiples of %lld elements, but tensor '%s' has rows of "
         "%lld (choose --dim/--ffn/--shared-ffn/--heads x --head-dim as multiples of %lld)",
         DTypeName(t), static_cast<long long>(bs), s.name.c_str(),
         static_cast<long long>(s.ne[0]), static_cast<long long>(bs));
}

// out row perm[t] += C/sqrt(E) * e_t/|e_t|: the final RMSNorm gives |h| ~ sqrt(E), so the
// planted token leads by about C * cos(h, e_t) logits.
void PlantMargins(const std::vector<float>& embd, int64_t E, int64_t V, float margin,
                  std::mt19937_64& rng, std::vector<float>& out) {
  std::vector<int64_t> perm(V);
  for (int64_t i = 0; i < V; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  for (int64_t t = 0; t < V; ++t) {
    const float* e = &embd[t * E];
    double n2 = 0;
    for (int64_t i = 0; i < E; ++i) n2 += static_cast<double>(e[i]) * e[i];
    const float s = static_cast<float>(margin / std::sqrt(static_cast<double>(E)) / std::sqrt(n2 > 0 ? n2 : 1));
    float* o = &out[perm[t] * E];
    for (int64_t i = 0; i < E; ++i) o[i] += s * e[i];
  }
}

// Heads, head dimension and widths of the plain-attention architectures.
void PlainAttentionDefaults(ModelConfig& c) {
  if (c.n_head_kv == 0) c.n_head_kv = c.n_head;
  if (c.n_embd_head_k == 0) {
    if (c.n_embd % c.n_head != 0)
      Fail("--dim %u is not a multiple of --heads %u: give --head-dim", c.n_embd, c.n_head);
    c.n_embd_head_k = c.n_embd / c.n_head;
  }
  c.n_embd_head_v = c.n_embd_head_k;
  c.n_rot = c.n_embd_head_k;
  if (c.n_ctx_train == 0) c.n_ctx_train = 2048;
  if (c.n_ff_exp == 0) c.n_ff_exp = c.n_ff;
  c.n_ff = c.n_ff_exp;
  if (c.arch == Arch::kQwen2Moe && c.n_ff_shexp == 0) c.n_ff_shexp = c.n_ff_exp;
  if (c.arch == Arch::kLlama && c.n_embd_head_k * c.n_head != c.n_embd)
    Fail("llama needs --heads x --head-dim == --dim (%u x %u != %u)", c.n_head, c.n_embd_head_k, c.n_embd);
}

// deepseek2: the MLA sizes (DeepSeek-V2's proportions: qk_rope = qk_nope / 2, v = qk_nope,
// kv_lora = 4 qk_nope), one shared latent head, S shared experts of the routed width.
void MlaDefaults(InitOptions& opt) {
  ModelConfig& c = opt.config;
  if (c.n_embd_head_k != 0) Fail("--head-dim does not apply to deepseek2: give --qk-nope and --qk-rope");
  uint32_t nope = opt.qk_nope;
  if (nope == 0) {
    if (c.n_embd % c.n_head != 0) Fail("--dim %u is not a multiple of --heads %u: give --qk-nope", c.n_embd, c.n_head);
    nope = c.n_embd / c.n_head;
  }
  if (c.n_rot == 0) c.n_rot = std::max<uint32_t>(2, nope / 2 / 2 * 2);
  c.n_embd_head_k = nope + c.n_rot;
  if (c.n_embd_head_v == 0) c.n_embd_head_v = nope;
  if (c.n_lora_kv == 0) c.n_lora_kv = 4 * nope;
  if (c.n_head_kv != 0 && c.n_head_kv != 1) Fail("--kv-heads does not apply to deepseek2 (MLA caches one latent head)");
  c.n_head_kv = c.mla_kv_b_legacy ? c.n_head : 1;  // legacy files run as MHA in llama.cpp
  if (c.n_ctx_train == 0) c.n_ctx_train = 2048;
  if (c.n_expert_shared == 0) c.n_expert_shared = 1;
  if (c.n_ff_shexp == 0) c.n_ff_shexp = c.n_ff_exp * c.n_expert_shared;
  if (c.n_ff_shexp != c.n_ff_exp * c.n_expert_shared)
    Fail("deepseek2's shared experts are --shared-experts x --ffn wide (%u x %u): drop --shared-ffn %u",
         c.n_expert_shared, c.n_ff_exp, c.n_ff_shexp);
  if (c.n_ff == 0 && c.n_layer_dense_lead > 0) c.n_ff = c.n_ff_exp * (c.n_expert_used + c.n_expert_shared);
  if (c.n_layer_dense_lead == 0 && c.n_ff == 0) c.n_ff = c.n_ff_exp;
}

}  // namespace

void InitRandomModel(InitOptions opt, const std::string& path) {
  ModelConfig& c = opt.config;
  ApplyArchTraits(c);
  if (c.n_head == 0) c.n_head = std::max<uint32_t>(1, c.n_embd / 64);
  if (c.arch == Arch::kDeepseek2) {
    MlaDefaults(opt);
  } else {
    PlainAttentionDefaults(c);
  }
  if (opt.tie_output && (c.arch == Arch::kQwen2Moe || c.arch == Arch::kOlmoe))
    Fail("--tie-output: architecture %s needs its own output.weight in llama.cpp", c.arch_name.c_str());

  std::unique_ptr<GgufFile> tok_src;
  if (!opt.tokenizer_from.empty()) {
    tok_src = GgufFile::Open(opt.tokenizer_from);
    if (!tok_src->Has("tokenizer.ggml.tokens"))
      Fail("--tokenizer %s has no tokenizer.ggml.tokens to copy", opt.tokenizer_from.c_str());
    const auto n_tokens = static_cast<uint32_t>(tok_src->GetStringArray("tokenizer.ggml.tokens").size());
    if (c.n_vocab != 0 && c.n_vocab != n_tokens)
      Fail("--vocab %u does not match the %u tokens of --tokenizer %s (leave --vocab out to take the tokenizer's)",
           c.n_vocab, n_tokens, opt.tokenizer_from.c_str());
    c.n_vocab = n_tokens;
  }
  if (c.n_vocab == 0) c.n_vocab = 32000;
  if (!(opt.plant_margin >= 0) || !(opt.embd_scale > 0) || !std::isfinite(opt.logit_scale))
    Fail("--plant-margin must be >= 0, --embd-scale > 0 and --logit-scale finite");
  if (opt.plant_margin > 0 && opt.tie_output)
    Fail("--plant-margin needs its own output.weight: drop --tie-output");
  ApplyArchTraits(c);  // again: the sizes filled in above shape the MoE layer
  ValidateConfig(c);

  GgufWriter w;
  w.SetString("general.name", std::string("moe.cpp random ") + c.arch_name);
  WriteConfig(c, w);
  if (!IsWeightType(opt.type)) Fail("--type %s is not a weight type", DTypeName(opt.type));
  w.SetU32("general.file_type", FileTypeOf(opt.type));
  w.SetU32("general.quantization_version", 2);
  if (tok_src) {
    CopyTokenizerKeys(*tok_src, w);
  } else {
    w.SetString("tokenizer.ggml.model", "none");
  }

  std::mt19937_64 rng(opt.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> embd;  // [n_vocab][n_embd], kept for the planted margins
  std::vector<TensorSpec> specs = ExpectedTensors(c, !opt.tie_output, c.arch == Arch::kQwen2Moe);
  // The writer holds the whole file in memory: refuse upfront what this machine cannot hold.
  double file_bytes = 0;
  for (const TensorSpec& sp : specs) {
    double rows = 1;
    for (size_t d = 1; d < sp.ne.size(); ++d) rows *= static_cast<double>(sp.ne[d]);
    const bool f32 = sp.role == TensorRole::kNorm || sp.role == TensorRole::kBias || sp.role == TensorRole::kRouter ||
                     sp.role == TensorRole::kGate || sp.role == TensorRole::kRouterAux;
    file_bytes += rows * static_cast<double>(RowBytes(f32 ? DType::kF32 : opt.type, sp.ne[0] / Traits(opt.type).block_size * Traits(opt.type).block_size));
  }
  if (const uint64_t mem = PhysicalMemoryBytes(); mem > 0 && file_bytes > static_cast<double>(mem))
    Fail("this model would be a %.1f GiB file, more than this machine's %.1f GiB of memory, which moe init "
         "writes it from: choose fewer --layers or --experts, or smaller --dim / --ffn / --vocab",
         file_bytes / 1073741824.0, static_cast<double>(mem) / 1073741824.0);
  for (const TensorSpec& s : specs) {
    // hash routing has no learned router (like the training layer's kHash): no ffn_gate_inp.
    if (s.role == TensorRole::kRouter && c.router_kind == MoeRouterKind::kHash) continue;
    int64_t n = 1;
    for (int64_t d : s.ne) n *= d;
    std::vector<float> v(n);
    const float fan_in_scale = 1.0f / std::sqrt(static_cast<float>(s.ne[0]));
    switch (s.role) {
      case TensorRole::kNorm:  // around 1, so a wrong norm weight changes the output
        for (float& x : v) x = 1.0f + 0.1f * normal(rng);
        break;
      case TensorRole::kBias:  // also exp_probs_b: a small selection bias next to sigmoid scores
        for (float& x : v) x = 0.1f * normal(rng);
        break;
      case TensorRole::kEmbedding:
        for (float& x : v) x = normal(rng);
        if (opt.plant_margin > 0) embd = v;
        for (float& x : v) x *= opt.embd_scale;
        break;
      case TensorRole::kOutput:
        for (float& x : v) x = fan_in_scale * normal(rng);
        if (opt.plant_margin > 0) PlantMargins(embd, c.n_embd, c.n_vocab, opt.plant_margin, rng, v);
        for (float& x : v) x *= opt.logit_scale;
        break;
      case TensorRole::kRouter:  // logits ~ N(0, 1): varied, rarely tied expert choices
      case TensorRole::kRouterAux:
      case TensorRole::kGate:
      case TensorRole::kMatrix:
      case TensorRole::kExperts:
        for (float& x : v) x = fan_in_scale * normal(rng);
        break;
    }
    const bool keep_f32 = s.role == TensorRole::kNorm || s.role == TensorRole::kBias ||
                          s.role == TensorRole::kRouter || s.role == TensorRole::kGate ||
                          s.role == TensorRole::kRouterAux;
    const DType t = keep_f32 ? DType::kF32 : opt.type;
    if (!keep_f32) CheckRowLength(s, t);
    const int64_t rows = n / s.ne[0];
    const size_t rb = RowBytes(t, s.ne[0]);
    std::vector<uint8_t> bytes(rb * rows);
    for (int64_t r = 0; r < rows; ++r)
      kernels::QuantizeRow(t, v.data() + r * s.ne[0], bytes.data() + r * rb, s.ne[0]);
    w.AddTensor(s.name, t, s.ne, bytes.data(), bytes.size());
  }
  w.Write(path);
}

}  // namespace moe
