// The MoE layer's newer routers and target kinds: hash, top_p (+ entropy loss), null experts
// (AdaMoE), zero-computation experts and gating residuals (MoE++), fine-grained experts, the
// global-batch loss scope and telemetry. Each is checked three ways: grouped == naive (outputs and
// every gradient), central differences in double at a fixed assignment, and the definition from
// the paper written out here in double.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "moe/moe_layer.h"
#include "moe/routing.h"
#include "moe_layer_test_util.h"
#include "util/error.h"

namespace moe {
namespace {

// Everything one call consumes besides the weights.
template <typename T>
struct Inputs {
  int n = 0;
  std::vector<T> x, dy;            // [n][D]
  std::vector<int32_t> token_ids;  // [n]
  std::vector<T> prev, dlogits;    // [n][R] (gating residual only)

  MoeForwardOptions Options(const MoeLayerConfig& cfg) const {
    MoeForwardOptions o;
    o.token_ids = token_ids.data();
    if (cfg.gating_residual) o.prev_logits = prev.data();
    return o;
  }
  const T* DLogits(const MoeLayerConfig& cfg) const {
    return cfg.gating_residual ? dlogits.data() : nullptr;
  }
};

template <typename T>
Inputs<T> MakeInputs(const MoeLayerConfig& cfg, int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  Inputs<T> in;
  in.n = n;
  const size_t nd = static_cast<size_t>(n) * cfg.d_model, nr = static_cast<size_t>(n) * cfg.router_width();
  in.x = Randn<T>(nd, rng, 1.0);
  in.dy = Randn<T>(nd, rng, 1.0);
  std::uniform_int_distribution<int32_t> tok(0, 40);
  for (int t = 0; t < n; ++t) in.token_ids.push_back(tok(rng));
  if (cfg.gating_residual) {
    in.prev = Randn<T>(nr, rng, 1.0);
    in.dlogits = Randn<T>(nr, rng, 0.5);
  }
  return in;
}

MoeLayerConfig Cfg(MoeRouterKind router, int E, int k) {
  MoeLayerConfig c = BaseConfig(13, 11, E, k);
  c.router = router;
  c.aux_loss_coef = 0.1;  // larger than the defaults so every loss gradient is visible
  c.z_loss_coef = 0.01;
  c.entropy_loss_coef = 0.02;
  c.d_ff_shared = 7;
  return c;
}

struct NamedConfig {
  std::string name;
  MoeLayerConfig cfg;
};

std::vector<NamedConfig> NewRouterConfigs() {
  std::vector<NamedConfig> v;
  {
    MoeLayerConfig c = Cfg(MoeRouterKind::kTopP, 8, 4);
    c.top_p = 0.5;
    c.entropy_loss_coef = -1;  // the router default (1e-4)
    v.push_back({"top_p", c});
  }
  {
    MoeLayerConfig c = Cfg(MoeRouterKind::kTopP, 6, 6);
    c.top_p = 0.7;
    c.norm_topk = true;
    c.capacity_factor = 0.5;
    c.n_shared = 1;
    v.push_back({"top_p_norm_capacity_shared", c});
  }
  {
    MoeLayerConfig c = Cfg(MoeRouterKind::kTopP, 5, 4);
    c.top_p = 0.6;
    c.n_null = 3;
    c.n_zero = 1;
    c.n_copy = 1;
    c.n_const = 2;
    c.zc_balance_tau = 0.5;
    c.gating_residual = true;
    v.push_back({"top_p_null_zc_residual", c});
  }
  {
    MoeLayerConfig c = Cfg(MoeRouterKind::kHash, 8, 1);
    c.n_shared = 1;
    c.shared_gate = true;
    v.push_back({"hash_k1_shared", c});
  }
  {
    MoeLayerConfig c = Cfg(MoeRouterKind::kHash, 5, 2);
    c.weights_scale = 2.0;
    c.capacity_factor = 1.0;
    c.hash_seed = 77;
    v.push_back({"hash_k2_capacity", c});
  }
  {
    MoeLayerConfig c = Cfg(MoeRouterKind::kSoftmaxTopK, 8, 4);
    c.n_null = 4;
    c.norm_topk = true;
    v.push_back({"adamoe_null_norm", c});
  }
  {
    MoeLayerConfig c = Cfg(MoeRouterKind::kSoftmaxTopK, 6, 2);
    c.n_zero = 1;
    c.n_copy = 1;
    c.n_const = 2;
    c.zc_balance_tau = 0.3;
    c.gating_residual = true;
    c.weights_scale = 1.5;
    v.push_back({"moepp_residual", c});
  }
  {
    MoeLayerConfig c = Cfg(MoeRouterKind::kSoftmaxTopK, 4, 3);
    c.n_null = 2;
    c.n_const = 1;
    c.norm_topk = true;
    c.capacity_factor = 0.5;  // null and constant picks leave the FFN experts room: drop anyway
    c.jitter_eps = 0.1;
    v.push_back({"null_const_capacity_jitter", c});
  }
  return v;
}

// ---- grouped == naive -------------------------------------------------------------------------

template <typename T>
void GroupedMatchesNaive(bool independent_routing) {
  const int n = 41;
  for (const NamedConfig& nc : NewRouterConfigs()) {
    SCOPED_TRACE(nc.name);
    const MoeLayerConfig& cfg = nc.cfg;
    const MoeWeights<T> w = RandomWeights<T>(cfg, 7 + cfg.router_width());
    const Inputs<T> in = MakeInputs<T>(cfg, n, 3 + cfg.k);
    const size_t nd = in.x.size();
    std::vector<T> y(nd), y_ref(nd), dx(nd), dx_ref(nd);
    MoeCache<T> c, c_ref;
    MoeForwardOptions opt = in.Options(cfg);
    opt.training = true;
    opt.jitter_seed = 9;
    MoeForward(cfg, w, in.x.data(), n, y.data(), &c, opt);
    MoeForwardOptions ropt = opt;
    if (!independent_routing) ropt.fixed_routing = &c;
    MoeForwardNaive(cfg, w, in.x.data(), n, y_ref.data(), &c_ref, ropt);
    ASSERT_EQ(c.plan.expert_ids, c_ref.plan.expert_ids);
    ASSERT_EQ(KeptFlags(c.plan), KeptFlags(c_ref.plan));
    ASSERT_EQ(c.plan.n_dropped, c_ref.plan.n_dropped);
    if (cfg.capacity_factor > 0) {
      EXPECT_GT(c.plan.n_dropped, 0);
    }
    const int terms = cfg.d_model + cfg.d_ff + n;
    ExpectNear(y, y_ref, Tol(y_ref, terms), "y");
    ExpectNear(c.gate_w, c_ref.gate_w, Tol(c_ref.gate_w, terms), "gate weights");
    const double eps = std::numeric_limits<T>::epsilon();
    EXPECT_NEAR(c.aux_loss, c_ref.aux_loss, 1e3 * eps * c_ref.aux_loss + 1e-300);
    EXPECT_NEAR(c.z_loss, c_ref.z_loss, 1e3 * eps * c_ref.z_loss + 1e-300);
    EXPECT_NEAR(c.entropy_loss, c_ref.entropy_loss, 1e3 * eps * c_ref.entropy_loss + 1e-300);
    if (cfg.router == MoeRouterKind::kHash) {
      EXPECT_EQ(c.loss(), 0.0);
    } else {
      EXPECT_GT(c.aux_loss, 0.0);
      EXPECT_GT(c.entropy_loss, 0.0);
    }
    MoeGrads<T> g, g_ref;
    g.Resize(cfg);
    g_ref.Resize(cfg);
    MoeBackward(cfg, w, c, in.dy.data(), dx.data(), &g, nullptr, in.DLogits(cfg));
    MoeBackwardNaive(cfg, w, c_ref, in.dy.data(), dx_ref.data(), &g_ref, in.DLogits(cfg));
    ExpectNear(dx, dx_ref, Tol(dx_ref, terms), "dx");
    ExpectGradsNear(g, g_ref, terms);
    if (cfg.gating_residual) {
      ExpectNear(g.prev_logits, g_ref.prev_logits, Tol(g_ref.prev_logits, terms), "prev_logits");
      EXPECT_GT(MaxAbs(g_ref.prev_logits), 0.0);
    }
  }
}

TEST(MoeRouters, GroupedMatchesNaiveFloat) { GroupedMatchesNaive<float>(false); }
TEST(MoeRouters, GroupedMatchesNaiveDouble) { GroupedMatchesNaive<double>(true); }

// ---- central differences at a fixed assignment --------------------------------------------------

// L = <dy, y> + <dlogits, logits> + losses, at the routing of `fixed`.
double Objective(const MoeLayerConfig& cfg, const MoeWeights<double>& w, const Inputs<double>& in,
                 const MoeCache<double>& fixed, const MoeBalanceScope* scope) {
  std::vector<double> y(in.x.size());
  MoeCache<double> c;
  MoeForwardOptions opt = in.Options(cfg);
  opt.fixed_routing = &fixed;
  opt.balance = scope;
  MoeForward(cfg, w, in.x.data(), in.n, y.data(), &c, opt);
  double l = c.loss();
  for (size_t i = 0; i < y.size(); ++i) l += in.dy[i] * y[i];
  if (cfg.gating_residual) {
    for (size_t i = 0; i < c.logits.size(); ++i) l += in.dlogits[i] * c.logits[i];
  }
  return l;
}

void CheckGradients(const MoeLayerConfig& cfg, const MoeBalanceScope* scope = nullptr) {
  const int n = 12;
  MoeWeights<double> w = RandomWeights<double>(cfg, 4321);
  Inputs<double> in = MakeInputs<double>(cfg, n, 17);
  std::vector<double> y(in.x.size()), dx(in.x.size());
  MoeCache<double> c;
  MoeForwardOptions opt = in.Options(cfg);
  opt.training = true;
  opt.jitter_seed = 3;
  opt.balance = scope;
  MoeForward(cfg, w, in.x.data(), n, y.data(), &c, opt);
  MoeGrads<double> g;
  g.Resize(cfg);
  MoeBackward(cfg, w, c, in.dy.data(), dx.data(), &g, nullptr, in.DLogits(cfg));
  const double h = 1e-5;
  auto check = [&](const std::string& name, double* p, double analytic) {
    const double keep = *p;
    *p = keep + h;
    const double lp = Objective(cfg, w, in, c, scope);
    *p = keep - h;
    const double lm = Objective(cfg, w, in, c, scope);
    *p = keep;
    const double fd = (lp - lm) / (2 * h);
    EXPECT_NEAR(analytic, fd, 1e-6 * std::max(1.0, std::fabs(fd))) << name;
  };
  const int D = cfg.d_model, R = cfg.router_width();
  for (int t : {0, 5, n - 1}) {
    for (int d = 0; d < D; ++d) check("x", &in.x[t * D + d], dx[t * D + d]);
    if (cfg.gating_residual) {
      for (int e = 0; e < R; ++e) check("prev_logits", &in.prev[t * R + e], g.prev_logits[t * R + e]);
    }
  }
  auto wa = WeightArrays(w);
  auto ga = GradArrays(g);
  for (size_t a = 0; a < wa.size(); ++a) {
    std::vector<double>& v = *wa[a].second;
    const size_t stride = std::max<size_t>(1, v.size() / 29);
    for (size_t i = a % stride; i < v.size(); i += stride) check(wa[a].first, &v[i], (*ga[a].second)[i]);
  }
}

TEST(MoeRoutersGradCheck, EveryNewConfig) {
  for (const NamedConfig& nc : NewRouterConfigs()) {
    SCOPED_TRACE(nc.name);
    CheckGradients(nc.cfg);
  }
}

TEST(MoeRoutersGradCheck, GlobalLossScope) {
  MoeLayerConfig cfg = Cfg(MoeRouterKind::kSoftmaxTopK, 6, 2);
  cfg.n_copy = 1;
  MoeBalanceScope scope;
  scope.counts = {30, 10, 5, 20, 25, 3, 7};
  scope.n_slots = 100;
  scope.n_tokens = 50;
  CheckGradients(cfg, &scope);
}

// ---- the definitions, written out here -------------------------------------------------------

// Router probabilities of one token in double: softmax(W_r x + W_g prev).
std::vector<double> RefProbs(const MoeLayerConfig& cfg, const MoeWeights<double>& w, const double* xt,
                             const double* prev) {
  const int D = cfg.d_model, R = cfg.router_width();
  std::vector<double> lg(R, 0.0);
  for (int e = 0; e < R; ++e) {
    for (int d = 0; d < D; ++d) lg[e] += w.router[e * D + d] * xt[d];
    if (prev != nullptr) {
      for (int j = 0; j < R; ++j) lg[e] += w.gate_res[e * R + j] * prev[j];
    }
  }
  const double mx = *std::max_element(lg.begin(), lg.end());
  double s = 0;
  for (double& v : lg) s += v = std::exp(v - mx);
  for (double& v : lg) v /= s;
  return lg;
}

std::vector<double> RefSwiGlu(const MoeLayerConfig& cfg, const MoeWeights<double>& w, int e, const double* xt) {
  const int D = cfg.d_model, F = cfg.d_ff;
  std::vector<double> out(D, 0.0);
  for (int f = 0; f < F; ++f) {
    double g = 0, u = 0;
    for (int d = 0; d < D; ++d) {
      g += w.gate_exps[(static_cast<size_t>(e) * F + f) * D + d] * xt[d];
      u += w.up_exps[(static_cast<size_t>(e) * F + f) * D + d] * xt[d];
    }
    const double a = g / (1 + std::exp(-g)) * u;
    for (int d = 0; d < D; ++d) out[d] += w.down_exps[(static_cast<size_t>(e) * D + d) * F + f] * a;
  }
  return out;
}

// AdaMoE + MoE++ (top-k over FFN, null, zero, copy and constant targets, renormalised over the
// non-null picks, gating residual): the output from the papers' formulas.
TEST(MoeRouters, NullAndZeroComputationExpertsMatchTheirDefinition) {
  MoeLayerConfig cfg = Cfg(MoeRouterKind::kSoftmaxTopK, 4, 3);
  cfg.n_null = 2;
  cfg.n_zero = 1;
  cfg.n_copy = 1;
  cfg.n_const = 2;
  cfg.norm_topk = true;
  cfg.weights_scale = 1.25;
  cfg.gating_residual = true;
  const int n = 40, D = cfg.d_model, R = cfg.router_width(), E = cfg.n_expert;
  const MoeWeights<double> w = RandomWeights<double>(cfg, 5);
  const Inputs<double> in = MakeInputs<double>(cfg, n, 6);
  std::vector<double> y(in.x.size());
  MoeCache<double> c;
  MoeForward(cfg, w, in.x.data(), n, y.data(), &c, in.Options(cfg));
  int n_null_picks = 0, n_zc_picks = 0;
  for (int t = 0; t < n; ++t) {
    const double* xt = &in.x[t * D];
    const std::vector<double> p = RefProbs(cfg, w, xt, &in.prev[t * R]);
    std::vector<int> order(R);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    double sum = 0;  // over the non-null picks
    for (int j = 0; j < cfg.k; ++j) {
      if (order[j] < E || order[j] >= E + cfg.n_null) sum += p[order[j]];
    }
    std::vector<double> ref(D, 0.0);
    for (int j = 0; j < cfg.k; ++j) {
      const int id = order[j];
      ASSERT_EQ(c.plan.expert_ids[t * cfg.k + j], id);
      const bool null = id >= E && id < E + cfg.n_null;
      const double g = (null ? p[id] : p[id] / sum) * cfg.weights_scale;
      EXPECT_NEAR(c.gate_w[t * cfg.k + j], g, 1e-12);
      std::vector<double> out(D, 0.0);
      if (id < E) {
        out = RefSwiGlu(cfg, w, id, xt);
      } else if (null) {
        ++n_null_picks;
      } else if (id == E + cfg.n_null) {  // zero
        ++n_zc_picks;
      } else if (id == E + cfg.n_null + 1) {  // copy
        out.assign(xt, xt + D);
        ++n_zc_picks;
      } else {  // constant: a1 x + a2 v, [a1, a2] = softmax(W_c x)
        const int ci = id - (E + cfg.n_null + 2);
        double z[2] = {0, 0};
        for (int r = 0; r < 2; ++r) {
          for (int d = 0; d < D; ++d) z[r] += w.const_wc[(ci * 2 + r) * D + d] * xt[d];
        }
        const double a1 = 1 / (1 + std::exp(z[1] - z[0])), a2 = 1 - a1;
        for (int d = 0; d < D; ++d) out[d] = a1 * xt[d] + a2 * w.const_v[ci * D + d];
        ++n_zc_picks;
      }
      for (int d = 0; d < D; ++d) ref[d] += g * out[d];
    }
    for (int d = 0; d < D; ++d) EXPECT_NEAR(y[t * D + d], ref[d], 1e-11) << "t=" << t << " d=" << d;
  }
  // The test would be vacuous if no token picked the special targets.
  EXPECT_GT(n_null_picks, 0);
  EXPECT_GT(n_zc_picks, 0);
  const MoeTelemetry tel = ComputeTelemetry(cfg, c);
  EXPECT_DOUBLE_EQ(tel.mean_zc_per_token, static_cast<double>(n_null_picks + n_zc_picks) / n);
}

TEST(MoeRouters, TopPUsesTheFewestExpertsReachingP) {
  for (double top_p : {0.2, 0.5, 0.8, 1.0}) {
    MoeLayerConfig cfg = Cfg(MoeRouterKind::kTopP, 8, 8);
    cfg.top_p = top_p;
    const int n = 50, D = cfg.d_model, E = cfg.n_expert;
    const MoeWeights<double> w = RandomWeights<double>(cfg, 21);
    const Inputs<double> in = MakeInputs<double>(cfg, n, 22);
    std::vector<double> y(in.x.size());
    MoeCache<double> c;
    MoeForward(cfg, w, in.x.data(), n, y.data(), &c, in.Options(cfg));
    int64_t total = 0;
    std::vector<int> counts;
    for (int t = 0; t < n; ++t) {
      const std::vector<double> p = RefProbs(cfg, w, &in.x[t * D], nullptr);
      std::vector<double> sorted = p;
      std::sort(sorted.rbegin(), sorted.rend());
      int want = 0;
      double cum = 0;
      while (want < E && cum < top_p) cum += sorted[want++];
      int have = 0;
      for (int j = 0; j < cfg.k; ++j) {
        const size_t s = t * cfg.k + j;
        have += c.plan.expert_ids[s] >= 0;
        if (c.plan.expert_ids[s] >= 0) {
          EXPECT_NEAR(c.gate_w[s], p[c.plan.expert_ids[s]], 1e-12);
        } else {
          EXPECT_EQ(c.gate_w[s], 0.0);
        }
      }
      EXPECT_EQ(have, want) << "t=" << t << " top_p=" << top_p;
      total += want;
      counts.push_back(want);
    }
    const MoeTelemetry tel = ComputeTelemetry(cfg, c);
    EXPECT_DOUBLE_EQ(tel.mean_experts_per_token, static_cast<double>(total) / n);
    if (top_p == 1.0) {
      EXPECT_EQ(total, static_cast<int64_t>(n) * E);
    }
    if (top_p == 0.5) {  // tokens differ in how many experts they need
      EXPECT_NE(*std::min_element(counts.begin(), counts.end()), *std::max_element(counts.begin(), counts.end()));
    }
  }
}

TEST(MoeRouters, HashRoutesByTokenIdOnly) {
  MoeLayerConfig cfg = Cfg(MoeRouterKind::kHash, 7, 2);
  cfg.hash_seed = 12345;
  cfg.weights_scale = 3.0;
  const int n = 60;
  const MoeWeights<float> w = RandomWeights<float>(cfg, 8);
  EXPECT_TRUE(w.router.empty());
  const Inputs<float> in = MakeInputs<float>(cfg, n, 9);
  std::vector<float> y(in.x.size());
  MoeCache<float> c;
  MoeForward(cfg, w, in.x.data(), n, y.data(), &c, in.Options(cfg));
  std::vector<int64_t> load(cfg.n_expert, 0);
  for (int t = 0; t < n; ++t) {
    int32_t want[2];
    HashExperts(cfg.hash_seed, in.token_ids[t], cfg.n_expert, cfg.k, want);
    EXPECT_NE(want[0], want[1]);
    for (int j = 0; j < cfg.k; ++j) {
      EXPECT_EQ(c.plan.expert_ids[t * cfg.k + j], want[j]);
      EXPECT_FLOAT_EQ(c.gate_w[t * cfg.k + j], 1.5f);
      ++load[want[j]];
    }
  }
  // A fixed random map spreads 41 token ids over all 7 experts.
  for (int64_t l : load) EXPECT_GT(l, 0);
  // Another seed gives another map.
  int32_t a[2], b[2];
  int differ = 0;
  for (int32_t v = 0; v < 20; ++v) {
    HashExperts(1, v, 7, 2, a);
    HashExperts(2, v, 7, 2, b);
    differ += a[0] != b[0];
  }
  EXPECT_GT(differ, 5);
  MoeForwardOptions no_ids;
  EXPECT_THROW(MoeForward(cfg, w, in.x.data(), n, y.data(), &c, no_ids), Error);
}

// ---- global-batch loss scope ------------------------------------------------------------------

// Three micro-batches with the global scope give the loss and the gradients of one big batch.
TEST(MoeRouters, GlobalScopeMicroBatchesSumToTheBigBatch) {
  for (MoeRouterKind kind : {MoeRouterKind::kSoftmaxTopK, MoeRouterKind::kTopP}) {
    MoeLayerConfig cfg = Cfg(kind, 6, 3);
    cfg.top_p = 0.6;
    cfg.n_zero = 1;
    const int n = 24, D = cfg.d_model;
    const MoeWeights<double> w = RandomWeights<double>(cfg, 31);
    const Inputs<double> in = MakeInputs<double>(cfg, n, 32);
    std::vector<double> y(in.x.size()), dx(in.x.size());
    MoeCache<double> big;
    MoeForward(cfg, w, in.x.data(), n, y.data(), &big, in.Options(cfg));
    MoeGrads<double> g_big;
    g_big.Resize(cfg);
    MoeBackward(cfg, w, big, in.dy.data(), dx.data(), &g_big);

    const int cuts[] = {0, 7, 16, 24};
    // Pass 1: the counts of the global batch.
    MoeBalanceScope scope;
    std::vector<MoeCache<double>> caches(3);
    for (int m = 0; m < 3; ++m) {
      const int t0 = cuts[m], nt = cuts[m + 1] - cuts[m];
      std::vector<double> ym(static_cast<size_t>(nt) * D);
      MoeForwardOptions o;
      o.token_ids = &in.token_ids[t0];
      MoeForward(cfg, w, &in.x[t0 * D], nt, ym.data(), &caches[m], o);
      AddToBalanceScope(cfg, caches[m], &scope);
    }
    EXPECT_EQ(scope.n_tokens, n);
    // Pass 2: forward + backward per micro-batch in the global scope; also the per-micro-batch
    // scope, to show that the scope matters.
    double loss_global = 0, loss_local = 0;
    MoeGrads<double> g_sum;
    g_sum.Resize(cfg);
    std::vector<double> dx_sum(in.x.size());
    for (int m = 0; m < 3; ++m) {
      const int t0 = cuts[m], nt = cuts[m + 1] - cuts[m];
      std::vector<double> ym(static_cast<size_t>(nt) * D);
      MoeForwardOptions o;
      o.token_ids = &in.token_ids[t0];
      MoeCache<double> local;
      MoeForward(cfg, w, &in.x[t0 * D], nt, ym.data(), &local, o);
      loss_local += local.loss() * nt / n;
      o.balance = &scope;
      MoeCache<double> cm;
      MoeForward(cfg, w, &in.x[t0 * D], nt, ym.data(), &cm, o);
      loss_global += cm.loss();
      MoeBackward(cfg, w, cm, &in.dy[t0 * D], &dx_sum[t0 * D], &g_sum);
    }
    EXPECT_NEAR(loss_global, big.loss(), 1e-13 * big.loss());
    EXPECT_GT(std::fabs(loss_local - big.loss()), 1e-9 * big.loss());  // the local scope differs
    ExpectNear(g_sum.router, g_big.router, 1e-12 * MaxAbs(g_big.router), "router");
    ExpectNear(g_sum.gate_exps, g_big.gate_exps, 1e-12 * MaxAbs(g_big.gate_exps), "gate_exps");
    ExpectNear(dx_sum, dx, 1e-12 * MaxAbs(dx), "dx");
  }
}

// ---- fine-grained experts ---------------------------------------------------------------------

TEST(MoeRouters, SplitExpertsComputesTheCoarseLayer) {
  for (bool norm : {false, true}) {
    for (double cf : {0.0, 1.0}) {
      MoeLayerConfig cfg = BaseConfig(9, 12, 4, 2);
      cfg.norm_topk = norm;
      cfg.capacity_factor = cf;
      cfg.n_shared = 1;
      cfg.d_ff_shared = 5;
      const int m = 3, n = 33;
      const MoeWeights<double> w = RandomWeights<double>(cfg, 41);
      MoeLayerConfig fcfg;
      MoeWeights<double> fw;
      SplitExperts(cfg, w, m, &fcfg, &fw);
      EXPECT_EQ(fcfg.n_expert, 12);
      EXPECT_EQ(fcfg.d_ff, 4);
      EXPECT_EQ(fcfg.k, 6);
      const MoeLayerConfig plain = FineGrainedConfig(cfg, m);
      EXPECT_EQ(plain.weights_scale, cfg.weights_scale);
      std::mt19937_64 rng(42);
      const std::vector<double> x = Randn<double>(static_cast<size_t>(n) * cfg.d_model, rng, 1.0);
      std::vector<double> y(x.size()), fy(x.size());
      MoeCache<double> c, fc;
      MoeForward(cfg, w, x.data(), n, y.data(), &c);
      MoeForward(fcfg, fw, x.data(), n, fy.data(), &fc);
      ExpectNear(fy, y, 1e-12 * MaxAbs(y), "fine-grained output");
      if (cf > 0) {
        EXPECT_GT(c.plan.n_dropped, 0);
        EXPECT_EQ(fc.plan.n_dropped, c.plan.n_dropped * m);
      }
      for (int t = 0; t < n; ++t) {  // child j*m .. j*m+m-1 of the parent's j-th pick
        for (int j = 0; j < fcfg.k; ++j) {
          EXPECT_EQ(fc.plan.expert_ids[t * fcfg.k + j] / m, c.plan.expert_ids[t * cfg.k + j / m]);
        }
      }
    }
  }
  MoeLayerConfig bad = BaseConfig(8, 10, 4, 2);
  EXPECT_THROW(FineGrainedConfig(bad, 3), Error);  // 10 % 3 != 0
}

// ---- telemetry --------------------------------------------------------------------------------

TEST(MoeRouters, ExpertChoiceTelemetryCountsTheExpertsPicks) {
  MoeLayerConfig cfg = Cfg(MoeRouterKind::kExpertChoice, 4, 4);
  cfg.ec_capacity_factor = 1.5;
  const int n = 20;
  const MoeWeights<float> w = RandomWeights<float>(cfg, 50);
  const Inputs<float> in = MakeInputs<float>(cfg, n, 51);
  std::vector<float> y(in.x.size());
  MoeCache<float> c;
  MoeForward(cfg, w, in.x.data(), n, y.data(), &c);
  const MoeTelemetry tel = ComputeTelemetry(cfg, c);
  for (int e = 0; e < 4; ++e) {
    EXPECT_EQ(tel.routed_per_expert[e], 7);  // floor(20 * 1.5 / 4)
    EXPECT_EQ(tel.kept_per_expert[e], 7);
    EXPECT_DOUBLE_EQ(tel.share[e], 0.25);
  }
  EXPECT_DOUBLE_EQ(tel.max_vio, 0.0);
  EXPECT_DOUBLE_EQ(tel.drop_rate, 0.0);
  EXPECT_DOUBLE_EQ(tel.mean_experts_per_token, 28.0 / 20);
}

TEST(MoeRouters, TelemetryJsonCarriesEveryField) {
  MoeLayerConfig cfg = Cfg(MoeRouterKind::kSoftmaxTopK, 5, 2);
  cfg.n_null = 1;
  cfg.capacity_factor = 0.8;
  const int n = 30;
  const MoeWeights<float> w = RandomWeights<float>(cfg, 60);
  const Inputs<float> in = MakeInputs<float>(cfg, n, 61);
  std::vector<float> y(in.x.size());
  MoeCache<float> c;
  MoeForward(cfg, w, in.x.data(), n, y.data(), &c);
  MoeTelemetry tel = ComputeTelemetry(cfg, c);
  tel.layer = 3;
  const nlohmann::json j = nlohmann::json::parse(MoeTelemetryToJson(tel));
  EXPECT_EQ(j["layer"], 3);
  EXPECT_EQ(j["router"], "softmax_topk");
  EXPECT_EQ(j["n_targets"], 6);
  EXPECT_EQ(j["routed_per_expert"].get<std::vector<int64_t>>(), tel.routed_per_expert);
  EXPECT_EQ(j["kept_per_expert"].get<std::vector<int64_t>>(), tel.kept_per_expert);
  EXPECT_EQ(j["share"].get<std::vector<double>>(), tel.share);
  for (const char* f : {"max_vio", "drop_rate", "router_entropy", "mean_experts_per_token",
                        "mean_zc_per_token", "aux_loss", "z_loss", "entropy_loss"}) {
    EXPECT_TRUE(j.contains(f)) << f;
  }
  EXPECT_DOUBLE_EQ(j["drop_rate"].get<double>(), tel.drop_rate);
  // Counts from the cache, independently of ComputeTelemetry.
  int64_t active_ffn = 0, dropped = 0;
  for (size_t s = 0; s < c.plan.expert_ids.size(); ++s) {
    if (c.plan.expert_ids[s] >= 0 && c.plan.expert_ids[s] < cfg.n_expert) {
      ++active_ffn;
      dropped += c.plan.slot_position[s] < 0;
    }
  }
  EXPECT_GT(dropped, 0);
  EXPECT_DOUBLE_EQ(tel.drop_rate, static_cast<double>(dropped) / active_ffn);
}

// ---- batch invariance of the new routers ------------------------------------------------------

TEST(MoeRouters, DroplessOutputIgnoresBatchMates) {
  for (const NamedConfig& nc : NewRouterConfigs()) {
    if (nc.cfg.capacity_factor > 0) continue;
    SCOPED_TRACE(nc.name);
    const MoeLayerConfig& cfg = nc.cfg;
    const int n_a = 9, n_b = 300, D = cfg.d_model;
    const MoeWeights<float> w = RandomWeights<float>(cfg, 70);
    const Inputs<float> a = MakeInputs<float>(cfg, n_a, 71), b = MakeInputs<float>(cfg, n_b, 72);
    Inputs<float> ab = b;  // b's tokens, then a's
    ab.n = n_a + n_b;
    ab.x.insert(ab.x.end(), a.x.begin(), a.x.end());
    ab.token_ids.insert(ab.token_ids.end(), a.token_ids.begin(), a.token_ids.end());
    ab.prev.insert(ab.prev.end(), a.prev.begin(), a.prev.end());
    std::vector<float> ya(a.x.size()), yab(ab.x.size());
    MoeCache<float> ca, cab;
    MoeForward(cfg, w, a.x.data(), n_a, ya.data(), &ca, a.Options(cfg));
    MoeForward(cfg, w, ab.x.data(), ab.n, yab.data(), &cab, ab.Options(cfg));
    EXPECT_EQ(0, std::memcmp(ya.data(), &yab[static_cast<size_t>(n_b) * D], ya.size() * sizeof(float)));
  }
}

// ---- configuration errors ---------------------------------------------------------------------

TEST(MoeRouters, BadConfigsFailWithAMessage) {
  auto fails = [](MoeLayerConfig c, const char* what) {
    try {
      ValidateMoeConfig(c);
      ADD_FAILURE() << what << ": accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("MoE layer"), std::string::npos) << e.what();
    }
  };
  MoeLayerConfig c = Cfg(MoeRouterKind::kHash, 4, 1);
  EXPECT_NO_THROW(ValidateMoeConfig(c));
  c.n_null = 1;
  fails(c, "hash with null experts");
  c = Cfg(MoeRouterKind::kHash, 4, 1);
  c.norm_topk = true;
  fails(c, "hash with norm_topk");
  c = Cfg(MoeRouterKind::kTopP, 4, 2);
  c.top_p = 0.0;
  fails(c, "top_p 0");
  c.top_p = 1.5;
  fails(c, "top_p 1.5");
  c = Cfg(MoeRouterKind::kSigmoidBias, 4, 2);
  c.n_copy = 1;
  fails(c, "sigmoid with zero-computation experts");
  c = Cfg(MoeRouterKind::kSigmoidBias, 4, 2);
  c.gating_residual = true;
  fails(c, "sigmoid with gating residual");
  c = Cfg(MoeRouterKind::kSoftmaxTopK, 4, 7);
  c.n_null = 2;
  fails(c, "k above the router width");
  c.k = 6;
  EXPECT_NO_THROW(ValidateMoeConfig(c));
  c.zc_balance_tau = -1;
  fails(c, "negative tau");
  MoeRouterKind kind;
  EXPECT_TRUE(ParseMoeRouterKind("top_p", &kind));
  EXPECT_EQ(kind, MoeRouterKind::kTopP);
  EXPECT_FALSE(ParseMoeRouterKind("topp", &kind));
  for (MoeRouterKind k : {MoeRouterKind::kSoftmaxTopK, MoeRouterKind::kSigmoidBias,
                          MoeRouterKind::kExpertChoice, MoeRouterKind::kHash, MoeRouterKind::kTopP}) {
    MoeRouterKind back;
    ASSERT_TRUE(ParseMoeRouterKind(MoeRouterName(k), &back));
    EXPECT_EQ(back, k);
  }
  // Per-call inputs.
  MoeLayerConfig g = Cfg(MoeRouterKind::kSoftmaxTopK, 4, 2);
  MoeWeights<double> w = RandomWeights<double>(g, 1);
  std::vector<double> x(g.d_model * 2), y(x.size()), prev(2 * 4);
  MoeCache<double> cache;
  MoeForwardOptions o;
  o.prev_logits = prev.data();  // gating_residual is off
  EXPECT_THROW(MoeForward(g, w, x.data(), 2, y.data(), &cache, o), Error);
  MoeBalanceScope scope;
  scope.counts = {1, 1, 1};  // wrong width
  scope.n_slots = 3;
  scope.n_tokens = 10;
  MoeForwardOptions o2;
  o2.balance = &scope;
  EXPECT_THROW(MoeForward(g, w, x.data(), 2, y.data(), &cache, o2), Error);
  // Gradient arrays sized for another config: the backward names the array.
  MoeCache<double> ok;
  MoeForward(g, w, x.data(), 2, y.data(), &ok);
  MoeGrads<double> grads;
  grads.Resize(g);
  grads.up_exps.pop_back();
  try {
    MoeBackward(g, w, ok, y.data(), x.data(), &grads);
    ADD_FAILURE() << "mis-sized gradients accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("ffn_up_exps"), std::string::npos) << e.what();
  }
  EXPECT_THROW(MoeBackwardNaive(g, w, ok, y.data(), x.data(), &grads), Error);
  MoeLayerConfig sig = Cfg(MoeRouterKind::kSigmoidBias, 4, 2);
  MoeLayerConfig out;
  MoeWeights<double> wo;
  EXPECT_THROW(SplitExperts(sig, RandomWeights<double>(sig, 2), 2, &out, &wo), Error);
}

}  // namespace
}  // namespace moe
