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

// A router config with the fields these tests vary (d_model / d_ff do not matter to routing).
MoeLayerConfig Cfg(MoeRouterKind router, int E, int K, bool norm, double scale) {
  MoeLayerConfig c;
  c.d_model = 1;
  c.d_ff = 1;
  c.n_expert = E;
  c.k = K;
  c.router = router;
  c.norm_topk = norm;
  c.weights_scale = scale;
  return c;
}

// Runs the router (routing.h) in float on logits [T][R].
RoutingPlan RouteF(const MoeLayerConfig& cfg, const float* logits, int T, const int32_t* toks = nullptr,
                   const float* bias = nullptr) {
  const int R = cfg.router_width();
  std::vector<float> probs(static_cast<size_t>(T) * R), gw(static_cast<size_t>(T) * cfg.k);
  RouteOptions ro;
  ro.token_ids = toks;
  RoutingPlan plan;
  Route(cfg, logits, T, bias, ro, probs.data(), static_cast<float*>(nullptr), gw.data(), &plan);
  return plan;
}

struct RefRoute {
  std::vector<int> ids;
  std::vector<double> w;
};

// Gating probabilities in double (softmax or sigmoid) and the experts ranked by them, ties to
// the lower id.
std::vector<double> RefProbs(const float* logits, int E, bool sigmoid) {
  std::vector<double> p(E);
  if (sigmoid) {
    for (int e = 0; e < E; ++e) p[e] = 1.0 / (1.0 + std::exp(-static_cast<double>(logits[e])));
  } else {
    double mx = *std::max_element(logits, logits + E), s = 0;
    for (int e = 0; e < E; ++e) s += p[e] = std::exp(logits[e] - mx);
    for (double& x : p) x /= s;
  }
  return p;
}
std::vector<int> RankedIds(const std::vector<double>& p) {
  std::vector<int> idx(p.size());
  std::iota(idx.begin(), idx.end(), 0);
  std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return p[a] > p[b]; });
  return idx;
}

