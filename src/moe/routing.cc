#include "moe/routing.h"

#include <cmath>
#include <vector>

#include "kernels/kernels.h"
#include "util/error.h"

namespace moe {

void RoutingPlan::BuildGroups() {
  const int n_slots = n_tokens * k;
  tokens_per_expert.assign(n_expert, 0);
  for (int s = 0; s < n_slots; ++s) {
    MOE_ASSERT(expert_ids[s] < n_expert);
    if (expert_ids[s] >= 0) ++tokens_per_expert[expert_ids[s]];
  }
  expert_offsets.assign(n_expert + 1, 0);
  for (int e = 0; e < n_expert; ++e) expert_offsets[e + 1] = expert_offsets[e] + tokens_per_expert[e];
  sorted_slots.resize(expert_offsets[n_expert]);
  slot_position.resize(n_slots);
  std::vector<int32_t> fill(expert_offsets.begin(), expert_offsets.end() - 1);
  for (int s = 0; s < n_slots; ++s) {
    if (expert_ids[s] < 0) {  // unused slot (top_p): no row in expert order
      slot_position[s] = -1;
      continue;
    }
    const int pos = fill[expert_ids[s]]++;
    sorted_slots[pos] = s;
    slot_position[s] = pos;
  }
}

namespace {
uint64_t SplitMix64(uint64_t z) {
  z += 0x9e3779b97f4a7c15ULL;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}
}  // namespace

void HashExperts(uint64_t seed, int32_t token_id, int n_expert, int k, int32_t* ids) {
  MOE_ASSERT(k >= 1 && k <= n_expert);
  const uint64_t base = static_cast<uint64_t>(static_cast<uint32_t>(token_id)) << 32;
  int have = 0;
  for (uint64_t a = 0; have < k; ++a) {
    const auto e = static_cast<int32_t>(SplitMix64(seed ^ (base | a)) % static_cast<uint64_t>(n_expert));
    bool seen = false;
    for (int j = 0; j < have; ++j) seen = seen || ids[j] == e;
    if (!seen) ids[have++] = e;
  }
}

void RouteTokens(const RouterConfig& cfg, float* logits, int n_tokens, RoutingPlan* plan,
                 const int32_t* token_ids, const float* bias) {
  const int E = cfg.n_expert, K = cfg.n_expert_used;
  MOE_ASSERT(K >= 1 && K <= E);
  MOE_ASSERT(bias == nullptr || (cfg.select == RouteSelect::kTopK && cfg.gating == GatingFunc::kSigmoid));
  MOE_ASSERT(cfg.select != RouteSelect::kTopP || cfg.gating == GatingFunc::kSoftmax);
  MOE_ASSERT(cfg.select != RouteSelect::kHash || token_ids != nullptr || n_tokens == 0);
  plan->n_tokens = n_tokens;
  plan->n_expert = E;
  plan->k = K;
  plan->expert_ids.resize(static_cast<size_t>(n_tokens) * K);
  plan->weights.resize(static_cast<size_t>(n_tokens) * K);
  std::vector<float> score(bias ? E : 0);  // [n_expert] probability + selection bias
  for (int t = 0; t < n_tokens; ++t) {
    int32_t* ids = &plan->expert_ids[static_cast<size_t>(t) * K];
    float* w = &plan->weights[static_cast<size_t>(t) * K];
    if (cfg.select == RouteSelect::kHash) {
      HashExperts(cfg.hash_seed, token_ids[t], E, K, ids);
      for (int j = 0; j < K; ++j) w[j] = cfg.weights_scale / static_cast<float>(K);
      continue;
    }
    float* p = logits + static_cast<size_t>(t) * E;  // [n_expert]
    switch (cfg.gating) {
      case GatingFunc::kSoftmax: kernels::Softmax(p, E); break;
      case GatingFunc::kSigmoid:
        for (int e = 0; e < E; ++e) p[e] = 1.0f / (1.0f + std::exp(-p[e]));
        break;
    }
    if (bias) {
      for (int e = 0; e < E; ++e) score[e] = p[e] + bias[e];
      kernels::TopK(score.data(), E, K, ids);
    } else {
      kernels::TopK(p, E, K, ids);  // ranked by probability, ties to the lower id
    }
    int used = K;
    if (cfg.select == RouteSelect::kTopP) {
      double cum = 0.0;
      for (used = 0; used < K;) {
        cum += p[ids[used++]];
        if (cum >= cfg.top_p) break;
      }
      for (int j = used; j < K; ++j) {
        ids[j] = -1;
        w[j] = 0.0f;
      }
    }
    float sum = 0.0f;
    for (int j = 0; j < used; ++j) {
      w[j] = p[ids[j]];
      sum += w[j];
    }
    if (cfg.norm_topk) {
      for (int j = 0; j < used; ++j) w[j] /= sum;
    }
    if (cfg.weights_scale != 1.0f) {
      for (int j = 0; j < used; ++j) w[j] *= cfg.weights_scale;
    }
  }
  plan->BuildGroups();
}

}  // namespace moe
