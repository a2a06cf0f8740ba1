// Routers by name in ModelConfig and the inference forward: GGUF keys round-trip, bad keys are
// one-line errors, and the forward of every servable router equals a per-token double
// reference written here (one layer, position 0, where attention reduces to Wo Wv h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "formats/gguf.h"
#include "model/config.h"
#include "model/forward.h"
#include "model/init.h"
#include "model/model.h"
#include "moe/routing.h"
#include "util/error.h"
#include "test_dir.h"

namespace moe {
namespace {

std::string Dir() { return TestDir("router"); }

struct ModelSpec {
  Arch arch = Arch::kLlama;
  MoeRouterKind router = MoeRouterKind::kSoftmaxTopK;
  uint32_t layers = 1, experts = 8, used = 2;
  float top_p = 0.4f;
  uint64_t hash_seed = 0;
  uint64_t seed = 3;
  // Expert options (config.h).
  uint32_t groups = 0, groups_used = 0;
  uint32_t n_null = 0, n_zero = 0, n_copy = 0, n_const = 0;
  uint32_t shared_ffn = 0, n_shared = 0;
  float scale = 1.0f;
  bool residual = false;
};

std::string MakeModel(const ModelSpec& s, const std::string& name) {
  InitOptions o;
  o.config.arch = s.arch;
  o.config.n_layer = s.layers;
  o.config.n_embd = 64;
  o.config.n_ff_exp = 48;
  o.config.n_expert = s.experts;
  o.config.n_expert_used = s.used;
  o.config.n_head = 4;
  o.config.n_head_kv = s.arch == Arch::kOlmoe ? 4 : 2;  // olmoe normalises K over n_embd
  o.config.n_vocab = 300;
  o.config.n_ctx_train = 128;
  o.config.router_kind = s.router;
  o.config.router_top_p = s.top_p;
  o.config.router_hash_seed = s.hash_seed;
  o.config.n_expert_groups = s.groups;
  o.config.n_group_used = s.groups_used;
  o.config.n_expert_null = s.n_null;
  o.config.n_expert_zero = s.n_zero;
  o.config.n_expert_copy = s.n_copy;
  o.config.n_expert_const = s.n_const;
  o.config.n_ff_shexp = s.shared_ffn;
  o.config.n_expert_shared = s.n_shared;
  o.config.expert_weights_scale = s.scale;
  o.config.expert_gating_residual = s.residual;
  o.seed = s.seed;
  const std::string path = Dir() + "/" + name + ".gguf";
  InitRandomModel(o, path);
  return path;
}

// ---- GGUF keys ------------------------------------------------------------------------------

ModelConfig SmallConfig(MoeRouterKind kind) {
  ModelConfig c;
  c.arch = Arch::kLlama;
  c.n_layer = 1;
  c.n_embd = 32;
  c.n_head = 2;
  c.n_head_kv = 2;
  c.n_embd_head_k = c.n_embd_head_v = c.n_rot = 16;
  c.n_ctx_train = 64;
  c.n_vocab = 50;
  c.n_ff = c.n_ff_exp = 16;
  c.n_expert = 4;
  c.n_expert_used = 2;
  c.router_kind = kind;
  ApplyArchTraits(c);
  return c;
}

// Writes c's keys (no tensors) plus `extra`, and reads the config back.
template <typename Extra>
ModelConfig WriteRead(const ModelConfig& c, const std::string& name, Extra extra, bool allow_training_only = false) {
  GgufWriter w;
  WriteConfig(c, w);
  extra(w);
  const std::string path = Dir() + "/" + name + ".gguf";
  w.Write(path);
  auto f = GgufFile::Open(path);
  return ReadConfig(*f, allow_training_only);
}
ModelConfig WriteRead(const ModelConfig& c, const std::string& name) {
  return WriteRead(c, name, [](GgufWriter&) {});
}

std::string ErrorOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool Contains(const std::string& s, const std::string& needle) { return s.find(needle) != std::string::npos; }

TEST(RouterConfig, KeysRoundTrip) {
  ModelConfig c = SmallConfig(MoeRouterKind::kTopP);
  c.router_top_p = 0.65f;
  ModelConfig r = WriteRead(c, "rt_top_p");
  EXPECT_EQ(r.router_kind, MoeRouterKind::kTopP);
  EXPECT_EQ(r.router_top_p, 0.65f);
  EXPECT_EQ(r.moe.router, MoeRouterKind::kTopP);
  EXPECT_EQ(r.moe.top_p, 0.65f);
  EXPECT_EQ(r.moe.k, 2);

  c = SmallConfig(MoeRouterKind::kHash);
  c.router_hash_seed = 0x123456789abcdef0ULL;  // needs all 64 bits
  r = WriteRead(c, "rt_hash");
  EXPECT_EQ(r.router_kind, MoeRouterKind::kHash);
  EXPECT_EQ(r.moe.router, MoeRouterKind::kHash);
  EXPECT_EQ(r.moe.hash_seed, 0x123456789abcdef0ULL);

  r = WriteRead(SmallConfig(MoeRouterKind::kSigmoidBias), "rt_sig");
  EXPECT_EQ(r.router_kind, MoeRouterKind::kSigmoidBias);
  EXPECT_EQ(r.moe.router, MoeRouterKind::kSigmoidBias);
  EXPECT_TRUE(r.moe.norm_topk);  // the architecture's normalisation stays

  r = WriteRead(SmallConfig(MoeRouterKind::kSoftmaxTopK), "rt_default");
  EXPECT_EQ(r.router_kind, MoeRouterKind::kSoftmaxTopK);
  EXPECT_EQ(r.moe.router, MoeRouterKind::kSoftmaxTopK);
}

TEST(RouterConfig, DefaultRouterWritesNoRouterKeys) {
  // Default files must stay exactly what llama.cpp reads (the conformance suite compares).
  GgufWriter w;
  WriteConfig(SmallConfig(MoeRouterKind::kSoftmaxTopK), w);
  w.Write(Dir() + "/default_keys.gguf");
  auto f = GgufFile::Open(Dir() + "/default_keys.gguf");
  for (const auto& [key, v] : f->kvs()) {
    EXPECT_FALSE(Contains(key, "router")) << key;
    EXPECT_FALSE(Contains(key, "gating")) << key;
  }
  // sigmoid_bias also writes llama.cpp's gating convention.
  GgufWriter w2;
  WriteConfig(SmallConfig(MoeRouterKind::kSigmoidBias), w2);
  w2.Write(Dir() + "/sig_keys.gguf");
  auto f2 = GgufFile::Open(Dir() + "/sig_keys.gguf");
  EXPECT_EQ(f2->GetU32Opt("llama.expert_gating_func").value_or(0), 2u);
  EXPECT_EQ(f2->GetStringOpt("llama.expert_router").value_or(""), "sigmoid_bias");
}

TEST(RouterConfig, ExpertChoiceIsRefusedUnlessInspecting) {
  const ModelConfig c = SmallConfig(MoeRouterKind::kExpertChoice);
  const std::string msg = ErrorOf([&] { WriteRead(c, "ec"); });
  EXPECT_TRUE(Contains(msg, "expert_choice") && Contains(msg, "training-only")) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos);
  const ModelConfig r = WriteRead(c, "ec", [](GgufWriter&) {}, /*allow_training_only=*/true);
  EXPECT_EQ(r.router_kind, MoeRouterKind::kExpertChoice);
  EXPECT_FALSE(UnservableRouterReason(r).empty());
}

TEST(RouterConfig, BadRouterKeysAreOneLineErrors) {
  const ModelConfig c = SmallConfig(MoeRouterKind::kSoftmaxTopK);
  std::string msg = ErrorOf([&] { WriteRead(c, "bad1", [](GgufWriter& w) { w.SetString("llama.expert_router", "magic"); }); });
  EXPECT_TRUE(Contains(msg, "magic") && Contains(msg, MoeRouterNames())) << msg;

  // llama.cpp's sigmoid gating without a router name reads as sigmoid_bias.
  const ModelConfig r = WriteRead(c, "gate2", [](GgufWriter& w) { w.SetU32("llama.expert_gating_func", 2); });
  EXPECT_EQ(r.router_kind, MoeRouterKind::kSigmoidBias);
  EXPECT_EQ(r.moe.router, MoeRouterKind::kSigmoidBias);
  msg = ErrorOf([&] {
    WriteRead(c, "bad2", [](GgufWriter& w) {
      w.SetU32("llama.expert_gating_func", 2);
      w.SetString("llama.expert_router", "top_p");
    });
  });
  EXPECT_TRUE(Contains(msg, "expert_gating_func") && Contains(msg, "top_p")) << msg;
  msg = ErrorOf([&] { WriteRead(c, "bad3", [](GgufWriter& w) { w.SetU32("llama.expert_gating_func", 4); }); });
  EXPECT_TRUE(Contains(msg, "expert_gating_func")) << msg;

  msg = ErrorOf([&] { WriteRead(c, "bad4", [](GgufWriter& w) { w.SetF32("llama.expert_router_top_p", 0.5f); }); });
  EXPECT_TRUE(Contains(msg, "expert_router_top_p") && Contains(msg, "softmax_topk")) << msg;
  ModelConfig tp = SmallConfig(MoeRouterKind::kTopP);
  tp.router_top_p = 1.5f;
  msg = ErrorOf([&] { WriteRead(tp, "bad5"); });
  EXPECT_TRUE(Contains(msg, "top_p") && Contains(msg, "(0, 1]")) << msg;
  tp.router_top_p = 0.0f;
  EXPECT_FALSE(ErrorOf([&] { WriteRead(tp, "bad6"); }).empty());
  tp.router_top_p = 1.0f;
  EXPECT_TRUE(ErrorOf([&] { WriteRead(tp, "ok_top_p1"); }).empty());

  // hash seed: u64 or u32; other types are errors.
  const ModelConfig h = SmallConfig(MoeRouterKind::kHash);
  EXPECT_EQ(WriteRead(h, "seed32", [](GgufWriter& w) { w.SetU32("llama.expert_router_hash_seed", 77); }).router_hash_seed, 77u);
  msg = ErrorOf([&] { WriteRead(h, "bad7", [](GgufWriter& w) { w.SetString("llama.expert_router_hash_seed", "7"); }); });
  EXPECT_TRUE(Contains(msg, "expert_router_hash_seed") && Contains(msg, "u64")) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos);
}

