// The MoE layer's equivalence suite (DESIGN.md §4-5): dense FFN, grouped == naive (outputs and all
// gradients), dropless == capacity, permute/unpermute, central differences at a fixed assignment,
// the sigmoid bias, group-limited top-k, batch invariance, telemetry.
#include "moe/moe_layer.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "moe_layer_test_util.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe {
namespace {

// ---- 1 expert == dense SwiGLU ---------------------------------------------------------------

template <typename T>
void OneExpertIsDense() {
  MoeLayerConfig cfg = BaseConfig(19, 23, 1, 1);
  cfg.norm_topk = true;
  const int n = 9;
  MoeWeights<T> w = RandomWeights<T>(cfg, 11);
  std::mt19937_64 rng(5);
  std::vector<T> x = Randn<T>(static_cast<size_t>(n) * cfg.d_model, rng, 1.0), y(x.size());
  MoeCache<T> cache;
  MoeForward(cfg, w, x.data(), n, y.data(), &cache);
  // Dense FFN in double, written here.
  const int D = cfg.d_model, F = cfg.d_ff;
  std::vector<T> ref(y.size());
  for (int t = 0; t < n; ++t) {
    std::vector<double> a(F);
    for (int f = 0; f < F; ++f) {
      double g = 0, u = 0;
      for (int d = 0; d < D; ++d) {
        g += static_cast<double>(w.gate_exps[f * D + d]) * x[t * D + d];
        u += static_cast<double>(w.up_exps[f * D + d]) * x[t * D + d];
      }
      a[f] = g / (1.0 + std::exp(-g)) * u;
    }
    for (int d = 0; d < D; ++d) {
      double o = 0;
      for (int f = 0; f < F; ++f) o += static_cast<double>(w.down_exps[d * F + f]) * a[f];
      ref[t * D + d] = static_cast<T>(o);
    }
  }
  ExpectNear(y, ref, Tol(ref, D + F), "dense");
  for (int t = 0; t < n; ++t) EXPECT_EQ(cache.gate_w[t], T(1));
}

TEST(MoeLayer, OneExpertIsDenseSwiGluFloat) { OneExpertIsDense<float>(); }
TEST(MoeLayer, OneExpertIsDenseSwiGluDouble) { OneExpertIsDense<double>(); }

// ---- grouped == naive -----------------------------------------------------------------------

struct Case {
  int E, k;
  MoeRouterKind router;
  bool norm;
  int n_shared;
  bool gate;
  double cf;
  int n_group, topk_group;
};

std::vector<Case> EquivalenceCases() {
  std::vector<Case> cs;
  int i = 0;
  for (int E : {1, 4, 8, 60, 64}) {
    for (int k : {1, 2, 3, 4}) {
      if (k > E) continue;
      Case c{E, k, (i % 2) ? MoeRouterKind::kSigmoidBias : MoeRouterKind::kSoftmaxTopK,
             (i % 3) != 0, i % 4 == 1 ? 2 : (i % 4 == 3 ? 1 : 0), i % 4 == 3, 0.0, 0, 0};
      if (i % 5 == 2) c.cf = 1.0;  // capacity with drops
      if (E % 4 == 0 && E >= 8 && i % 2 == 1) c.n_group = 4, c.topk_group = 2;
      cs.push_back(c);
      ++i;
    }
  }
  return cs;
}

MoeLayerConfig ConfigOf(const Case& c) {
  MoeLayerConfig cfg = BaseConfig(13, 11, c.E, c.k);
  cfg.router = c.router;
  cfg.norm_topk = c.norm;
  cfg.weights_scale = c.router == MoeRouterKind::kSigmoidBias ? 2.5 : 1.0;
  cfg.n_shared = c.n_shared;
  cfg.d_ff_shared = 7;
  cfg.shared_gate = c.gate;
  cfg.capacity_factor = c.cf;
  cfg.n_group = c.n_group;
  cfg.topk_group = c.topk_group;
  cfg.aux_loss_coef = 0.1;  // larger than the default so the loss gradients are visible
  cfg.z_loss_coef = 0.01;
  return cfg;
}

template <typename T>
void GroupedMatchesNaive(bool independent_routing) {
  const int n = 37;
  int case_index = 0;
  for (const Case& cs : EquivalenceCases()) {
    const MoeLayerConfig cfg = ConfigOf(cs);
    SCOPED_TRACE("case " + std::to_string(case_index++) + " E=" + std::to_string(cs.E) +
                 " k=" + std::to_string(cs.k));
    MoeWeights<T> w = RandomWeights<T>(cfg, 100 + cs.E * 7 + cs.k);
    std::mt19937_64 rng(cs.E * 31 + cs.k);
    const size_t nd = static_cast<size_t>(n) * cfg.d_model;
    std::vector<T> x = Randn<T>(nd, rng, 1.0), dy = Randn<T>(nd, rng, 1.0);
    std::vector<T> y(nd), y_ref(nd), dx(nd), dx_ref(nd);
    MoeCache<T> c, c_ref;
    MoeForward(cfg, w, x.data(), n, y.data(), &c);
    MoeForwardOptions ropt;
    if (!independent_routing) ropt.fixed_routing = &c;
    MoeForwardNaive(cfg, w, x.data(), n, y_ref.data(), &c_ref, ropt);
    ASSERT_EQ(c.plan.expert_ids, c_ref.plan.expert_ids);
    ASSERT_EQ(KeptFlags(c.plan), KeptFlags(c_ref.plan));
    if (cs.cf > 0 && cs.E > 1) {
      EXPECT_GT(c.plan.n_dropped, 0);
    }
    const int terms = cfg.d_model + cfg.d_ff + n;
    ExpectNear(y, y_ref, Tol(y_ref, terms), "y");
    ExpectNear(c.gate_w, c_ref.gate_w, Tol(c_ref.gate_w, terms), "gate weights");
    EXPECT_NEAR(c.aux_loss, c_ref.aux_loss, 1e3 * std::numeric_limits<T>::epsilon() * c_ref.aux_loss + 1e-300);
    EXPECT_NEAR(c.z_loss, c_ref.z_loss, 1e3 * std::numeric_limits<T>::epsilon() * c_ref.z_loss + 1e-300);
    MoeGrads<T> g, g_ref;
    g.Resize(cfg);
    g_ref.Resize(cfg);
    MoeBackward(cfg, w, c, dy.data(), dx.data(), &g);
    MoeBackwardNaive(cfg, w, c_ref, dy.data(), dx_ref.data(), &g_ref);
    ExpectNear(dx, dx_ref, Tol(dx_ref, terms), "dx");
    // One expert: the router's softmax is constant, so its gradient may be all zero.
    ExpectGradsNear(g, g_ref, terms, cs.E == 1 ? std::vector<std::string>{"router"} : std::vector<std::string>{});
  }
}

TEST(MoeLayer, GroupedMatchesNaiveFloat) { GroupedMatchesNaive<float>(false); }
TEST(MoeLayer, GroupedMatchesNaiveDouble) { GroupedMatchesNaive<double>(true); }

// Expert choice: the grouped and the naive path agree, and the selection is each expert's top c
// tokens by probability, checked against the definition on the naive cache.
template <typename T>
void ExpertChoiceGroupedMatchesNaive(bool independent_routing) {
  const int n = 29;
  struct EcCase { int E; double ecf; int n_shared; bool gate; double scale; };
  for (const EcCase& ec : {EcCase{4, 2.0, 0, false, 1.0}, EcCase{8, 1.0, 2, true, 1.5},
                           EcCase{6, 0.1, 1, false, 1.0}, EcCase{3, 5.0, 0, false, 0.7}}) {
    MoeLayerConfig cfg = BaseConfig(13, 11, ec.E, ec.E);
    cfg.router = MoeRouterKind::kExpertChoice;
    cfg.ec_capacity_factor = ec.ecf;
    cfg.n_shared = ec.n_shared;
    cfg.d_ff_shared = 7;
    cfg.shared_gate = ec.gate;
    cfg.weights_scale = ec.scale;
    cfg.aux_loss_coef = 0.1;  // must have no effect: expert choice has no aux loss
    cfg.z_loss_coef = 0.01;
    SCOPED_TRACE("E=" + std::to_string(ec.E) + " ecf=" + std::to_string(ec.ecf));
    MoeWeights<T> w = RandomWeights<T>(cfg, 300 + ec.E);
    std::mt19937_64 rng(ec.E * 17);
    const size_t nd = static_cast<size_t>(n) * cfg.d_model;
    std::vector<T> x = Randn<T>(nd, rng, 1.0), dy = Randn<T>(nd, rng, 1.0);
    std::vector<T> y(nd), y_ref(nd), dx(nd), dx_ref(nd);
    MoeCache<T> c, c_ref;
    MoeForward(cfg, w, x.data(), n, y.data(), &c);
    MoeForwardOptions ropt;
    if (!independent_routing) ropt.fixed_routing = &c;
    MoeForwardNaive(cfg, w, x.data(), n, y_ref.data(), &c_ref, ropt);
    ASSERT_EQ(c.plan.expert_ids, c_ref.plan.expert_ids);
    ASSERT_EQ(KeptFlags(c.plan), KeptFlags(c_ref.plan));
    // The definition: c = clamp(floor(n * ecf / E), 1, n) tokens per expert, and no token left
    // out has a larger probability for that expert than one taken.
    const int cap = std::min(n, std::max(1, static_cast<int>(std::floor(n * ec.ecf / ec.E))));
    for (int e = 0; e < ec.E; ++e) {
      int taken = 0;
      double worst_in = 1e300, best_out = -1e300;
      for (int t = 0; t < n; ++t) {
        const double p = c_ref.probs[static_cast<size_t>(t) * ec.E + e];
        const size_t s = static_cast<size_t>(t) * ec.E + e;
        // Slot e of token t is expert e when e took t, else unused (-1).
        EXPECT_EQ(c_ref.plan.expert_ids[s], c_ref.plan.slot_position[s] >= 0 ? e : -1);
        if (c_ref.plan.slot_position[s] >= 0) {
          ++taken;
          worst_in = std::min(worst_in, p);
        } else {
          best_out = std::max(best_out, p);
        }
      }
      EXPECT_EQ(taken, cap) << "expert " << e;
      EXPECT_GE(worst_in, best_out) << "expert " << e;
    }
    EXPECT_EQ(c.aux_loss, 0.0);
    EXPECT_EQ(c_ref.aux_loss, 0.0);
    const int terms = cfg.d_model + cfg.d_ff + n;
    ExpectNear(y, y_ref, Tol(y_ref, terms), "y");
    ExpectNear(c.gate_w, c_ref.gate_w, Tol(c_ref.gate_w, terms), "gate weights");
    EXPECT_NEAR(c.z_loss, c_ref.z_loss, 1e3 * std::numeric_limits<T>::epsilon() * c_ref.z_loss);
    MoeGrads<T> g, g_ref;
    g.Resize(cfg);
    g_ref.Resize(cfg);
    MoeBackward(cfg, w, c, dy.data(), dx.data(), &g);
    MoeBackwardNaive(cfg, w, c_ref, dy.data(), dx_ref.data(), &g_ref);
    ExpectNear(dx, dx_ref, Tol(dx_ref, terms), "dx");
    ExpectGradsNear(g, g_ref, terms);
  }
}

TEST(MoeLayer, ExpertChoiceGroupedMatchesNaiveFloat) { ExpertChoiceGroupedMatchesNaive<float>(false); }
TEST(MoeLayer, ExpertChoiceGroupedMatchesNaiveDouble) { ExpertChoiceGroupedMatchesNaive<double>(true); }

TEST(MoeLayer, ThreadPoolGivesTheSameBits) {
  MoeLayerConfig cfg = ConfigOf({8, 2, MoeRouterKind::kSoftmaxTopK, true, 1, true, 0.0, 0, 0});
  MoeWeights<float> w = RandomWeights<float>(cfg, 3);
  const int n = 70;
  std::mt19937_64 rng(9);
  const size_t nd = static_cast<size_t>(n) * cfg.d_model;
  std::vector<float> x = Randn<float>(nd, rng, 1.0), dy = Randn<float>(nd, rng, 1.0);
  std::vector<float> y1(nd), y2(nd), dx1(nd), dx2(nd);
  MoeCache<float> c1, c2;
  MoeGrads<float> g1, g2;
  g1.Resize(cfg);
  g2.Resize(cfg);
  ThreadPool pool(2, false);
  MoeForwardOptions opt;
  opt.pool = &pool;
  MoeForward(cfg, w, x.data(), n, y1.data(), &c1);
  MoeForward(cfg, w, x.data(), n, y2.data(), &c2, opt);
  MoeBackward(cfg, w, c1, dy.data(), dx1.data(), &g1);
  MoeBackward(cfg, w, c2, dy.data(), dx2.data(), &g2, &pool);
  EXPECT_EQ(y1, y2);
  EXPECT_EQ(dx1, dx2);
  EXPECT_EQ(g1.gate_exps, g2.gate_exps);
  EXPECT_EQ(g1.down_shexp, g2.down_shexp);
}

// ---- dropless == capacity when C >= max load -------------------------------------------------

TEST(MoeLayer, DroplessEqualsCapacityWhenItFits) {
  for (int k : {1, 2, 3}) {
    MoeLayerConfig cfg = BaseConfig(15, 9, 8, k);
    MoeWeights<double> w = RandomWeights<double>(cfg, 21 + k);
    const int n = 41;
    std::mt19937_64 rng(k);
    const size_t nd = static_cast<size_t>(n) * cfg.d_model;
    std::vector<double> x = Randn<double>(nd, rng, 1.0), dy = Randn<double>(nd, rng, 1.0);
    std::vector<double> y0(nd), y1(nd), y2(nd), dx0(nd), dx1(nd);
    MoeCache<double> c0, c1, c2;
    MoeForward(cfg, w, x.data(), n, y0.data(), &c0);
    const int max_load = *std::max_element(c0.plan.tokens_per_expert.begin(), c0.plan.tokens_per_expert.end());
    // cf with ceil(cf * n * k / E) == max_load exactly: nothing may drop.
    MoeLayerConfig cap = cfg;
    cap.capacity_factor = (max_load - 0.5) * cfg.n_expert / (static_cast<double>(n) * k);
    MoeForward(cap, w, x.data(), n, y1.data(), &c1);
    EXPECT_EQ(c1.plan.n_dropped, 0);
    EXPECT_EQ(y0, y1);
    MoeGrads<double> g0, g1;
    g0.Resize(cfg);
    g1.Resize(cfg);
    MoeBackward(cfg, w, c0, dy.data(), dx0.data(), &g0);
    MoeBackward(cap, w, c1, dy.data(), dx1.data(), &g1);
    EXPECT_EQ(dx0, dx1);
    EXPECT_EQ(g0.router, g1.router);
    EXPECT_EQ(g0.down_exps, g1.down_exps);
    // One less and the busiest expert drops exactly its last slots in token order.
    cap.capacity_factor = (max_load - 1.5) * cfg.n_expert / (static_cast<double>(n) * k);
    MoeForward(cap, w, x.data(), n, y2.data(), &c2);
    int64_t want_drops = 0;
    for (int e = 0; e < cfg.n_expert; ++e) want_drops += std::max(0, c0.plan.tokens_per_expert[e] - (max_load - 1));
    EXPECT_EQ(c2.plan.n_dropped, want_drops);
    EXPECT_NE(y0, y2);
    const MoeTelemetry tel = ComputeTelemetry(cap, c2);
    EXPECT_DOUBLE_EQ(tel.drop_rate, static_cast<double>(want_drops) / (n * k));
    EXPECT_DOUBLE_EQ(tel.mean_experts_per_token, (static_cast<double>(n) * k - want_drops) / n);
  }
}

// ---- permute / unpermute --------------------------------------------------------------------

TEST(MoeLayer, PermuteUnpermuteIsBitExact) {
  std::mt19937_64 rng(77);
  for (int E : {1, 4, 60}) {
    for (int k : {1, 3}) {
      if (k > E) continue;
      RoutingPlan plan;
      plan.n_tokens = 29;
      plan.n_expert = plan.n_targets = E;
      plan.k = k;
      for (int t = 0; t < plan.n_tokens; ++t) {
        std::vector<int32_t> all(E);
        std::iota(all.begin(), all.end(), 0);
        std::shuffle(all.begin(), all.end(), rng);
        plan.expert_ids.insert(plan.expert_ids.end(), all.begin(), all.begin() + k);
      }
      plan.BuildGroups();
      const int d = 17;
      std::vector<float> x = Randn<float>(static_cast<size_t>(plan.n_tokens) * d, rng, 1e3);
      x[3] = std::numeric_limits<float>::denorm_min();
      x[5] = -0.0f;
      std::vector<float> sorted(static_cast<size_t>(plan.n_tokens) * k * d), slots(sorted.size());
      PermuteTokens(plan, x.data(), d, sorted.data());
      for (size_t q = 1; q < plan.sorted_slots.size(); ++q) {
        const int a = plan.sorted_slots[q - 1], b = plan.sorted_slots[q];
        ASSERT_TRUE(plan.expert_ids[a] < plan.expert_ids[b] ||
                    (plan.expert_ids[a] == plan.expert_ids[b] && a < b));
      }
      UnpermuteSlots(plan, sorted.data(), d, slots.data());
      for (int s = 0; s < plan.n_tokens * k; ++s) {
        ASSERT_EQ(0, std::memcmp(&slots[static_cast<size_t>(s) * d], &x[static_cast<size_t>(s / k) * d], d * sizeof(float)));
      }
    }
  }
}

// ---- central differences at a fixed assignment ----------------------------------------------

double Objective(const MoeLayerConfig& cfg, const MoeWeights<double>& w, const std::vector<double>& x,
                 const std::vector<double>& dy, int n, const MoeCache<double>& fixed) {
  std::vector<double> y(x.size());
  MoeCache<double> c;
  MoeForwardOptions opt;
  opt.fixed_routing = &fixed;
  MoeForward(cfg, w, x.data(), n, y.data(), &c, opt);
  double l = c.loss();
  for (size_t i = 0; i < y.size(); ++i) l += dy[i] * y[i];
  return l;
}

void CheckGradients(const MoeLayerConfig& cfg, bool training) {
  const int n = 11;
  MoeWeights<double> w = RandomWeights<double>(cfg, 1234);
  std::mt19937_64 rng(99);
  const size_t nd = static_cast<size_t>(n) * cfg.d_model;
  std::vector<double> x = Randn<double>(nd, rng, 1.0), dy = Randn<double>(nd, rng, 1.0);
  std::vector<double> y(nd), dx(nd);
  MoeCache<double> c;
  MoeForwardOptions opt;
  opt.training = training;
  opt.jitter_seed = 5;
  MoeForward(cfg, w, x.data(), n, y.data(), &c, opt);
  if (training && cfg.jitter_eps > 0) {
    ASSERT_FALSE(c.noise.empty());
  }
  MoeGrads<double> g;
  g.Resize(cfg);
  MoeBackward(cfg, w, c, dy.data(), dx.data(), &g);
  const double h = 1e-5;
  auto central = [&](double* p) {
    const double keep = *p;
    *p = keep + h;
    const double lp = Objective(cfg, w, x, dy, n, c);
    *p = keep - h;
    const double lm = Objective(cfg, w, x, dy, n, c);
    *p = keep;
    return (lp - lm) / (2 * h);
  };
  auto check = [&](const char* name, double* p, double analytic) {
    const double fd = central(p);
    EXPECT_NEAR(analytic, fd, 1e-6 * std::max(1.0, std::fabs(fd))) << name;
  };
  // Every input entry of three tokens, and a spread of entries of every weight array.
  for (int t : {0, 5, n - 1}) {
    for (int d = 0; d < cfg.d_model; ++d) check("x", &x[t * cfg.d_model + d], dx[t * cfg.d_model + d]);
  }
  auto wa = WeightArrays(w);
  auto ga = GradArrays(g);
  for (size_t a = 0; a < wa.size(); ++a) {
    std::vector<double>& v = *wa[a].second;
    if (v.empty()) continue;
    const size_t stride = std::max<size_t>(1, v.size() / 23);
    for (size_t i = a % stride; i < v.size(); i += stride) check(wa[a].first, &v[i], (*ga[a].second)[i]);
  }
}

TEST(MoeLayerGradCheck, SoftmaxTopKNormalised) {
  MoeLayerConfig cfg = BaseConfig(7, 5, 6, 2);
  cfg.norm_topk = true;
  cfg.aux_loss_coef = 0.3;
  cfg.z_loss_coef = 0.05;
  CheckGradients(cfg, false);
}

TEST(MoeLayerGradCheck, SoftmaxTopKUnnormalisedScaledWithJitter) {
  MoeLayerConfig cfg = BaseConfig(7, 5, 5, 3);
  cfg.weights_scale = 1.7;
  cfg.jitter_eps = 0.1;
  cfg.aux_loss_coef = 0.3;
  cfg.z_loss_coef = 0.05;
  CheckGradients(cfg, true);
}

TEST(MoeLayerGradCheck, SigmoidBiasGroupLimitedWithSharedGate) {
  MoeLayerConfig cfg = BaseConfig(6, 5, 8, 3);
  cfg.router = MoeRouterKind::kSigmoidBias;
  cfg.norm_topk = true;
  cfg.weights_scale = 2.5;
  cfg.n_group = 4;
  cfg.topk_group = 2;
  cfg.n_shared = 2;
  cfg.d_ff_shared = 4;
  cfg.shared_gate = true;
  cfg.aux_loss_coef = 0.3;
  cfg.z_loss_coef = 0.05;
  CheckGradients(cfg, false);
}

TEST(MoeLayerGradCheck, SigmoidUnnormalisedUngatedSharedWithCapacityDrops) {
  MoeLayerConfig cfg = BaseConfig(6, 5, 4, 2);
  cfg.router = MoeRouterKind::kSigmoidBias;
  cfg.n_shared = 1;
  cfg.d_ff_shared = 3;
  cfg.capacity_factor = 0.75;
  cfg.aux_loss_coef = 0.3;
  cfg.z_loss_coef = 0.05;
  CheckGradients(cfg, false);
}

TEST(MoeLayerGradCheck, SoftmaxNormalisedCapacityDropsK1) {
  MoeLayerConfig cfg = BaseConfig(5, 4, 4, 1);
  cfg.norm_topk = true;  // k = 1 normalised: the gate weight is 1, the router learns from losses only
  cfg.capacity_factor = 1.0;
  cfg.aux_loss_coef = 0.3;
  cfg.z_loss_coef = 0.05;
  CheckGradients(cfg, false);
}

// ---- sigmoid bias ---------------------------------------------------------------------------

TEST(MoeLayer, SigmoidBiasChangesSelectionNotWeights) {
  MoeLayerConfig cfg = BaseConfig(9, 6, 6, 2);
  cfg.router = MoeRouterKind::kSigmoidBias;
  cfg.norm_topk = true;
  cfg.weights_scale = 2.5;
  MoeWeights<double> w = RandomWeights<double>(cfg, 8);
  std::fill(w.exp_probs_b.begin(), w.exp_probs_b.end(), 0.0);
  const int n = 20;
  std::mt19937_64 rng(4);
  std::vector<double> x = Randn<double>(static_cast<size_t>(n) * cfg.d_model, rng, 1.0), y(x.size());
  MoeCache<double> c0, c1;
  MoeForward(cfg, w, x.data(), n, y.data(), &c0);
  const int favoured = 4;
  w.exp_probs_b[favoured] = 10.0;  // larger than any sigmoid gap
  MoeForward(cfg, w, x.data(), n, y.data(), &c1);
  EXPECT_EQ(c0.probs, c1.probs);  // the bias never reaches the scores
  int changed = 0;
  for (int t = 0; t < n; ++t) {
    const int32_t* ids = &c1.plan.expert_ids[t * 2];
    EXPECT_EQ(ids[0], favoured);
    changed += c0.plan.expert_ids[t * 2] != favoured || c0.plan.expert_ids[t * 2 + 1] != ids[1];
    // Weights from the unbiased sigmoid of the logits, computed here.
    double s[2];
    for (int j = 0; j < 2; ++j) {
      double l = 0;
      for (int d = 0; d < cfg.d_model; ++d) l += w.router[ids[j] * cfg.d_model + d] * x[t * cfg.d_model + d];
      s[j] = 1.0 / (1.0 + std::exp(-l));
    }
    for (int j = 0; j < 2; ++j) EXPECT_NEAR(c1.gate_w[t * 2 + j], 2.5 * s[j] / (s[0] + s[1]), 1e-14);
  }
  EXPECT_GT(changed, n / 2);
}

TEST(MoeLayer, UpdateBiasMovesLoadsTowardBalance) {
  MoeLayerConfig cfg = BaseConfig(8, 4, 8, 2);
  cfg.router = MoeRouterKind::kSigmoidBias;
  cfg.norm_topk = true;
  cfg.bias_update_rate = 1e-2;
  MoeWeights<float> w = RandomWeights<float>(cfg, 17);
  std::fill(w.exp_probs_b.begin(), w.exp_probs_b.end(), 0.0f);
  const int n = 256;
  std::mt19937_64 rng(6);
  std::vector<float> x = Randn<float>(static_cast<size_t>(n) * cfg.d_model, rng, 1.0), y(x.size());
  // Skew the router: expert 0 and 1 see a constant positive offset through x's first feature.
  for (int t = 0; t < n; ++t) x[t * cfg.d_model] = 3.0f;
  for (int e = 0; e < 2; ++e) w.router[e * cfg.d_model] = 1.0f;
  MoeCache<float> c;
  MoeForward(cfg, w, x.data(), n, y.data(), &c);
  const MoeTelemetry first = ComputeTelemetry(cfg, c);
  ASSERT_GT(first.max_vio, 1.0);
  UpdateBias(cfg, first, &w);
  const double mean = 2.0 * n / cfg.n_expert;
  for (int e = 0; e < cfg.n_expert; ++e) {
    const double want = first.routed_per_expert[e] > mean ? -1e-2 : (first.routed_per_expert[e] < mean ? 1e-2 : 0.0);
    EXPECT_FLOAT_EQ(w.exp_probs_b[e], static_cast<float>(want)) << e;
  }
  MoeTelemetry last = first;
  for (int step = 0; step < 400; ++step) {
    MoeForward(cfg, w, x.data(), n, y.data(), &c);
    last = ComputeTelemetry(cfg, c);
    UpdateBias(cfg, last, &w);
  }
  EXPECT_LT(last.max_vio, 0.25 * first.max_vio) << first.max_vio << " -> " << last.max_vio;
}

// ---- group-limited top-k against brute force -------------------------------------------------

TEST(MoeLayer, GroupLimitedTopKMatchesBruteForce) {
  for (MoeRouterKind kind : {MoeRouterKind::kSigmoidBias, MoeRouterKind::kSoftmaxTopK}) {
    MoeLayerConfig cfg = BaseConfig(10, 4, 16, 3);
    cfg.router = kind;
    cfg.n_group = 4;
    cfg.topk_group = 2;
    MoeWeights<double> w = RandomWeights<double>(cfg, 31);
    if (!w.exp_probs_b.empty()) {
      std::mt19937_64 r(2);
      w.exp_probs_b = Randn<double>(16, r, 0.2);
    }
    const int n = 64;
    std::mt19937_64 rng(12);
    std::vector<double> x = Randn<double>(static_cast<size_t>(n) * cfg.d_model, rng, 1.0), y(x.size());
    MoeCache<double> c;
    MoeForward(cfg, w, x.data(), n, y.data(), &c);
    int differs_from_plain = 0;
    for (int t = 0; t < n; ++t) {
      std::vector<double> score(16);
      for (int e = 0; e < 16; ++e) {
        double l = 0;
        for (int d = 0; d < cfg.d_model; ++d) l += w.router[e * cfg.d_model + d] * x[t * cfg.d_model + d];
        score[e] = l;
      }
      if (kind == MoeRouterKind::kSoftmaxTopK) {
        double mx = *std::max_element(score.begin(), score.end()), s = 0;
        for (double& v : score) s += v = std::exp(v - mx);
        for (double& v : score) v /= s;
      } else {
        for (int e = 0; e < 16; ++e) score[e] = 1.0 / (1.0 + std::exp(-score[e])) + w.exp_probs_b[e];
      }
      // Every pair of groups; group score = sum of the group's best two; keep the best pair, then
      // try every triple of experts inside it.
      double best_pair = -1e300;
      int best_mask = 0;
      for (int mask = 0; mask < 16; ++mask) {
        if (__builtin_popcount(mask) != 2) continue;
        double total = 0;
        for (int g = 0; g < 4; ++g) {
          if (!(mask >> g & 1)) continue;
          std::vector<double> v(score.begin() + 4 * g, score.begin() + 4 * g + 4);
          std::sort(v.rbegin(), v.rend());
          total += v[0] + v[1];
        }
        if (total > best_pair) best_pair = total, best_mask = mask;
      }
      double best = -1e300;
      std::vector<int> best_set;
      for (int a = 0; a < 16; ++a)
        for (int b = a + 1; b < 16; ++b)
          for (int d = b + 1; d < 16; ++d) {
            if (!(best_mask >> (a / 4) & 1) || !(best_mask >> (b / 4) & 1) || !(best_mask >> (d / 4) & 1)) continue;
            const double s = score[a] + score[b] + score[d];
            if (s > best) best = s, best_set = {a, b, d};
          }
      std::vector<int> got(c.plan.expert_ids.begin() + t * 3, c.plan.expert_ids.begin() + t * 3 + 3);
      for (int j = 1; j < 3; ++j) EXPECT_GE(score[got[j - 1]], score[got[j]]);  // best first
      std::sort(got.begin(), got.end());
      EXPECT_EQ(got, best_set) << "token " << t;
      std::vector<int> plain(16);
      std::iota(plain.begin(), plain.end(), 0);
      std::sort(plain.begin(), plain.end(), [&](int p, int q) { return score[p] > score[q]; });
      plain.resize(3);
      std::sort(plain.begin(), plain.end());
      differs_from_plain += plain != best_set;
    }
    EXPECT_GT(differs_from_plain, 0) << "the group limit never mattered: the test is too weak";
  }
}

// ---- batch invariance -----------------------------------------------------------------------

template <typename T>
void DroplessBatchInvariance() {
  MoeLayerConfig cfg = BaseConfig(13, 10, 8, 2);
  cfg.norm_topk = true;
  cfg.n_shared = 1;
  cfg.d_ff_shared = 6;
  cfg.shared_gate = true;
  MoeWeights<T> w = RandomWeights<T>(cfg, 40);
  const int D = cfg.d_model, len = 7;
  std::mt19937_64 rng(41);
  const std::vector<T> victim = Randn<T>(static_cast<size_t>(len) * D, rng, 1.0);
  std::vector<T> y_alone(victim.size());
  MoeCache<T> c;
  MoeForward(cfg, w, victim.data(), len, y_alone.data(), &c);
  ThreadPool pool(2, false);
  for (int before : {0, 1, 30, 45}) {
    for (int after : {0, 3, 60}) {
      std::vector<T> batch = Randn<T>(static_cast<size_t>(before) * D, rng, 1.0);
      batch.insert(batch.end(), victim.begin(), victim.end());
      const std::vector<T> tail = Randn<T>(static_cast<size_t>(after) * D, rng, 1.0);
      batch.insert(batch.end(), tail.begin(), tail.end());
      const int n = before + len + after;
      std::vector<T> y(batch.size());
      MoeForwardOptions opt;
      opt.pool = (before % 2) ? &pool : nullptr;
      MoeForward(cfg, w, batch.data(), n, y.data(), &c, opt);
      EXPECT_EQ(0, std::memcmp(&y[static_cast<size_t>(before) * D], y_alone.data(), y_alone.size() * sizeof(T)))
          << "before=" << before << " after=" << after;
    }
  }
}

TEST(MoeLayer, DroplessOutputIgnoresBatchMatesFloat) { DroplessBatchInvariance<float>(); }
TEST(MoeLayer, DroplessOutputIgnoresBatchMatesDouble) { DroplessBatchInvariance<double>(); }

TEST(MoeLayer, CapacityLetsACraftedBatchMateChangeAVictim) {
  MoeLayerConfig cfg = BaseConfig(8, 6, 4, 1);
  cfg.capacity_factor = 1.0;
  MoeWeights<float> w = RandomWeights<float>(cfg, 50);
  const int D = cfg.d_model;
  std::mt19937_64 rng(51);
  const std::vector<float> victim = Randn<float>(D, rng, 1.0);
  std::vector<float> y_alone(D);
  MoeCache<float> c;
  MoeForward(cfg, w, victim.data(), 1, y_alone.data(), &c);
  ASSERT_EQ(c.plan.n_dropped, 0);
  ASSERT_GT(MaxAbs(y_alone), 0.0);
  // The attacker sends 3 copies of the victim's token ahead of it: with 4 tokens C = 1, the copies
  // fill the victim's expert and the victim's slot is dropped.
  std::vector<float> batch;
  for (int i = 0; i < 4; ++i) batch.insert(batch.end(), victim.begin(), victim.end());
  std::vector<float> y(batch.size());
  MoeForward(cfg, w, batch.data(), 4, y.data(), &c);
  EXPECT_EQ(c.plan.n_dropped, 3);
  EXPECT_LT(c.plan.slot_position[3], 0);
  EXPECT_NE(0, std::memcmp(&y[3 * D], y_alone.data(), D * sizeof(float)));
  EXPECT_EQ(MaxAbs(std::vector<float>(y.begin() + 3 * D, y.end())), 0.0);
  // Per-sequence capacity confines the damage: the attacker's sequence no longer touches the victim's.
  MoeForwardOptions opt;
  opt.seq_len = 1;
  MoeForward(cfg, w, batch.data(), 4, y.data(), &c, opt);
  EXPECT_EQ(c.plan.n_dropped, 0);
  EXPECT_EQ(0, std::memcmp(&y[3 * D], y_alone.data(), D * sizeof(float)));
}

// ---- losses and telemetry -------------------------------------------------------------------

TEST(MoeLayer, LossesAndTelemetryOnAUniformRouter) {
  MoeLayerConfig cfg = BaseConfig(6, 4, 8, 1);
  MoeWeights<double> w = RandomWeights<double>(cfg, 60);
  std::fill(w.router.begin(), w.router.end(), 0.0);  // every probability 1/E, ties -> expert 0
  const int n = 10;
  std::mt19937_64 rng(61);
  std::vector<double> x = Randn<double>(static_cast<size_t>(n) * cfg.d_model, rng, 1.0), y(x.size());
  MoeCache<double> c;
  MoeForward(cfg, w, x.data(), n, y.data(), &c);
  EXPECT_NEAR(c.aux_loss, cfg.aux_loss_coef, 1e-15);  // alpha * E * sum f_i / E
  EXPECT_NEAR(c.z_loss, cfg.z_loss_coef * std::log(8.0) * std::log(8.0), 1e-15);
  const MoeTelemetry tel = ComputeTelemetry(cfg, c);
  EXPECT_EQ(tel.routed_per_expert[0], n);
  EXPECT_DOUBLE_EQ(tel.share[0], 1.0);
  EXPECT_DOUBLE_EQ(tel.max_vio, 7.0);  // (n - n/8) / (n/8)
  EXPECT_NEAR(tel.router_entropy, std::log(8.0), 1e-12);
  EXPECT_DOUBLE_EQ(tel.mean_experts_per_token, 1.0);
  EXPECT_DOUBLE_EQ(tel.drop_rate, 0.0);
}

TEST(MoeLayer, TelemetryMatchesCounts) {
  MoeLayerConfig cfg = BaseConfig(9, 5, 6, 2);
  cfg.capacity_factor = 1.1;
  MoeWeights<float> w = RandomWeights<float>(cfg, 70);
  const int n = 50;
  std::mt19937_64 rng(71);
  std::vector<float> x = Randn<float>(static_cast<size_t>(n) * cfg.d_model, rng, 1.0), y(x.size());
  MoeCache<float> c;
  MoeForward(cfg, w, x.data(), n, y.data(), &c);
  const MoeTelemetry tel = ComputeTelemetry(cfg, c);
  std::vector<int64_t> routed(6, 0), kept(6, 0);
  for (size_t s = 0; s < c.plan.expert_ids.size(); ++s) {
    ++routed[c.plan.expert_ids[s]];
    if (c.plan.slot_position[s] >= 0) ++kept[c.plan.expert_ids[s]];
  }
  const int64_t cap = static_cast<int64_t>(std::ceil(1.1 * n * 2 / 6));
  double entropy = 0;
  for (int t = 0; t < n; ++t) {
    for (int e = 0; e < 6; ++e) {
      const double p = c.probs[t * 6 + e];
      entropy -= p * std::log(p) / n;
    }
  }
  int64_t dropped = 0, max_load = 0;
  for (int e = 0; e < 6; ++e) {
    EXPECT_EQ(kept[e], std::min(routed[e], cap));
    dropped += routed[e] - kept[e];
    max_load = std::max(max_load, routed[e]);
  }
  EXPECT_EQ(tel.routed_per_expert, routed);
  EXPECT_EQ(tel.kept_per_expert, kept);
  EXPECT_GT(dropped, 0);
  EXPECT_DOUBLE_EQ(tel.drop_rate, dropped / 100.0);
  EXPECT_NEAR(tel.max_vio, (max_load - 100.0 / 6) / (100.0 / 6), 1e-12);
  EXPECT_NEAR(tel.router_entropy, entropy, 1e-5);
  EXPECT_NEAR(std::accumulate(tel.share.begin(), tel.share.end(), 0.0), 1.0, 1e-12);
}

TEST(MoeLayerGradCheck, ExpertChoiceScaledWithJitterAndSharedGate) {
  MoeLayerConfig cfg = BaseConfig(6, 5, 4, 4);
  cfg.router = MoeRouterKind::kExpertChoice;
  cfg.ec_capacity_factor = 1.5;  // c = floor(11 * 1.5 / 4) = 4: some tokens get 0 experts, some 2+
  cfg.weights_scale = 1.7;
  cfg.jitter_eps = 0.1;
  cfg.n_shared = 1;
  cfg.d_ff_shared = 3;
  cfg.shared_gate = true;
  cfg.aux_loss_coef = 0.3;
  cfg.z_loss_coef = 0.05;
  CheckGradients(cfg, true);
}

TEST(MoeLayer, ExpertChoiceBadConfigsFailWithAMessage) {
  MoeLayerConfig cfg = BaseConfig(4, 4, 4, 4);
  cfg.router = MoeRouterKind::kExpertChoice;
  EXPECT_NO_THROW(ValidateMoeConfig(cfg));
  cfg.k = 2;  // slots are one per expert
  EXPECT_THROW(ValidateMoeConfig(cfg), Error);
  cfg.k = 4;
  cfg.capacity_factor = 1.0;
  EXPECT_THROW(ValidateMoeConfig(cfg), Error);
  cfg.capacity_factor = 0.0;
  cfg.norm_topk = true;
  EXPECT_THROW(ValidateMoeConfig(cfg), Error);
  cfg.norm_topk = false;
  cfg.ec_capacity_factor = 0.0;
  EXPECT_THROW(ValidateMoeConfig(cfg), Error);
  cfg.ec_capacity_factor = 2.0;
  cfg.n_group = 2;
  cfg.topk_group = 1;
  EXPECT_THROW(ValidateMoeConfig(cfg), Error);
  cfg.n_group = 0;
  MoeWeights<double> w;
  w.Resize(cfg);
  std::vector<double> x(8), y(8);
  MoeCache<double> c;
  MoeForwardOptions opt;
  opt.seq_len = 1;  // expert choice needs the whole batch
  EXPECT_THROW(MoeForward(cfg, w, x.data(), 2, y.data(), &c, opt), Error);
  EXPECT_THROW(MoeForwardNaive(cfg, w, x.data(), 2, y.data(), &c, opt), Error);
}

TEST(MoeLayer, BadConfigsFailWithAMessage) {
  MoeLayerConfig cfg = BaseConfig(4, 4, 4, 5);
  EXPECT_THROW(ValidateMoeConfig(cfg), Error);
  cfg.k = 2;
  cfg.n_group = 3;
  cfg.topk_group = 1;
  EXPECT_THROW(ValidateMoeConfig(cfg), Error);
  cfg.n_group = 0;
  cfg.shared_gate = true;
  EXPECT_THROW(ValidateMoeConfig(cfg), Error);
  cfg.shared_gate = false;
  EXPECT_NO_THROW(ValidateMoeConfig(cfg));
  MoeWeights<float> w;
  w.Resize(cfg);
  w.up_exps.pop_back();
  std::vector<float> x(4), y(4);
  MoeCache<float> c;
  EXPECT_THROW(MoeForward(cfg, w, x.data(), 1, y.data(), &c), Error);
}

}  // namespace
}  // namespace moe
