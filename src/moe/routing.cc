#include "moe/routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "kernels/kernels.h"
#include "util/error.h"

namespace moe {

void RoutingPlan::BuildGroups(const uint8_t* dropped) {
  const int n_slots = n_tokens * k;
  MOE_ASSERT(static_cast<int>(expert_ids.size()) == n_slots && n_expert <= n_targets);
  tokens_per_expert.assign(n_expert, 0);
  n_dropped = 0;
  auto has_row = [&](int s) {
    const int id = expert_ids[s];
    MOE_ASSERT(id < n_targets);
    if (id < 0 || id >= n_expert) return false;
    if (dropped != nullptr && dropped[s]) {
      ++n_dropped;
      return false;
    }
    return true;
  };
  slot_position.assign(n_slots, -1);
  for (int s = 0; s < n_slots; ++s) {
    if (has_row(s)) {
      ++tokens_per_expert[expert_ids[s]];
      slot_position[s] = 0;  // marked; the position is filled below
    }
  }
  expert_offsets.assign(n_expert + 1, 0);
  for (int e = 0; e < n_expert; ++e) expert_offsets[e + 1] = expert_offsets[e] + tokens_per_expert[e];
  sorted_slots.resize(expert_offsets[n_expert]);
  std::vector<int32_t> fill(expert_offsets.begin(), expert_offsets.end() - 1);
  for (int s = 0; s < n_slots; ++s) {
    if (slot_position[s] < 0) continue;
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

// The first k of n scores, best first; ties go to the lower id (a NaN score never beats another).
template <typename T>
void TopKIds(const T* score, int n, int k, int32_t* ids) {
  thread_local std::vector<uint8_t> taken;
  taken.assign(n, 0);
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int e = 0; e < n; ++e) {
      if (!taken[e] && (best < 0 || score[e] > score[best])) best = e;
    }
    taken[best] = 1;
    ids[j] = best;
  }
}

template <typename T>
T Sigmoid(T v) { return T(1) / (T(1) + std::exp(-v)); }

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

template <typename T>
void RouterGating(const MoeLayerConfig& cfg, const T* logits, T* probs, T* bprobs) {
  const int R = cfg.router_width();
  if (cfg.router == MoeRouterKind::kSigmoidBias) {
    T sum = 0;
    for (int e = 0; e < R; ++e) sum += probs[e] = Sigmoid(logits[e]);
    if (bprobs != nullptr) {
      for (int e = 0; e < R; ++e) bprobs[e] = probs[e] / sum;
    }
    return;
  }
  if constexpr (std::is_same_v<T, float>) {
    std::copy(logits, logits + R, probs);
    kernels::Softmax(probs, R);
  } else {
    T mx = logits[0];
    for (int e = 1; e < R; ++e) mx = std::max(mx, logits[e]);
    T sum = 0;
    for (int e = 0; e < R; ++e) sum += probs[e] = std::exp(logits[e] - mx);
    for (int e = 0; e < R; ++e) probs[e] /= sum;
  }
  if (bprobs != nullptr) std::copy(probs, probs + R, bprobs);
}

template <typename T>
void RouterSelect(const MoeLayerConfig& cfg, const T* probs, const T* bias, int32_t token_id,
                  int32_t* ids) {
  const int E = cfg.n_expert, R = cfg.router_width(), K = cfg.k;
  MOE_ASSERT(cfg.router != MoeRouterKind::kExpertChoice);
  if (cfg.router == MoeRouterKind::kHash) {
    HashExperts(cfg.hash_seed, token_id, E, K, ids);
    return;
  }
  thread_local std::vector<T> score_buf;
  score_buf.assign(probs, probs + R);
  T* score = score_buf.data();
  if (cfg.router == MoeRouterKind::kTopP) {
    TopKIds(score, R, K, ids);
    double cum = 0;
    int used = K;
    for (int j = 0; j < K; ++j) {
      cum += static_cast<double>(probs[ids[j]]);
      if (cum >= cfg.top_p) {
        used = j + 1;
        break;
      }
    }
    for (int j = used; j < K; ++j) ids[j] = -1;
    return;
  }
  if (cfg.router == MoeRouterKind::kSigmoidBias && bias != nullptr) {
    for (int e = 0; e < E; ++e) score[e] += bias[e];
  }
  if (cfg.n_group > 1) {
    const T kNeg = -std::numeric_limits<T>::infinity();
    const int gs = E / cfg.n_group;
    thread_local std::vector<T> gscore;
    thread_local std::vector<uint8_t> keep;
    gscore.assign(cfg.n_group, T(0));
    keep.assign(cfg.n_group, 0);
    for (int g = 0; g < cfg.n_group; ++g) {
      T b1 = kNeg, b2 = kNeg;  // the two best scores of the group
      for (int e = g * gs; e < (g + 1) * gs; ++e) {
        if (score[e] > b1) {
          b2 = b1;
          b1 = score[e];
        } else if (score[e] > b2) {
          b2 = score[e];
        }
      }
      gscore[g] = gs >= 2 ? b1 + b2 : b1;
    }
    for (int r = 0; r < cfg.topk_group; ++r) {
      int best = -1;
      for (int g = 0; g < cfg.n_group; ++g) {
        if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
      }
      keep[best] = 1;
    }
    for (int e = 0; e < E; ++e) {
      if (!keep[e / gs]) score[e] = kNeg;
    }
  }
  TopKIds(score, R, K, ids);
}

template <typename T>
void ExpertChoiceSelect(const MoeLayerConfig& cfg, int n_tokens, const T* probs, int32_t* ids) {
  const int E = cfg.n_expert;
  MOE_ASSERT(cfg.router == MoeRouterKind::kExpertChoice && cfg.k == E);
  std::fill(ids, ids + static_cast<size_t>(n_tokens) * E, -1);
  if (n_tokens == 0) return;
  const int64_t cap = ExpertChoiceCapacity(cfg, n_tokens);
  std::vector<int32_t> order(n_tokens);
  for (int e = 0; e < E; ++e) {
    for (int t = 0; t < n_tokens; ++t) order[t] = t;
    auto better = [&](int32_t a, int32_t b) {
      const T pa = probs[static_cast<size_t>(a) * E + e], pb = probs[static_cast<size_t>(b) * E + e];
      return pa > pb || (pa == pb && a < b);
    };
    std::partial_sort(order.begin(), order.begin() + cap, order.end(), better);
    for (int64_t r = 0; r < cap; ++r) ids[static_cast<size_t>(order[r]) * E + e] = e;
  }
}

float RoutingMargin(const MoeLayerConfig& cfg, const float* probs, const float* bias, const int32_t* ids) {
  const int E = cfg.n_expert, R = cfg.router_width(), K = cfg.k;
  const bool biased = cfg.router == MoeRouterKind::kSigmoidBias && bias != nullptr;  // as RouterSelect
  const auto score = [&](int e) { return probs[e] + (biased && e < E ? bias[e] : 0.0f); };
  const auto chosen = [&](int e) { return std::find(ids, ids + K, e) != ids + K; };
  float margin = std::numeric_limits<float>::infinity();
  for (int j = 0; j < K; ++j) {
    if (ids[j] < 0) continue;
    for (int b = 0; b < R; ++b)
      if (!chosen(b)) margin = std::min(margin, std::fabs(score(ids[j]) - score(b)));
  }
  return margin;
}

template <typename T>
void RouterWeights(const MoeLayerConfig& cfg, const T* probs, const int32_t* ids, T* w) {
  const int K = cfg.k;
  const T scale = static_cast<T>(cfg.weights_scale);
  if (cfg.router == MoeRouterKind::kHash) {
    for (int j = 0; j < K; ++j) w[j] = ids[j] >= 0 ? scale / static_cast<T>(K) : T(0);
    return;
  }
  auto normed = [&](int j) { return cfg.norm_topk && cfg.TargetKind(ids[j]) != MoeTargetKind::kNull; };
  T sum = 0;
  for (int j = 0; j < K; ++j) {
    if (ids[j] >= 0 && normed(j)) sum += probs[ids[j]];
  }
  for (int j = 0; j < K; ++j) {
    if (ids[j] < 0) {
      w[j] = T(0);
      continue;
    }
    const T p = probs[ids[j]];
    w[j] = (normed(j) && sum > 0 ? p / sum : p) * scale;
  }
}

int64_t ExpertChoiceCapacity(const MoeLayerConfig& c, int n_tokens) {
  const auto cap = static_cast<int64_t>(std::floor(n_tokens * c.ec_capacity_factor / c.n_expert));
  return std::min<int64_t>(n_tokens, std::max<int64_t>(1, cap));
}

int64_t ExpertCapacity(const MoeLayerConfig& c, int n_tokens, int seq_len) {
  if (c.capacity_factor == 0.0) return -1;
  const int scope = seq_len > 0 ? seq_len : n_tokens;
  return static_cast<int64_t>(std::ceil(c.capacity_factor * scope * c.k / c.n_expert));
}

int64_t ApplyCapacity(const MoeLayerConfig& cfg, int n_tokens, int seq_len, const int32_t* ids,
                      uint8_t* dropped) {
  const size_t n_slots = static_cast<size_t>(n_tokens) * cfg.k;
  std::fill(dropped, dropped + n_slots, uint8_t{0});
  const int64_t cap = ExpertCapacity(cfg, n_tokens, seq_len);
  if (cap < 0) return 0;
  std::vector<int64_t> count(cfg.n_expert, 0);
  int64_t n_dropped = 0;
  for (int t = 0; t < n_tokens; ++t) {
    if (seq_len > 0 && t % seq_len == 0) std::fill(count.begin(), count.end(), 0);
    for (int j = 0; j < cfg.k; ++j) {
      const size_t s = static_cast<size_t>(t) * cfg.k + j;
      if (ids[s] < 0 || ids[s] >= cfg.n_expert) continue;
      if (count[ids[s]]++ >= cap) {
        dropped[s] = 1;
        ++n_dropped;
      }
    }
  }
  return n_dropped;
}

template <typename T>
void Route(const MoeLayerConfig& cfg, const T* logits, int n_tokens, const T* bias,
           const RouteOptions& opt, T* probs, T* bprobs, T* gate_w, RoutingPlan* plan) {
  const int R = cfg.router_width(), K = cfg.k;
  const bool hash = cfg.router == MoeRouterKind::kHash;
  MOE_ASSERT(!hash || opt.token_ids != nullptr || n_tokens == 0);
  const size_t n_slots = static_cast<size_t>(n_tokens) * K;
  plan->n_tokens = n_tokens;
  plan->k = K;
  plan->n_expert = cfg.n_expert;
  plan->n_targets = R;
  plan->expert_ids.resize(n_slots);
  plan->weights.resize(n_slots);
  if (!hash) {
    for (int t = 0; t < n_tokens; ++t) {
      const size_t o = static_cast<size_t>(t) * R;
      RouterGating(cfg, logits + o, probs + o, bprobs ? bprobs + o : nullptr);
    }
  }
  if (cfg.router == MoeRouterKind::kExpertChoice) {
    ExpertChoiceSelect(cfg, n_tokens, probs, plan->expert_ids.data());
  } else {
    for (int t = 0; t < n_tokens; ++t) {
      RouterSelect(cfg, hash ? nullptr : probs + static_cast<size_t>(t) * R, bias,
                   hash ? opt.token_ids[t] : 0, &plan->expert_ids[static_cast<size_t>(t) * K]);
    }
  }
  for (int t = 0; t < n_tokens; ++t) {
    const size_t o = static_cast<size_t>(t) * K;
    RouterWeights(cfg, hash ? nullptr : probs + static_cast<size_t>(t) * R, &plan->expert_ids[o], gate_w + o);
  }
  for (size_t s = 0; s < n_slots; ++s) plan->weights[s] = static_cast<float>(gate_w[s]);
  if (cfg.capacity_factor > 0) {
    std::vector<uint8_t> dropped(n_slots);
    ApplyCapacity(cfg, n_tokens, opt.seq_len, plan->expert_ids.data(), dropped.data());
    plan->BuildGroups(dropped.data());
  } else {
    plan->BuildGroups();
  }
}

#define MOE_INSTANTIATE(T)                                                                     \
  template void RouterGating<T>(const MoeLayerConfig&, const T*, T*, T*);                      \
  template void RouterSelect<T>(const MoeLayerConfig&, const T*, const T*, int32_t, int32_t*); \
  template void ExpertChoiceSelect<T>(const MoeLayerConfig&, int, const T*, int32_t*);         \
  template void RouterWeights<T>(const MoeLayerConfig&, const T*, const int32_t*, T*);         \
  template void Route<T>(const MoeLayerConfig&, const T*, int, const T*, const RouteOptions&,  \
                         T*, T*, T*, RoutingPlan*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
