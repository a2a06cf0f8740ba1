// One router for training and inference: the inference forward (moe run's path) and the training
// layer's float path (MoeForward) are fed the same router logits for every router kind and option
// the model files can hold, and must choose the same targets with bit-identical gate weights and
// the same RoutingPlan (one convention: ids, -1 for unused slots, rows of the FFN experts only).
//
// The inference side records its logits and plans through Forward's routing observer. The
// training side sees exactly those logits by routing an identity matrix: with d_model = R and
// W_r = I, each logit is one FMA chain x_j * 1 + zeros, which is x_j bit for bit.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "model/config.h"
#include "model/forward.h"
#include "model/init.h"
#include "model/model.h"
#include "moe/moe_layer.h"
#include "util/threadpool.h"
#include "test_dir.h"

namespace moe {
namespace {

std::string Dir() { return TestDir("one_router"); }

struct Capture {
  int layer = 0;
  std::vector<float> logits;   // [n][R] (empty for hash)
  std::vector<int32_t> tokens;  // [n]
  RoutingPlan plan;
};

struct Case {
  std::string name;
  Arch arch = Arch::kLlama;
  MoeRouterKind router = MoeRouterKind::kSoftmaxTopK;
  uint32_t experts = 8, used = 2;
  uint32_t groups = 0, groups_used = 0;
  uint32_t n_null = 0, n_zero = 0, n_copy = 0, n_const = 0;
  float scale = 1.0f;
  bool residual = false;
};

void CheckCase(const Case& cs) {
  SCOPED_TRACE(cs.name);
  InitOptions o;
  ModelConfig& c = o.config;
  c.arch = cs.arch;
  c.n_layer = 3;
  c.n_embd = 64;
  c.n_ff_exp = 32;
  c.n_head = 4;
  c.n_head_kv = 4;
  c.n_vocab = 500;
  c.n_ctx_train = 256;
  c.n_expert = cs.experts;
  c.n_expert_used = cs.used;
  c.router_kind = cs.router;
  c.router_top_p = 0.55f;
  c.router_hash_seed = 1234;
  c.n_expert_groups = cs.groups;
  c.n_group_used = cs.groups_used;
  c.n_expert_null = cs.n_null;
  c.n_expert_zero = cs.n_zero;
  c.n_expert_copy = cs.n_copy;
  c.n_expert_const = cs.n_const;
  c.expert_weights_scale = cs.scale;
  c.expert_gating_residual = cs.residual;
  if (cs.arch == Arch::kQwen2Moe) c.n_ff_shexp = 32;
  o.seed = 17;
  const std::string path = Dir() + "/" + cs.name + ".gguf";
  InitRandomModel(o, path);
  auto model = Model::Load(path);
  const ModelConfig& mc = model->config();
  const int R = static_cast<int>(mc.n_router());

  // Inference: a chunked prefill and some decode steps, every routing decision recorded.
  std::vector<Capture> caps;
  ThreadPool pool(2);
  Forward fwd(*model, pool, 128, /*n_batch=*/16);
  fwd.SetRoutingObserver([&](int layer, int n, const float* logits, const float*, const int32_t* tokens,
                              const RoutingPlan& plan) {
    Capture cap;
    cap.layer = layer;
    if (logits) cap.logits.assign(logits, logits + static_cast<size_t>(n) * R);
    cap.tokens.assign(tokens, tokens + n);
    cap.plan = plan;
    caps.push_back(std::move(cap));
  });
  std::mt19937 rng(5);
  std::vector<int32_t> toks(37);
  for (auto& t : toks) t = static_cast<int32_t>(rng() % mc.n_vocab);
  std::vector<float> out;
  fwd.Eval(toks.data(), static_cast<int>(toks.size()), false, &out);
  for (int i = 0; i < 5; ++i) {
    const int32_t t = static_cast<int32_t>(rng() % mc.n_vocab);
    fwd.Eval(&t, 1, false, &out);
  }
  ASSERT_EQ(caps.size(), (3u + 5u) * mc.n_layer);

  // Training layer, float path: d_model = R and the identity router reproduce the logits exactly.
  int n_partial = 0, n_zc = 0;
  for (const Capture& cap : caps) {
    const int n = static_cast<int>(cap.tokens.size());
    MoeLayerConfig cfg = mc.moe;
    cfg.gating_residual = false;  // the recorded logits include the residual already
    cfg.n_shared = 0;
    cfg.d_ff_shared = 0;
    cfg.shared_gate = false;
    const bool hash = cfg.router == MoeRouterKind::kHash;
    cfg.d_model = hash ? 8 : R;
    MoeWeights<float> w;
    w.Resize(cfg);
    for (int e = 0; e < R && !hash; ++e) w.router[static_cast<size_t>(e) * R + e] = 1.0f;
    const LayerWeights& L = model->layers[cap.layer];
    if (L.exp_probs_b) w.exp_probs_b.assign(L.exp_probs_b->F32(), L.exp_probs_b->F32() + mc.n_expert);
    std::vector<float> x = hash ? std::vector<float>(static_cast<size_t>(n) * cfg.d_model, 0.5f) : cap.logits;
    std::vector<float> y(x.size());
    MoeCache<float> cache;
    MoeForwardOptions opt;
    opt.token_ids = cap.tokens.data();
    MoeForward(cfg, w, x.data(), n, y.data(), &cache, opt);
    if (!hash) {
      ASSERT_EQ(cache.logits, cap.logits) << "layer " << cap.layer;
    }
    const RoutingPlan& a = cap.plan;
    const RoutingPlan& b = cache.plan;
    ASSERT_EQ(a.expert_ids, b.expert_ids) << "layer " << cap.layer;
    ASSERT_EQ(a.weights, b.weights) << "layer " << cap.layer;  // bit-identical floats
    ASSERT_EQ(a.n_targets, b.n_targets);
    ASSERT_EQ(a.expert_offsets, b.expert_offsets);
    ASSERT_EQ(a.sorted_slots, b.sorted_slots);
    ASSERT_EQ(a.slot_position, b.slot_position);
    for (size_t s = 0; s < a.expert_ids.size(); ++s) {
      n_partial += a.expert_ids[s] < 0;
      n_zc += a.expert_ids[s] >= cfg.n_expert;
    }
  }
  if (cs.router == MoeRouterKind::kTopP) {
    EXPECT_GT(n_partial, 0) << "top_p never left a slot unused";
  }
  if (cs.n_null + cs.n_zero + cs.n_copy + cs.n_const > 0) {
    EXPECT_GT(n_zc, 0) << "no null / zero-computation pick";
  }
}

TEST(OneRouter, InferenceAndTrainingLayerRouteIdentically) {
  std::vector<Case> cases;
  for (Arch arch : {Arch::kLlama, Arch::kOlmoe, Arch::kQwen2Moe}) {
    const std::string a = ArchName(arch);
    cases.push_back({a + "_softmax", arch});
    Case c{a + "_sigmoid", arch, MoeRouterKind::kSigmoidBias};
    cases.push_back(c);
    c = {a + "_hash", arch, MoeRouterKind::kHash};
    c.used = 3;
    cases.push_back(c);
    c = {a + "_top_p", arch, MoeRouterKind::kTopP};
    c.used = 5;
    cases.push_back(c);
  }
  Case c{"groups_softmax", Arch::kLlama};
  c.experts = 16, c.used = 4, c.groups = 4, c.groups_used = 2;
  cases.push_back(c);
  c.name = "groups_sigmoid_scaled", c.router = MoeRouterKind::kSigmoidBias, c.scale = 2.5f;
  cases.push_back(c);
  c = {"null_experts", Arch::kLlama};
  c.n_null = 4, c.used = 3;
  cases.push_back(c);
  c = {"zero_computation", Arch::kOlmoe};
  c.n_zero = 1, c.n_copy = 1, c.n_const = 2, c.used = 3, c.residual = true;
  cases.push_back(c);
  c = {"top_p_null_residual", Arch::kLlama, MoeRouterKind::kTopP};
  c.n_null = 2, c.n_const = 1, c.used = 4, c.residual = true;
  cases.push_back(c);
  for (const Case& cs : cases) CheckCase(cs);
}

}  // namespace
}  // namespace moe