// Copies a model file with one key added or replaced (a file moe init would not write).
std::string RewriteWithKey(const std::string& src, const std::string& dst, const std::string& key,
                           const std::string& value) {
  auto f = GgufFile::Open(src);
  GgufWriter w;
  for (const auto& [k, v] : f->kvs()) w.SetValue(k, v);
  w.SetString(key, value);
  for (const GgufTensorInfo& t : f->tensors()) {
    std::vector<int64_t> ne(t.view.ne, t.view.ne + t.view.n_dims);
    w.AddTensor(t.view.name, t.view.dtype, ne, t.view.data, t.view.NumBytes());
  }
  w.Write(dst);
  return dst;
}

TEST(RouterModel, TensorsFollowTheRouter) {
  ModelSpec s;
  const std::string base = MakeModel(s, "tensors_default");
  // sigmoid_bias needs exp_probs_b; a default file relabelled is missing it.
  const std::string sig = RewriteWithKey(base, Dir() + "/sig_missing.gguf", "llama.expert_router", "sigmoid_bias");
  std::string msg = ErrorOf([&] { Model::Load(sig); });
  EXPECT_TRUE(Contains(msg, "blk.0.exp_probs_b.bias")) << msg;
  // hash ignores a present router matrix; moe init writes none.
  const std::string hash = RewriteWithKey(base, Dir() + "/hash_with_router.gguf", "llama.expert_router", "hash");
  auto hm = Model::Load(hash);
  EXPECT_EQ(hm->layers[0].gate_inp, nullptr);
  s.router = MoeRouterKind::kHash;
  auto hm2 = Model::Load(MakeModel(s, "tensors_hash"));
  EXPECT_EQ(hm2->file().FindTensor("blk.0.ffn_gate_inp.weight"), nullptr);
  s.router = MoeRouterKind::kSigmoidBias;
  auto sm = Model::Load(MakeModel(s, "tensors_sig"));
  ASSERT_NE(sm->layers[0].exp_probs_b, nullptr);
  EXPECT_EQ(sm->layers[0].exp_probs_b->ne[0], 8);
  // expert_choice: loads for inspection only, and the forward refuses it.
  const std::string ec = RewriteWithKey(base, Dir() + "/ec.gguf", "llama.expert_router", "expert_choice");
  msg = ErrorOf([&] { Model::Load(ec); });
  EXPECT_TRUE(Contains(msg, "expert_choice") && Contains(msg, "training-only")) << msg;
  auto em = Model::Load(ec, /*allow_training_only=*/true);
  ThreadPool pool(1);
  msg = ErrorOf([&] { Forward f(*em, pool, 8); });
  EXPECT_TRUE(Contains(msg, "expert_choice")) << msg;
}