RefRoute Reference(const std::vector<float>& logits, int E, int K, bool norm, bool sigmoid) {
  const std::vector<double> p = RefProbs(logits.data(), E, sigmoid);
  const std::vector<int> idx = RankedIds(p);
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
          const MoeLayerConfig cfg = Cfg(sig ? MoeRouterKind::kSigmoidBias : MoeRouterKind::kSoftmaxTopK, E, K, norm, 1.0);
          const RoutingPlan plan = RouteF(cfg, logits.data(), T);
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
    plan.n_expert = plan.n_targets = E;
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

// ---- hash, top_p, sigmoid_bias: independent double references ------------------------------

// The documented hash: attempt a = 0, 1, ... takes SplitMix64(seed ^ (id << 32 | a)) mod E if new.
uint64_t RefSplitMix64(uint64_t x) {
  uint64_t z = x + 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

std::vector<int> RefHash(uint64_t seed, uint32_t id, int E, int K) {
  std::vector<int> out;
  for (uint64_t a = 0; static_cast<int>(out.size()) < K; ++a) {
    const int e = static_cast<int>(RefSplitMix64(seed ^ ((static_cast<uint64_t>(id) << 32) | a)) % E);
    if (std::find(out.begin(), out.end(), e) == out.end()) out.push_back(e);
  }
  return out;
}

TEST(Routing, HashMatchesReferenceWithWeightScaleOverK) {
  for (int E : {1, 5, 8, 64}) {
    for (int K : {1, 2, 4}) {
      if (K > E) continue;
      for (uint64_t seed : {0ULL, 12345ULL, 0xdeadbeefcafef00dULL}) {
        const int T = 40;
        std::vector<int32_t> toks(T);
        for (int t = 0; t < T; ++t) toks[t] = (t * 7919 + 13) % 50000;
        toks[0] = 0;
        MoeLayerConfig cfg = Cfg(MoeRouterKind::kHash, E, K, false, 2.5);
        cfg.hash_seed = seed;
        const RoutingPlan plan = RouteF(cfg, nullptr, T, toks.data());
        for (int t = 0; t < T; ++t) {
          const std::vector<int> ref = RefHash(seed, static_cast<uint32_t>(toks[t]), E, K);
          for (int j = 0; j < K; ++j) {
            ASSERT_EQ(plan.expert_ids[t * K + j], ref[j]) << "E=" << E << " K=" << K << " t=" << t;
            EXPECT_DOUBLE_EQ(plan.weights[t * K + j], 2.5 / K);
          }
        }
        EXPECT_EQ(plan.expert_offsets[E], T * K);
      }
    }
  }
}

// Softmax in double, experts ranked by probability (ties to the lower id), the fewest n whose
// cumulative probability reaches top_p (n <= K). `ambiguous`: some cumulative sum is so close to
// top_p that float rounding in the router may decide either way.
RefRoute RefTopP(const float* logits, int E, int K, double top_p, bool norm, double scale, bool* ambiguous) {
  const std::vector<double> p = RefProbs(logits, E, false);
  const std::vector<int> idx = RankedIds(p);
  RefRoute r;
  double cum = 0;
  *ambiguous = false;
  for (int j = 0; j < K; ++j) {
    cum += p[idx[j]];
    r.ids.push_back(idx[j]);
    if (std::fabs(cum - top_p) < 1e-5 && j + 1 < K) *ambiguous = true;
    if (cum >= top_p) break;
  }
  double used = 0;
  for (int id : r.ids) used += p[id];
  for (int id : r.ids) r.w.push_back((norm ? p[id] / used : p[id]) * scale);
  return r;
}

TEST(Routing, TopPUsesFewestExpertsReachingThresholdAndMarksTheRestUnused) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.5f);
  int n_partial = 0, n_checked = 0;
  for (int E : {1, 4, 8, 64}) {
    for (int K : {1, 2, 4, 8}) {
      if (K > E) continue;
      for (float top_p : {0.2f, 0.4f, 0.75f, 1.0f}) {
        for (bool norm : {false, true}) {
          const int T = 23;
          std::vector<float> logits(T * E);
          for (float& x : logits) x = nd(rng);
          MoeLayerConfig cfg = Cfg(MoeRouterKind::kTopP, E, K, norm, 1.5);
          cfg.top_p = top_p;
          const RoutingPlan plan = RouteF(cfg, logits.data(), T);
          std::vector<int> count(E, 0);
          int used_total = 0;
          for (int t = 0; t < T; ++t) {
            bool amb = false;
            RefRoute ref = RefTopP(&logits[t * E], E, K, top_p, norm, 1.5, &amb);
            int n_used = 0;
            for (int j = 0; j < K; ++j) n_used += plan.expert_ids[t * K + j] >= 0;
            for (int j = 0; j < n_used; ++j) ++count[plan.expert_ids[t * K + j]];
            used_total += n_used;
            if (amb) continue;
            ++n_checked;
            const int n = static_cast<int>(ref.ids.size());
            n_partial += n < K;
            ASSERT_EQ(n_used, n) << "E=" << E << " K=" << K << " top_p=" << top_p << " t=" << t;
            for (int j = 0; j < K; ++j) {
              const int s = t * K + j;
              if (j < n) {
                ASSERT_EQ(plan.expert_ids[s], ref.ids[j]);
                EXPECT_NEAR(plan.weights[s], ref.w[j], 1e-6 * std::max(1.0, ref.w[j]));
                EXPECT_GE(plan.slot_position[s], 0);
              } else {  // unused: id -1, weight 0, no row in expert order
                EXPECT_EQ(plan.expert_ids[s], -1);
                EXPECT_EQ(plan.weights[s], 0.0f);
                EXPECT_EQ(plan.slot_position[s], -1);
              }
            }
          }
          // The groups hold exactly the used slots.
          ASSERT_EQ(plan.expert_offsets[E], used_total);
          ASSERT_EQ(static_cast<int>(plan.sorted_slots.size()), used_total);
          for (int e = 0; e < E; ++e) EXPECT_EQ(plan.tokens_per_expert[e], count[e]);
        }
      }
    }
  }
  EXPECT_GT(n_checked, 2000);
  EXPECT_GT(n_partial, 200);  // the test exercises tokens that use fewer than k experts
}

TEST(Routing, SigmoidBiasSelectsByBiasedScoreWeighsByUnbiasedScore) {
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int E : {2, 8, 64}) {
    for (int K : {1, 2, 6}) {
      if (K > E) continue;
      for (bool norm : {false, true}) {
        const int T = 17;
        std::vector<float> logits(T * E), bias(E);
        for (float& x : logits) x = nd(rng);
        for (float& b : bias) b = 0.3f * nd(rng);  // large enough to change selections
        const MoeLayerConfig cfg = Cfg(MoeRouterKind::kSigmoidBias, E, K, norm, 2.0);
        const RoutingPlan plan = RouteF(cfg, logits.data(), T, nullptr, bias.data());
        for (int t = 0; t < T; ++t) {
          std::vector<double> sc(E), score(E);
          for (int e = 0; e < E; ++e) {
            sc[e] = 1.0 / (1.0 + std::exp(-static_cast<double>(logits[t * E + e])));
            score[e] = sc[e] + bias[e];
          }
          std::vector<int> idx(E);
          std::iota(idx.begin(), idx.end(), 0);
          std::stable_sort(idx.begin(), idx.end(), [&](int a, int b) { return score[a] > score[b]; });
          double s = 0;
          for (int j = 0; j < K; ++j) s += sc[idx[j]];
          for (int j = 0; j < K; ++j) {
            ASSERT_EQ(plan.expert_ids[t * K + j], idx[j]) << "E=" << E << " K=" << K << " t=" << t;
            const double w = (norm ? sc[idx[j]] / s : sc[idx[j]]) * 2.0;
            EXPECT_NEAR(plan.weights[t * K + j], w, 1e-6 * std::max(1.0, w));
          }
        }
      }
    }
  }
}

