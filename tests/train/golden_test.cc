// The whole model against PyTorch (tests/golden/model_torch.py, an independent float64 model that
// reuses nothing of moe.cpp): logits, loss, MoE losses and every parameter gradient, and the
// losses of 10 AdamW steps run by the trainer's own step (StepEngine), for five architectures
// (deepseek2's latent attention, dense and MoE blocks included) and five routers plus the
// expert options.
//   double path: within 1e-9 relative (what an exact reimplementation gives in double);
//   float path (the trainer): within 1e-4 relative, the bound, per tensor in norm.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "model/init.h"
#include "model/params.h"
#include "train/model_train.h"
#include "train/trainer.h"
#include "util/threadpool.h"
#include "test_dir.h"

namespace moe {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

fs::path Root() { return fs::path(__FILE__).parent_path().parent_path().parent_path(); }

std::vector<double> ReadBin(const fs::path& p, size_t n) {
  std::ifstream in(p, std::ios::binary);
  std::vector<double> v(n);
  in.read(reinterpret_cast<char*>(v.data()), static_cast<std::streamsize>(n * sizeof(double)));
  EXPECT_TRUE(in.good()) << p;
  return v;
}

template <typename T>
double RelDiff(const std::vector<T>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < b.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += b[i] * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

struct Case {
  std::string name;
  Arch arch;
  MoeRouterKind router;
  uint32_t n_null = 0, n_const = 0, n_copy = 0, shared_ffn = 0, groups = 0;
  bool residual = false, tie = false;
  uint32_t q_lora = 0;  // deepseek2: 0 = attn_q
  bool weights_norm = false;
};

const int kSeq = 3, kLen = 9, kSteps = 10;

std::vector<int32_t> Batch(std::mt19937_64& rng, int V) {
  std::vector<int32_t> t(kSeq * (kLen + 1));
  for (auto& x : t) x = static_cast<int32_t>(rng() % V);
  return t;
}

void RunCase(const Case& cs) {
  SCOPED_TRACE(cs.name);
  const fs::path dir = fs::path(TestDir("golden_model")) / cs.name;
  fs::remove_all(dir);
  fs::create_directories(dir);
  InitOptions o;
  ModelConfig& c = o.config;
  c.arch = cs.arch;
  c.n_layer = 2;
  c.n_embd = 32;
  c.n_ff_exp = 24;
  c.n_expert = 6;
  c.n_expert_used = 2;
  c.n_head = 4;
  c.n_head_kv = cs.arch == Arch::kOlmoe ? 4 : 2;
  c.n_vocab = 61;
  c.n_ctx_train = 32;
  c.router_kind = cs.router;
  c.router_top_p = 0.6f;
  c.router_hash_seed = 77;
  c.n_expert_null = cs.n_null;
  c.n_expert_const = cs.n_const;
  c.n_expert_copy = cs.n_copy;
  c.n_ff_shexp = cs.shared_ffn;
  c.n_expert_groups = cs.groups;
  c.n_group_used = cs.groups ? 2 : 0;
  c.expert_gating_residual = cs.residual;
  if (cs.router == MoeRouterKind::kTopP) c.n_expert_used = 3;
  if (cs.arch == Arch::kDeepseek2) {  // MLA (v head < qk head), a dense first block, 1 shared expert
    c.n_layer = 3;
    c.n_head_kv = 0;
    o.qk_nope = 8;
    c.n_rot = 4;
    c.n_embd_head_v = 6;
    c.n_lora_kv = 10;
    c.n_lora_q = cs.q_lora;
    c.n_layer_dense_lead = 1;
    c.n_ff = 20;
    c.n_expert_shared = 1;
    c.n_ff_shexp = 0;
    c.expert_weights_norm = cs.weights_norm;
  }
  o.tie_output = cs.tie;
  o.seed = 5;
  const std::string model = (dir / "model.gguf").string();
  InitRandomModel(o, model);
  std::mt19937_64 rng(11);
  const int V = static_cast<int>(c.n_vocab);
  const std::vector<int32_t> tokens = Batch(rng, V);
  std::vector<std::vector<int32_t>> batches;
  for (int s = 0; s < kSteps; ++s) batches.push_back(Batch(rng, V));
  MoeLayerConfig train;
  train.aux_loss_coef = 0.03;
  train.z_loss_coef = 0.002;
  train.entropy_loss_coef = 0.01;
  train.ec_capacity_factor = 1.5;
  train.bias_update_rate = 0.01;
  AdamWConfig adam;
  adam.lr = 3e-3;
  adam.min_lr = 3e-4;
  adam.warmup = 3;
  adam.total_steps = kSteps;
  adam.weight_decay = 0.1;
  adam.clip = 1.0;
  std::vector<std::vector<int32_t>> tok2d;
  json cfg = {{"model", model}, {"aux_loss_coef", train.aux_loss_coef}, {"z_loss_coef", train.z_loss_coef},
              {"entropy_loss_coef", train.entropy_loss_coef}, {"ec_capacity_factor", train.ec_capacity_factor}};
  auto rows = [&](const std::vector<int32_t>& t) {
    json a = json::array();
    for (int b = 0; b < kSeq; ++b) a.push_back(std::vector<int32_t>(t.begin() + b * (kLen + 1), t.begin() + (b + 1) * (kLen + 1)));
    return a;
  };
  cfg["tokens"] = rows(tokens);
  json jb = json::array();
  for (const auto& b : batches) jb.push_back(rows(b));
  cfg["adamw"] = {{"steps", kSteps}, {"lr", adam.lr}, {"min_lr", adam.min_lr}, {"warmup", adam.warmup},
                  {"beta1", adam.beta1}, {"beta2", adam.beta2}, {"eps", adam.eps}, {"weight_decay", adam.weight_decay},
                  {"clip", adam.clip}, {"bias_update_rate", train.bias_update_rate}, {"batches", jb}};
  std::ofstream(dir / "config.json") << cfg.dump();
  const std::string cmd = "/usr/bin/python3 '" + (Root() / "tests/golden/model_torch.py").string() + "' --dir '" +
                          dir.string() + "' 2>'" + (dir / "stderr.txt").string() + "'";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;

  const int N = kSeq * kLen;
  const std::vector<double> logits = ReadBin(dir / "logits.bin", static_cast<size_t>(N) * V);
  const double loss = ReadBin(dir / "loss.bin", 1)[0];
  const std::vector<double> moe_loss = ReadBin(dir / "moe_loss.bin", c.n_layer);
  const std::vector<double> gap = ReadBin(dir / "selection_gap.bin", c.n_layer);
  for (double g : gap) ASSERT_GT(g, 1e-6) << "a near tie in the golden's routing: pick another seed";

  // Double path: an exact reimplementation.
  ModelParams<double> pd = LoadParams<double>(model, true);
  ModelCache<double> cd;
  TrainForwardOptions fo;
  const auto cfgs_d = TrainLayerConfigs(pd, train);
  ModelForward(pd, cfgs_d, tokens.data(), nullptr, kSeq, kLen, fo, &cd);
  for (uint32_t il = 0; il < c.n_layer; ++il) {
    if (!c.IsMoeLayer(il)) continue;  // a dense block routes nothing
    const size_t k = cd.blocks[il].moe.plan.k;
    const std::vector<double> ids = ReadBin(dir / "expert_ids" / (std::to_string(il) + ".bin"), static_cast<size_t>(N) * k);
    for (size_t s = 0; s < ids.size(); ++s)
      ASSERT_EQ(cd.blocks[il].moe.plan.expert_ids[s], static_cast<int32_t>(ids[s])) << "layer " << il << " slot " << s;
  }
  EXPECT_NEAR(cd.loss(), loss, 1e-9 * loss);
  double moe_sum = 0;
  for (double v : moe_loss) moe_sum += v;
  EXPECT_NEAR(cd.moe_loss, moe_sum, 1e-9 * std::max(1e-3, moe_sum));
  ModelCache<double> cd_logits;
  TrainForwardOptions lo;
  lo.training = false;
  lo.keep_logits = true;
  ModelForward(pd, cfgs_d, tokens.data(), nullptr, kSeq, kLen, lo, &cd_logits);
  EXPECT_LT(RelDiff(cd_logits.logits, logits), 1e-9);
  ModelGrads<double> gd = pd.NewGrads();
  ModelBackward(pd, cfgs_d, cd, &gd, nullptr);
  int n_grads = 0;
  for (const NamedArray<double>& g : NamedTensors(pd, gd)) {
    const std::vector<double> ref = ReadBin(dir / "grad" / (g.name + ".bin"), g.data->size());
    EXPECT_LT(RelDiff(*g.data, ref), 1e-9) << g.name;
    ++n_grads;
  }
  EXPECT_GT(n_grads, 20);

  // Float path, the trainer's: forward, gradients, then 10 AdamW steps of StepEngine.
  ModelParams<float> pf = LoadParams<float>(model, true);
  ThreadPool pool(2);
  ModelCache<float> cf;
  TrainForwardOptions ff;
  ff.pool = &pool;
  const auto cfgs_f = TrainLayerConfigs(pf, train);
  ModelForward(pf, cfgs_f, tokens.data(), nullptr, kSeq, kLen, ff, &cf);
  EXPECT_NEAR(cf.loss(), loss, 1e-4 * loss);
  ModelGrads<float> gf = pf.NewGrads();
  ModelBackward(pf, cfgs_f, cf, &gf, &pool);
  for (const NamedArray<float>& g : NamedTensors(pf, gf)) {
    const std::vector<double> ref = ReadBin(dir / "grad" / (g.name + ".bin"), g.data->size());
    EXPECT_LT(RelDiff(*g.data, ref), 1e-4) << g.name;
  }
  const std::vector<double> adam_losses = ReadBin(dir / "adamw_losses.bin", kSteps);
  StepEngine engine(&pf, train, adam, 1, &pool);
  for (int s = 0; s < kSteps; ++s) {
    const StepStats st = engine.Step(s, {batches[s].data()}, {nullptr}, kSeq, kLen, 0);
    EXPECT_NEAR(st.loss, adam_losses[s], 1e-4 * adam_losses[s]) << "AdamW step " << s;
  }
  for (const NamedArray<float>& a : NamedTensors(pf)) {
    const std::vector<double> ref = ReadBin(dir / "adamw_final" / (a.name + ".bin"), a.data->size());
    EXPECT_LT(RelDiff(*a.data, ref), 1e-4) << "after AdamW: " << a.name;
  }
}

TEST(TorchGolden, WholeModelAndAdamW) {
  const std::vector<Case> cases = {
      {"llama_softmax", Arch::kLlama, MoeRouterKind::kSoftmaxTopK},
      {"qwen2moe_sigmoid_groups", Arch::kQwen2Moe, MoeRouterKind::kSigmoidBias, 0, 0, 0, 16, 3},
      {"qwen3moe_top_p_null_residual", Arch::kQwen3Moe, MoeRouterKind::kTopP, 2, 0, 0, 0, 0, true, true},
      {"olmoe_expert_choice", Arch::kOlmoe, MoeRouterKind::kExpertChoice},
      {"llama_hash_shared", Arch::kLlama, MoeRouterKind::kHash, 0, 0, 0, 16},
      {"olmoe_softmax_zc", Arch::kOlmoe, MoeRouterKind::kSoftmaxTopK, 1, 1, 1},
      // deepseek2 blocks: V2-style (softmax, attn_q) and V3-style (sigmoid + bias + groups,
      // normalised weights, the q_lora bottleneck).
      {"deepseek2_v2", Arch::kDeepseek2, MoeRouterKind::kSoftmaxTopK},
      {"deepseek2_v3", Arch::kDeepseek2, MoeRouterKind::kSigmoidBias, 0, 0, 0, 0, 3, false, false, 7, true},
  };
  for (const Case& cs : cases) RunCase(cs);
}

}  // namespace
}  // namespace moe