// ---- forward against a per-token double reference -------------------------------------------

using Vec = std::vector<double>;

Vec RmsNormRef(const Vec& x, const float* w, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double r = 1.0 / std::sqrt(ss / x.size() + eps);
  Vec y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * w[i];
  return y;
}

// y[out] = W x for W stored as out rows of length in (f32).
Vec MatVec(const float* W, int64_t in, int64_t out, const Vec& x) {
  Vec y(out, 0.0);
  for (int64_t o = 0; o < out; ++o) {
    double a = 0;
    for (int64_t i = 0; i < in; ++i) a += static_cast<double>(W[o * in + i]) * x[i];
    y[o] = a;
  }
  return y;
}

struct RefRouting {
  std::vector<int> ids;
  Vec w;
  bool ambiguous = false;  // a decision within float rounding of its threshold
};

// The router of one token from its logits (R targets: FFN experts, then null / zero / copy /
// const), written from the definitions in docs/routers.md.
RefRouting RouteRef(const ModelConfig& c, const LayerWeights& L, const Vec& logit, int32_t token) {
  const int X = static_cast<int>(c.n_expert), K = static_cast<int>(c.n_expert_used);
  const int R = static_cast<int>(c.n_router());
  RefRouting r;
  if (c.router_kind == MoeRouterKind::kHash) {
    r.ids.resize(K);
    HashExperts(c.router_hash_seed, token, X, K, r.ids.data());  // checked in routing_test.cc
    r.w.assign(K, c.expert_weights_scale / K);
    return r;
  }
  Vec p(R), score(R);
  if (c.router_kind == MoeRouterKind::kSigmoidBias) {
    for (int e = 0; e < R; ++e) {
      p[e] = 1.0 / (1.0 + std::exp(-logit[e]));
      score[e] = p[e] + L.exp_probs_b->F32()[e];
    }
  } else {
    const double mx = *std::max_element(logit.begin(), logit.end());
    double s = 0;
    for (int e = 0; e < R; ++e) s += p[e] = std::exp(logit[e] - mx);
    for (double& v : p) v /= s;
    score = p;
  }
  if (c.n_expert_groups > 1) {  // only the groups with the best top-2 sums compete
    const int G = static_cast<int>(c.n_expert_groups), gs = X / G;
    std::vector<std::pair<double, int>> gsc;
    for (int g = 0; g < G; ++g) {
      Vec v(score.begin() + g * gs, score.begin() + (g + 1) * gs);
      std::sort(v.rbegin(), v.rend());
      gsc.push_back({v[0] + v[1], g});
    }
    std::stable_sort(gsc.begin(), gsc.end(), [](auto& a, auto& b) { return a.first > b.first; });
    if (gsc[c.n_group_used - 1].first - gsc[c.n_group_used].first < 1e-5) r.ambiguous = true;
    for (int q = static_cast<int>(c.n_group_used); q < G; ++q)
      for (int e = 0; e < gs; ++e) score[gsc[q].second * gs + e] = -1e300;
  }
  std::vector<int> idx(R);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return score[a] > score[b]; });
  int n = K;
  if (c.router_kind == MoeRouterKind::kTopP) {
    double cum = 0;
    for (n = 0; n < K;) {
      cum += p[idx[n++]];
      if (std::fabs(cum - c.router_top_p) < 1e-5 && n < K) r.ambiguous = true;
      if (cum >= c.router_top_p) break;
    }
  } else if (K < R && score[idx[K - 1]] - score[idx[K]] < 1e-5) {
    r.ambiguous = true;
  }
  const bool norm = c.arch == Arch::kLlama || c.arch == Arch::kQwen3Moe;  // the architectures' rule
  auto is_null = [&](int id) { return id >= X && id < X + static_cast<int>(c.n_expert_null); };
  double used = 0;  // null picks keep their probability (AdaMoE)
  for (int j = 0; j < n; ++j) used += is_null(idx[j]) ? 0.0 : p[idx[j]];
  for (int j = 0; j < n; ++j) {
    r.ids.push_back(idx[j]);
    const double w = norm && !is_null(idx[j]) ? p[idx[j]] / used : p[idx[j]];
    r.w.push_back(w * c.expert_weights_scale);
  }
  return r;
}

