// The whole-model training forward and backward (train/model_train.h):
//  - every parameter gradient against central differences in double, for every architecture,
//    router and expert option (random directions per tensor, at a routing that the perturbation
//    does not change);
//  - the float path against the double path (logits, loss, every gradient);
//  - the training forward against the inference forward (moe run's path) on the same store, and
//    the store served in memory against the same store saved and loaded (bit for bit);
//  - thread-count invariance (bit for bit).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "model/forward.h"
#include "model/init.h"
#include "model/model.h"
#include "model/params.h"
#include "train/model_train.h"
#include "util/threadpool.h"
#include "test_dir.h"

namespace moe {
namespace {

std::string Dir() { return TestDir("train"); }

struct Spec {
  std::string name;
  Arch arch = Arch::kLlama;
  MoeRouterKind router = MoeRouterKind::kSoftmaxTopK;
  uint32_t layers = 2, dim = 24, ffn = 16, experts = 4, used = 2, heads = 4, kv_heads = 2, vocab = 37;
  uint32_t shared_ffn = 0, groups = 0, groups_used = 0, n_null = 0, n_zero = 0, n_copy = 0, n_const = 0;
  bool residual = false, tie = false;
  // deepseek2: qk_nope, qk_rope, v head, kv_lora, q_lora (0 = attn_q), leading dense blocks,
  // shared experts, weight normalisation.
  uint32_t nope = 8, rope = 4, vdim = 6, kv_lora = 10, q_lora = 0, dense = 1, n_shared = 1;
  bool weights_norm = false;
};

std::string MakeModel(const Spec& s) {
  InitOptions o;
  ModelConfig& c = o.config;
  c.arch = s.arch;
  c.n_layer = s.layers;
  c.n_embd = s.dim;
  c.n_ff_exp = s.ffn;
  c.n_expert = s.experts;
  c.n_expert_used = s.used;
  c.n_head = s.heads;
  c.n_head_kv = s.arch == Arch::kOlmoe ? s.heads : s.kv_heads;
  c.n_vocab = s.vocab;
  c.n_ctx_train = 64;
  c.router_kind = s.router;
  c.router_top_p = 0.5f;
  c.router_hash_seed = 3;
  c.n_ff_shexp = s.shared_ffn;
  c.n_expert_groups = s.groups;
  c.n_group_used = s.groups_used;
  c.n_expert_null = s.n_null;
  c.n_expert_zero = s.n_zero;
  c.n_expert_copy = s.n_copy;
  c.n_expert_const = s.n_const;
  c.expert_gating_residual = s.residual;
  if (s.arch == Arch::kDeepseek2) {
    c.n_head_kv = 0;
    o.qk_nope = s.nope;
    c.n_rot = s.rope;
    c.n_embd_head_v = s.vdim;
    c.n_lora_kv = s.kv_lora;
    c.n_lora_q = s.q_lora;
    c.n_layer_dense_lead = s.dense;
    c.n_ff = 20;
    c.n_expert_shared = s.n_shared;
    c.n_ff_shexp = 0;
    c.expert_weights_norm = s.weights_norm;
  }
  o.tie_output = s.tie;
  o.seed = 11;
  const std::string path = Dir() + "/" + s.name + ".gguf";
  InitRandomModel(o, path);
  return path;
}

MoeLayerConfig TrainSettings() {
  MoeLayerConfig t;
  t.aux_loss_coef = 0.05;
  t.z_loss_coef = 0.01;
  t.entropy_loss_coef = 0.02;
  t.ec_capacity_factor = 1.5;
  return t;
}

std::vector<int32_t> Tokens(int n_seq, int L, int V, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(static_cast<size_t>(n_seq) * (L + 1));
  for (auto& x : t) x = static_cast<int32_t>(rng() % V);
  return t;
}

template <typename T>
double Objective(const ModelParams<T>& p, const std::vector<MoeLayerConfig>& cfgs, const std::vector<int32_t>& toks,
                 int n_seq, int L, ModelCache<T>* cache) {
  TrainForwardOptions o;
  o.training = true;
  ModelForward(p, cfgs, toks.data(), nullptr, n_seq, L, o, cache);
  return cache->loss() + cache->moe_loss;
}

template <typename T>
std::vector<std::vector<int32_t>> Routing(const ModelCache<T>& c) {
  std::vector<std::vector<int32_t>> r;
  for (const auto& b : c.blocks) {
    r.push_back(b.moe.plan.expert_ids);
    r.push_back(b.moe.plan.slot_position);
  }
  return r;
}

void GradientCheck(const Spec& s) {
  SCOPED_TRACE(s.name);
  ModelParams<double> p = LoadParams<double>(MakeModel(s), /*allow_training_only=*/true);
  const int n_seq = 2, L = 5;
  const std::vector<int32_t> toks = Tokens(n_seq, L, static_cast<int>(p.config.n_vocab), 7);
  const std::vector<MoeLayerConfig> cfgs = TrainLayerConfigs(p, TrainSettings());
  ModelCache<double> cache;
  Objective(p, cfgs, toks, n_seq, L, &cache);
  const auto routing = Routing(cache);
  ModelGrads<double> g = p.NewGrads();
  ModelBackward(p, cfgs, cache, &g, nullptr);
  std::mt19937_64 rng(5);
  std::normal_distribution<double> nd(0, 1);
  int checked = 0;
  const auto grads = NamedTensors(p, g);
  for (const NamedArray<double>& param : NamedTensors(p)) {
    const NamedArray<double>* grad = nullptr;
    for (const auto& a : grads)
      if (a.name == param.name) grad = &a;
    if (grad == nullptr) continue;  // exp_probs_b: not trained by gradient
    std::vector<double>& w = *param.data;
    for (int attempt = 0; attempt < 6; ++attempt) {
      std::vector<double> u(w.size());
      for (double& x : u) x = nd(rng);
      const double h = 1e-6;
      std::vector<double> w0 = w;
      for (size_t i = 0; i < w.size(); ++i) w[i] = w0[i] + h * u[i];
      ModelCache<double> cp, cm;
      const double fp = Objective(p, cfgs, toks, n_seq, L, &cp);
      for (size_t i = 0; i < w.size(); ++i) w[i] = w0[i] - h * u[i];
      const double fm = Objective(p, cfgs, toks, n_seq, L, &cm);
      w = w0;
      if (Routing(cp) != routing || Routing(cm) != routing) continue;  // a routing flip: not smooth here
      const double numeric = (fp - fm) / (2 * h);
      double analytic = 0, mag = 0;
      for (size_t i = 0; i < w.size(); ++i) {
        analytic += (*grad->data)[i] * u[i];
        mag += std::fabs((*grad->data)[i] * u[i]);
      }
      EXPECT_NEAR(analytic, numeric, 1e-6 * (mag + 1e-3)) << param.name;
      ++checked;
      break;
    }
  }
  EXPECT_GE(checked, static_cast<int>(grads.size()) - 1) << "too many tensors hit routing flips";
}

TEST(ModelTrain, GradientsMatchCentralDifferences) {
  std::vector<Spec> specs;
  for (Arch a : {Arch::kLlama, Arch::kQwen2Moe, Arch::kQwen3Moe, Arch::kOlmoe}) {
    Spec s;
    s.arch = a;
    s.name = std::string("gc_") + ArchName(a);
    if (a == Arch::kQwen2Moe) s.shared_ffn = 8;
    if (a == Arch::kQwen3Moe) s.tie = true;
    specs.push_back(s);
  }
  Spec s;
  s.name = "gc_sigmoid_groups";
  s.router = MoeRouterKind::kSigmoidBias;
  s.experts = 6, s.used = 2, s.groups = 3, s.groups_used = 2;
  specs.push_back(s);
  // deepseek2: V2-style (softmax, attn_q, v head < qk head) and V3-style (sigmoid + bias +
  // groups, normalised weights, the q_lora bottleneck, v head > qk head), a dense first block.
  s = Spec();
  s.name = "gc_deepseek2_v2";
  s.arch = Arch::kDeepseek2;
  s.layers = 3;
  specs.push_back(s);
  s.name = "gc_deepseek2_v3";
  s.router = MoeRouterKind::kSigmoidBias;
  s.experts = 6, s.used = 2, s.groups = 3, s.groups_used = 2;
  s.q_lora = 7, s.vdim = 16, s.weights_norm = true, s.n_shared = 2;
  specs.push_back(s);
  s = Spec();
  s.name = "gc_expert_choice";
  s.router = MoeRouterKind::kExpertChoice;
  specs.push_back(s);
  s = Spec();
  s.name = "gc_hash_shared";
  s.router = MoeRouterKind::kHash;
  s.shared_ffn = 12;
  specs.push_back(s);
  s = Spec();
  s.name = "gc_top_p_zc_residual";
  s.arch = Arch::kOlmoe;
  s.router = MoeRouterKind::kTopP;
  s.used = 3, s.n_null = 1, s.n_copy = 1, s.n_const = 1, s.residual = true, s.layers = 3;
  specs.push_back(s);
  for (const Spec& sp : specs) GradientCheck(sp);
}

// Relative distance ||a - b|| / ||b||.
template <typename A, typename B>
double RelDiff(const std::vector<A>& a, const std::vector<B>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (static_cast<double>(a[i]) - b[i]) * (static_cast<double>(a[i]) - b[i]);
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

TEST(ModelTrain, FloatPathMatchesDoublePath) {
  for (Arch a : {Arch::kLlama, Arch::kQwen2Moe, Arch::kQwen3Moe, Arch::kOlmoe, Arch::kDeepseek2}) {
    Spec s;
    s.arch = a;
    s.name = std::string("fd_") + ArchName(a);
    s.dim = 64, s.ffn = 32, s.experts = 8, s.vocab = 100, s.layers = 3;
    if (a == Arch::kQwen2Moe) s.shared_ffn = 32;
    const std::string path = MakeModel(s);
    ModelParams<double> pd = LoadParams<double>(path);
    ModelParams<float> pf = LoadParams<float>(path);
    const int n_seq = 3, L = 17;
    const auto toks = Tokens(n_seq, L, 100, 9);
    ModelCache<double> cd;
    ModelCache<float> cf;
    const double ld = Objective(pd, TrainLayerConfigs(pd, TrainSettings()), toks, n_seq, L, &cd);
    const double lf = Objective(pf, TrainLayerConfigs(pf, TrainSettings()), toks, n_seq, L, &cf);
    ASSERT_EQ(Routing(cd), Routing(cf)) << "the float path routed differently (a near tie?)";
    EXPECT_NEAR(lf, ld, 1e-5 * std::fabs(ld));
    ModelGrads<double> gd = pd.NewGrads();
    ModelGrads<float> gf = pf.NewGrads();
    ThreadPool pool(2);
    ModelBackward(pd, TrainLayerConfigs(pd, TrainSettings()), cd, &gd, nullptr);
    ModelBackward(pf, TrainLayerConfigs(pf, TrainSettings()), cf, &gf, &pool);
    const auto nd = NamedTensors(pd, gd);
    const auto nf = NamedTensors(pf, gf);
    ASSERT_EQ(nd.size(), nf.size());
    for (size_t i = 0; i < nd.size(); ++i) {
      EXPECT_LT(RelDiff(*nf[i].data, *nd[i].data), 1e-4) << ArchName(a) << " " << nd[i].name;
    }
  }
}

TEST(ModelTrain, TrainingForwardComputesTheInferenceModel) {
  // deepseek2: the trainer's plain MLA against inference's absorbed one (itself held to llama.cpp).
  for (Arch a : {Arch::kLlama, Arch::kQwen2Moe, Arch::kQwen3Moe, Arch::kOlmoe, Arch::kDeepseek2}) {
    Spec s;
    s.arch = a;
    s.name = std::string("inf_") + ArchName(a);
    s.dim = 64, s.ffn = 32, s.experts = 8, s.vocab = 100, s.layers = 2;
    if (a == Arch::kQwen2Moe) s.shared_ffn = 32;
    const std::string path = MakeModel(s);
    ModelParams<float> p = LoadParams<float>(path);
    const int L = 20;
    const auto toks = Tokens(1, L, 100, 4);
    ModelCache<float> cache;
    TrainForwardOptions o;
    o.training = false;
    o.keep_logits = true;
    ModelForward(p, TrainLayerConfigs(p, MoeLayerConfig()), toks.data(), nullptr, 1, L, o, &cache);
    // The store served in memory and the file it came from give the same logits bit for bit.
    auto served = Model::FromParams(p);
    auto loaded = Model::Load(path);
    ThreadPool pool(2);
    Forward f1(*served, pool, 64), f2(*loaded, pool, 64);
    std::vector<float> l1, l2;
    f1.Eval(toks.data(), L, true, &l1);
    f2.Eval(toks.data(), L, true, &l2);
    ASSERT_EQ(l1, l2) << ArchName(a);
    EXPECT_LT(RelDiff(cache.logits, l1), 1e-5) << ArchName(a);
    // And saving the store gives a file that serves the same logits again.
    const std::string saved = Dir() + "/" + s.name + "_saved.gguf";
    SaveParams(p, saved);
    auto reloaded = Model::Load(saved);
    Forward f3(*reloaded, pool, 64);
    std::vector<float> l3;
    f3.Eval(toks.data(), L, true, &l3);
    ASSERT_EQ(l1, l3) << ArchName(a);
  }
}

TEST(ModelTrain, ThreadCountDoesNotChangeABit) {
  Spec s;
  s.name = "threads";
  s.dim = 64, s.ffn = 48, s.experts = 8, s.vocab = 200, s.layers = 2;
  ModelParams<float> p = LoadParams<float>(MakeModel(s));
  const auto cfgs = TrainLayerConfigs(p, TrainSettings());
  const int n_seq = 4, L = 32;
  const auto toks = Tokens(n_seq, L, 200, 2);
  std::vector<std::vector<float>> results;
  for (int threads : {1, 2, 3}) {
    ThreadPool pool(threads);
    ModelCache<float> cache;
    TrainForwardOptions o;
    o.pool = &pool;
    ModelForward(p, cfgs, toks.data(), nullptr, n_seq, L, o, &cache);
    ModelGrads<float> g = p.NewGrads();
    ModelBackward(p, cfgs, cache, &g, &pool);
    std::vector<float> all;
    for (const auto& a : NamedTensors(p, g)) all.insert(all.end(), a.data->begin(), a.data->end());
    results.push_back(all);
  }
  EXPECT_EQ(results[0], results[1]);
  EXPECT_EQ(results[0], results[2]);
}

}  // namespace
}  // namespace moe
