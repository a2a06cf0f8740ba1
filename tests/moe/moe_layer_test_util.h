// Helpers shared by the MoE layer tests: random weights, data-derived tolerances, comparisons.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "moe/moe_layer.h"

namespace moe {
namespace {

template <typename T>
std::vector<T> Randn(size_t n, std::mt19937_64& rng, double sd) {
  std::normal_distribution<double> nd(0.0, sd);
  std::vector<T> v(n);
  for (T& x : v) x = static_cast<T>(nd(rng));
  return v;
}

// Per-slot flags of a plan (routing.h): used = the router uses the slot; kept = an FFN row.
inline std::vector<uint8_t> UsedFlags(const RoutingPlan& p) {
  std::vector<uint8_t> v(p.expert_ids.size());
  for (size_t s = 0; s < v.size(); ++s) v[s] = p.expert_ids[s] >= 0;
  return v;
}
inline std::vector<uint8_t> KeptFlags(const RoutingPlan& p) {
  std::vector<uint8_t> v(p.slot_position.size());
  for (size_t s = 0; s < v.size(); ++s) v[s] = p.slot_position[s] >= 0;
  return v;
}

template <typename T>
MoeWeights<T> RandomWeights(const MoeLayerConfig& cfg, uint64_t seed) {
  std::mt19937_64 rng(seed);
  MoeWeights<T> w;
  w.Resize(cfg);
  const double sd = 1.0 / std::sqrt(static_cast<double>(cfg.d_model));
  w.router = Randn<T>(w.router.size(), rng, 2.0 * sd);
  w.gate_exps = Randn<T>(w.gate_exps.size(), rng, sd);
  w.up_exps = Randn<T>(w.up_exps.size(), rng, sd);
  w.down_exps = Randn<T>(w.down_exps.size(), rng, 1.0 / std::sqrt(static_cast<double>(cfg.d_ff)));
  if (!w.exp_probs_b.empty()) w.exp_probs_b = Randn<T>(w.exp_probs_b.size(), rng, 0.05);
  w.gate_shexp = Randn<T>(w.gate_shexp.size(), rng, sd);
  w.up_shexp = Randn<T>(w.up_shexp.size(), rng, sd);
  w.down_shexp = Randn<T>(w.down_shexp.size(), rng, 0.3);
  w.gate_inp_shexp = Randn<T>(w.gate_inp_shexp.size(), rng, sd);
  w.const_wc = Randn<T>(w.const_wc.size(), rng, sd);
  w.const_v = Randn<T>(w.const_v.size(), rng, 1.0);
  w.gate_res = Randn<T>(w.gate_res.size(), rng, 0.3);
  return w;
}

template <typename T>
double MaxAbs(const std::vector<T>& v) {
  double m = 0;
  for (T x : v) m = std::max(m, std::fabs(static_cast<double>(x)));
  return m;
}

// Tolerance from the data: a sum of n products has rounding error about n * eps * |terms|; the
// layer chains a few such sums (router, gate/up, down, combine), so 20 * n * eps * max|ref|.
template <typename T>
double Tol(const std::vector<T>& ref, int n_terms) {
  return 20.0 * n_terms * std::numeric_limits<T>::epsilon() * std::max(MaxAbs(ref), 1e-30);
}

template <typename T>
void ExpectNear(const std::vector<T>& got, const std::vector<T>& want, double tol,
                const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = std::fabs(static_cast<double>(got[i]) - static_cast<double>(want[i]));
    if (d > worst) worst = d, at = i;
  }
  EXPECT_LE(worst, tol) << what << ": worst |diff| at " << at << " (" << got[at] << " vs "
                        << want[at] << ")";
}

inline MoeLayerConfig BaseConfig(int d, int f, int e, int k) {
  MoeLayerConfig c;
  c.d_model = d;
  c.d_ff = f;
  c.n_expert = e;
  c.k = k;
  return c;
}

// All gradient arrays, named, for uniform comparison loops.
template <typename T>
std::vector<std::pair<const char*, std::vector<T>*>> GradArrays(MoeGrads<T>& g) {
  return {{"router", &g.router},         {"gate_exps", &g.gate_exps},
          {"up_exps", &g.up_exps},       {"down_exps", &g.down_exps},
          {"gate_shexp", &g.gate_shexp}, {"up_shexp", &g.up_shexp},
          {"down_shexp", &g.down_shexp}, {"gate_inp_shexp", &g.gate_inp_shexp},
          {"const_wc", &g.const_wc},     {"const_v", &g.const_v},
          {"gate_res", &g.gate_res}};
}
template <typename T>
std::vector<std::pair<const char*, std::vector<T>*>> WeightArrays(MoeWeights<T>& w) {
  return {{"router", &w.router},         {"gate_exps", &w.gate_exps},
          {"up_exps", &w.up_exps},       {"down_exps", &w.down_exps},
          {"gate_shexp", &w.gate_shexp}, {"up_shexp", &w.up_shexp},
          {"down_shexp", &w.down_shexp}, {"gate_inp_shexp", &w.gate_inp_shexp},
          {"const_wc", &w.const_wc},     {"const_v", &w.const_v},
          {"gate_res", &w.gate_res}};
}

// Every gradient array of g against ref (tolerance from ref's size and n_terms); each non-empty
// reference array must also be non-zero somewhere, unless listed in `may_be_zero`.
template <typename T>
void ExpectGradsNear(MoeGrads<T>& g, MoeGrads<T>& ref, int n_terms,
                     const std::vector<std::string>& may_be_zero = {}) {
  auto ga = GradArrays(g), gr = GradArrays(ref);
  for (size_t a = 0; a < ga.size(); ++a) {
    ExpectNear(*ga[a].second, *gr[a].second, Tol(*gr[a].second, n_terms), ga[a].first);
    const bool allowed = std::find(may_be_zero.begin(), may_be_zero.end(), ga[a].first) != may_be_zero.end();
    if (!gr[a].second->empty() && !allowed) {
      EXPECT_GT(MaxAbs(*gr[a].second), 0.0) << ga[a].first << " is all zero";
    }
  }
}

}  // namespace
}  // namespace moe