Vec SwigluRef(const float* wg, const float* wu, const float* wd, int64_t E, int64_t Fx, const Vec& h) {
  const Vec g = MatVec(wg, E, Fx, h);
  const Vec u = MatVec(wu, E, Fx, h);
  Vec a(Fx);
  for (int64_t i = 0; i < Fx; ++i) a[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
  return MatVec(wd, Fx, E, a);
}

// Logits of `token` alone at position 0: attention over one position is softmax = 1, so each head
// outputs its KV group's V (the Q/K path, norms and RoPE included, cannot matter). Every layer
// routes with the definitions above; the MoE output sums the picks (FFN experts, zero: 0, copy:
// h, const: a1 h + a2 v), then the shared experts (qwen2moe: times sigmoid(w . h)).
Vec ReferenceLogits(const Model& m, int32_t token, RefRouting* routing) {
  const ModelConfig& c = m.config();
  const int64_t E = c.n_embd, Fx = c.n_ff_exp, D = c.n_embd_head_k;
  const int64_t H = c.n_head, group = c.n_head / c.n_head_kv;
  const int X = static_cast<int>(c.n_expert), R = static_cast<int>(c.n_router());
  const int zero0 = X + static_cast<int>(c.n_expert_null), copy0 = zero0 + static_cast<int>(c.n_expert_zero);
  const int const0 = copy0 + static_cast<int>(c.n_expert_copy);
  Vec x(m.token_embd->F32() + token * E, m.token_embd->F32() + (token + 1) * E);
  Vec prev_logit;
  bool ambiguous = false;
  for (uint32_t il = 0; il < c.n_layer; ++il) {
    const LayerWeights& L = m.layers[il];
    Vec h = RmsNormRef(x, L.attn_norm->F32(), c.rms_eps);
    Vec v = MatVec(L.wv->F32(), E, c.n_v(), h);
    if (L.bv) for (int64_t i = 0; i < c.n_v(); ++i) v[i] += L.bv->F32()[i];
    Vec att(c.n_q());
    for (int64_t hd = 0; hd < H; ++hd)
      for (int64_t d = 0; d < D; ++d) att[hd * D + d] = v[(hd / group) * D + d];
    const Vec o = MatVec(L.wo->F32(), c.n_q(), E, att);
    for (int64_t i = 0; i < E; ++i) x[i] += o[i];
    h = RmsNormRef(x, L.ffn_norm->F32(), c.rms_eps);
    Vec logit;
    if (c.router_kind != MoeRouterKind::kHash) {
      logit = MatVec(L.gate_inp->F32(), E, R, h);
      if (L.gate_res) {
        const Vec add = MatVec(L.gate_res->F32(), R, R, prev_logit);
        for (int e = 0; e < R; ++e) logit[e] += add[e];
      }
      prev_logit = logit;
    }
    *routing = RouteRef(c, L, logit, token);
    ambiguous = ambiguous || routing->ambiguous;
    for (size_t j = 0; j < routing->ids.size(); ++j) {
      const int e = routing->ids[j];
      Vec y(E, 0.0);
      if (e < X) {
        y = SwigluRef(L.gate_exps->F32() + e * Fx * E, L.up_exps->F32() + e * Fx * E,
                      L.down_exps->F32() + e * E * Fx, E, Fx, h);
      } else if (e >= copy0 && e < const0) {
        y = h;
      } else if (e >= const0) {
        const int ci = e - const0;
        const Vec z = MatVec(L.zc_mix->F32() + ci * 2 * E, E, 2, h);
        const double mx = std::max(z[0], z[1]);
        const double a0 = std::exp(z[0] - mx), a1 = std::exp(z[1] - mx);
        for (int64_t i = 0; i < E; ++i)
          y[i] = (a0 * h[i] + a1 * L.zc_const->F32()[ci * E + i]) / (a0 + a1);
      }  // null and zero experts: 0
      for (int64_t i = 0; i < E; ++i) x[i] += routing->w[j] * y[i];
    }
    if (L.gate_shexp) {
      const Vec y = SwigluRef(L.gate_shexp->F32(), L.up_shexp->F32(), L.down_shexp->F32(), E, c.n_ff_shexp, h);
      double g = 1.0;
      if (L.gate_inp_shexp) {
        double z = 0;
        for (int64_t i = 0; i < E; ++i) z += L.gate_inp_shexp->F32()[i] * h[i];
        g = 1.0 / (1.0 + std::exp(-z));
      }
      for (int64_t i = 0; i < E; ++i) x[i] += g * y[i];
    }
  }
  routing->ambiguous = ambiguous;
  const Vec h = RmsNormRef(x, m.output_norm->F32(), c.rms_eps);
  return MatVec(m.output->F32(), E, c.n_vocab, h);
}

// Every token of the vocabulary's first n_tokens ids, alone at position 0.
void CheckAgainstReference(const std::string& path, int n_tokens, int* n_partial = nullptr) {
  auto m = Model::Load(path);
  ThreadPool pool(2);
  Forward fwd(*m, pool, 4);
  const int V = static_cast<int>(m->config().n_vocab);
  int checked = 0;
  for (int32_t tok = 0; tok < n_tokens; ++tok) {
    RefRouting r;
    const Vec ref = ReferenceLogits(*m, tok, &r);
    if (r.ambiguous) continue;
    ++checked;
    if (n_partial && static_cast<int>(r.ids.size()) < static_cast<int>(m->config().n_expert_used)) ++*n_partial;
    std::vector<float> logits;
    fwd.Reset();
    fwd.Eval(&tok, 1, false, &logits);
    double scale = 1, diff = 0;
    for (int i = 0; i < V; ++i) {
      scale = std::max(scale, std::fabs(ref[i]));
      diff = std::max(diff, std::fabs(ref[i] - logits[i]));
    }
    ASSERT_LE(diff, 1e-4 * scale) << path << " token " << tok;
  }
  EXPECT_GE(checked, n_tokens * 9 / 10) << path;
}

TEST(RouterModel, ForwardMatchesPerTokenReferenceForEveryServableRouter) {
  ModelSpec s;
  CheckAgainstReference(MakeModel(s, "ref_softmax"), 40);
  s.router = MoeRouterKind::kSigmoidBias;
  CheckAgainstReference(MakeModel(s, "ref_sigmoid"), 40);
  s.router = MoeRouterKind::kHash;
  s.hash_seed = 99;
  s.used = 1;  // the paper's one expert with weight 1
  CheckAgainstReference(MakeModel(s, "ref_hash1"), 40);
  s.used = 3;
  CheckAgainstReference(MakeModel(s, "ref_hash3"), 40);
  // top_p with k = E: tokens use 1..E experts; the unused slots must contribute nothing.
  s.router = MoeRouterKind::kTopP;
  s.used = 8;
  s.top_p = 0.5f;
  int partial = 0;
  CheckAgainstReference(MakeModel(s, "ref_top_p"), 40, &partial);
  EXPECT_GT(partial, 20);
  s.arch = Arch::kOlmoe;  // no renormalisation
  s.used = 4;
  s.top_p = 0.3f;
  partial = 0;
  CheckAgainstReference(MakeModel(s, "ref_top_p_olmoe"), 40, &partial);
  EXPECT_GT(partial, 20);
}

TEST(RouterModel, ForwardMatchesPerTokenReferenceForEveryExpertOption) {
  ModelSpec s;
  s.layers = 3;
  s.experts = 8;
  s.used = 3;
  s.groups = 4;
  s.groups_used = 2;
  s.scale = 1.7f;
  CheckAgainstReference(MakeModel(s, "ref_groups_scale"), 40);
  s.router = MoeRouterKind::kSigmoidBias;
  CheckAgainstReference(MakeModel(s, "ref_groups_sigmoid"), 40);
  s = ModelSpec();
  s.layers = 3;
  s.n_null = 3;
  s.used = 3;
  CheckAgainstReference(MakeModel(s, "ref_null"), 40);
  s.n_zero = 1, s.n_copy = 1, s.n_const = 2, s.residual = true;
  CheckAgainstReference(MakeModel(s, "ref_zc_residual"), 40);
  s.arch = Arch::kOlmoe;
  s.router = MoeRouterKind::kTopP;
  s.used = 5;
  s.top_p = 0.6f;
  CheckAgainstReference(MakeModel(s, "ref_zc_top_p_olmoe"), 40);
  s = ModelSpec();  // several shared experts on llama (fused), and qwen2moe's gated one
  s.layers = 2;
  s.shared_ffn = 96;
  s.n_shared = 2;
  CheckAgainstReference(MakeModel(s, "ref_shared_llama"), 40);
  s.arch = Arch::kQwen2Moe;
  s.n_shared = 0;
  CheckAgainstReference(MakeModel(s, "ref_shared_qwen2moe"), 40);
}

std::vector<float> AllLogits(const std::string& path, const std::vector<int32_t>& toks, int n_batch) {
  auto m = Model::Load(path);
  ThreadPool pool(2);
  Forward f(*m, pool, 64, n_batch);
  std::vector<float> out;
  f.Eval(toks.data(), static_cast<int>(toks.size()), true, &out);
  return out;
}

std::vector<int32_t> SomeTokens(int n) {
  std::mt19937 rng(4);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % 300);
  return t;
}