TEST(Routing, BiasChangesTheSelectionNotTheWeights) {
  // Two experts, equal logits: the bias alone decides, and the weight stays sigmoid(0) = 0.5.
  float logits[2] = {0.0f, 0.0f};
  const float bias[2] = {-0.1f, 0.1f};
  const RoutingPlan plan = RouteF(Cfg(MoeRouterKind::kSigmoidBias, 2, 1, false, 1.0), logits, 1, nullptr, bias);
  EXPECT_EQ(plan.expert_ids[0], 1);
  EXPECT_FLOAT_EQ(plan.weights[0], 0.5f);
}

TEST(Routing, BuildGroupsSkipsUnusedSlots) {
  std::mt19937 rng(9);
  for (int E : {1, 3, 8}) {
    const int T = 31, K = std::min(E, 3);
    RoutingPlan plan;
    plan.n_tokens = T;
    plan.n_expert = plan.n_targets = E;
    plan.k = K;
    int used = 0;
    for (int t = 0; t < T; ++t) {
      std::vector<int> idx(E);
      std::iota(idx.begin(), idx.end(), 0);
      std::shuffle(idx.begin(), idx.end(), rng);
      const int n_t = 1 + static_cast<int>(rng() % K);  // the first n_t slots are used
      for (int j = 0; j < K; ++j) plan.expert_ids.push_back(j < n_t ? idx[j] : -1);
      used += n_t;
    }
    plan.BuildGroups();
    ASSERT_EQ(plan.expert_offsets[E], used);
    ASSERT_EQ(static_cast<int>(plan.sorted_slots.size()), used);
    std::vector<int> seen(T * K, 0);
    for (int e = 0; e < E; ++e) {
      int prev = -1;
      for (int p = plan.expert_offsets[e]; p < plan.expert_offsets[e + 1]; ++p) {
        const int s = plan.sorted_slots[p];
        EXPECT_EQ(plan.expert_ids[s], e);
        EXPECT_GT(s, prev);
        prev = s;
        EXPECT_EQ(plan.slot_position[s], p);
        ++seen[s];
      }
    }
    for (int s = 0; s < T * K; ++s) {
      EXPECT_EQ(seen[s], plan.expert_ids[s] >= 0 ? 1 : 0);
      if (plan.expert_ids[s] < 0) {
        EXPECT_EQ(plan.slot_position[s], -1);
      }
    }
  }
}

// RoutingMargin against the ranking itself: for top-k without groups the nearest chosen /
// unchosen pair is the k-th and the (k+1)-th ranked selection score, computed here in double.
TEST(Routing, MarginIsTheGapBetweenTheKthAndTheNextSelectionScore) {
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (MoeRouterKind kind : {MoeRouterKind::kSoftmaxTopK, MoeRouterKind::kSigmoidBias}) {
    for (int E : {2, 8, 64}) {
      for (int K : {1, 2, 6}) {
        if (K > E) continue;
        const MoeLayerConfig cfg = Cfg(kind, E, K, false, 1.0);
        std::vector<float> logits(E), bias(E), probs(E);
        for (float& x : logits) x = nd(rng);
        for (float& b : bias) b = 0.3f * nd(rng);
        const float* bp = kind == MoeRouterKind::kSigmoidBias ? bias.data() : nullptr;
        const RoutingPlan plan = RouteF(cfg, logits.data(), 1, nullptr, bp);
        RouterGating(cfg, logits.data(), probs.data(), static_cast<float*>(nullptr));
        std::vector<double> score(E);
        for (int e = 0; e < E; ++e) {
          const double l = logits[e];
          score[e] = kind == MoeRouterKind::kSigmoidBias ? 1.0 / (1.0 + std::exp(-l)) + bias[e] : l;
        }
        if (kind == MoeRouterKind::kSoftmaxTopK) {  // softmax probabilities, in double
          double mx = *std::max_element(score.begin(), score.end()), sum = 0;
          for (double& s : score) sum += s = std::exp(s - mx);
          for (double& s : score) s /= sum;
        }
        std::vector<double> sorted = score;
        std::sort(sorted.begin(), sorted.end(), std::greater<>());
        // (the bias given to a softmax router too: RouterSelect ignores it there, and so must this)
        const float m = RoutingMargin(cfg, probs.data(), bias.data(), plan.expert_ids.data());
        if (K == E) {
          EXPECT_TRUE(std::isinf(m));
        } else {
          EXPECT_NEAR(m, sorted[K - 1] - sorted[K], 1e-6) << "E=" << E << " K=" << K;
        }
      }
    }
  }
  // A tie: two equal logits, one of them chosen.
  const MoeLayerConfig cfg = Cfg(MoeRouterKind::kSoftmaxTopK, 3, 1, false, 1.0);
  float logits[3] = {0.5f, 0.5f, -1.0f}, probs[3];
  const RoutingPlan plan = RouteF(cfg, logits, 1);
  RouterGating(cfg, logits, probs, static_cast<float*>(nullptr));
  EXPECT_EQ(RoutingMargin(cfg, probs, nullptr, plan.expert_ids.data()), 0.0f);
}

}  // namespace
}  // namespace moe
