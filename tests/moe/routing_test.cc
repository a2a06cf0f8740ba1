// Router and RoutingPlan against a double-precision reference written independently here.
#include "moe/routing.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

namespace moe {
namespace {

struct RefRoute {
  std::vector<int> ids;
  std::vector<double> w;
};

RefRoute Reference(const std::vector<float>& logits, int E, int K, bool norm, bool sigmoid) {
  std::vector<double> p(E);
  if (sigmoid) {
    for (int e = 0; e < E; ++e) p[e] = 1.0 / (1.0 + std::exp(-static_cast<double>(logits[e])));
  } else {
    double mx = *std::max_element(logits.begin(), logits.end()), s = 0;
    for (int e = 0; e < E; ++e) s += p[e] = std::exp(logits[e] - mx);
    for (double& x : p) x /= s;
  }
  std::vector<int> idx(E);
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return p[a] > p[b]; });
  RefRoute r;
  r.ids.assign(idx.begin(), idx.begin() + K);
  double s = 0;
  for (int j = 0; j < K; ++j) s += p[r.ids[j]];
  for (int j = 0; j < K; ++j) r.w.push_back(norm ? p[r.ids[j]] / s : p[r.ids[j]]);
  return r;
}

TEST(Routing, SoftmaxTopKMatchesDoubleReference) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.f, 2.f);
  for (int E : {1, 4, 8, 60, 64}) {
    for (int K : {1, 2, 3, 4}) {
      if (K > E) continue;
      for (bool norm : {false, true}) {
        for (bool sig : {false, true}) {
          const int T = 13;
          std::vector<float> logits(T * E);
          for (float& x : logits) x = nd(rng);
          std::vector<float> work = logits;
          RouterConfig cfg{sig ? GatingFunc::kSigmoid : GatingFunc::kSoftmax, E, K, norm, 1.0f};
          RoutingPlan plan;
          RouteTokens(cfg, work.data(), T, &plan);
          for (int t = 0; t < T; ++t) {
            std::vector<float> row(logits.begin() + t * E, logits.begin() + (t + 1) * E);
            RefRoute ref = Reference(row, E, K, norm, sig);
            for (int j = 0; j < K; ++j) {
              ASSERT_EQ(plan.expert_ids[t * K + j], ref.ids[j]) << "E=" << E << " K=" << K << " t=" << t;
              EXPECT_NEAR(plan.weights[t * K + j], ref.w[j], 1e-6 * std::max(1.0, ref.w[j]));
            }
          }
        }
      }
    }
  }
}

TEST(Routing, GroupsAreAStableInversePermutation) {
  std::mt19937 rng(3);
  for (int E : {1, 4, 8, 64}) {
    const int T = 37, K = std::min(E, 3);
    RoutingPlan plan;
    plan.n_tokens = T;
    plan.n_expert = E;
    plan.k = K;
    for (int t = 0; t < T; ++t) {
      std::vector<int> idx(E);
      std::iota(idx.begin(), idx.end(), 0);
      std::shuffle(idx.begin(), idx.end(), rng);
      for (int j = 0; j < K; ++j) plan.expert_ids.push_back(idx[j]);
    }
    plan.BuildGroups();
    ASSERT_EQ(plan.expert_offsets[E], T * K);
    std::vector<int> seen(T * K, 0);
    for (int e = 0; e < E; ++e) {
      int prev = -1;
      for (int p = plan.expert_offsets[e]; p < plan.expert_offsets[e + 1]; ++p) {
        const int s = plan.sorted_slots[p];
        EXPECT_EQ(plan.expert_ids[s], e);
        EXPECT_GT(s, prev);  // token order kept within an expert
        prev = s;
        EXPECT_EQ(plan.slot_position[s], p);
        ++seen[s];
      }
      EXPECT_EQ(plan.tokens_per_expert[e], plan.expert_offsets[e + 1] - plan.expert_offsets[e]);
    }
    for (int s = 0; s < T * K; ++s) EXPECT_EQ(seen[s], 1);
  }
}

}  // namespace
}  // namespace moe