TEST(RouterModel, TopPOneWithKEqualsESameAsSoftmaxTopK) {
  // top_p = 1 with k = E uses every expert, in the same order with the same weights, so the
  // logits are bit-identical to softmax_topk with k = E (same seed: the same weights).
  for (Arch arch : {Arch::kOlmoe, Arch::kLlama}) {
    ModelSpec s;
    s.arch = arch;
    s.layers = 2;
    s.experts = 6;
    s.used = 6;
    const std::string a = MakeModel(s, "all_softmax");
    s.router = MoeRouterKind::kTopP;
    s.top_p = 1.0f;
    const std::string b = MakeModel(s, "all_top_p");
    const std::vector<int32_t> toks = SomeTokens(21);
    const std::vector<float> la = AllLogits(a, toks, 8), lb = AllLogits(b, toks, 8);
    ASSERT_EQ(la.size(), lb.size());
    for (size_t i = 0; i < la.size(); ++i) ASSERT_EQ(la[i], lb[i]) << ArchName(arch) << " " << i;
  }
}

TEST(RouterModel, EveryRouterPrefillEqualsDecode) {
  // Chunked prefill hands each chunk its own token ids (hash) and drops unused slots (top_p).
  const MoeRouterKind kinds[] = {MoeRouterKind::kSoftmaxTopK, MoeRouterKind::kSigmoidBias,
                                 MoeRouterKind::kHash, MoeRouterKind::kTopP};
  for (MoeRouterKind kind : kinds) {
    for (Arch arch : {Arch::kLlama, Arch::kQwen3Moe}) {
      ModelSpec s;
      s.arch = arch;
      s.layers = 2;
      s.router = kind;
      s.used = kind == MoeRouterKind::kTopP ? 4 : 2;
      s.top_p = 0.6f;
      s.hash_seed = 5;
      const std::string path = MakeModel(s, std::string("pd_") + MoeRouterName(kind) + "_" + ArchName(arch));
      const std::vector<int32_t> toks = SomeTokens(19);
      const std::vector<float> all = AllLogits(path, toks, 8);
      auto m = Model::Load(path);
      ThreadPool pool(1);
      Forward step(*m, pool, 64);
      std::vector<float> one;
      const int V = static_cast<int>(m->config().n_vocab);
      for (size_t i = 0; i < toks.size(); ++i) {
        step.Eval(&toks[i], 1, false, &one);
        for (int j = 0; j < V; ++j) {
          ASSERT_TRUE(std::isfinite(one[j]));
          ASSERT_NEAR(one[j], all[i * V + j], 2e-4) << path << " position " << i;
        }
      }
    }
  }
}

}  // namespace
}  // namespace moe
