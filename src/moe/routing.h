// Routing: the router's configuration and the RoutingPlan it produces (DESIGN.md §6-7).
// The plan is plain data computed once per MoE layer and shared by the expert products, the
// backward pass, balance losses, telemetry and (later) the offload scheduler.
//
// Router stages, in this fixed order, each a switch on an enum:
//   logits -> gating function -> selection score (+ bias, selection only) -> top-k / top-p
//          -> optional renormalisation -> optional scale.
// Hash routing skips the first stages: its experts are a fixed function of the token id.
#pragma once

#include <cstdint>
#include <vector>

namespace moe {

enum class GatingFunc { kSoftmax, kSigmoid };

// How a token's k slots are chosen (the token-choice routers of MoeRouterKind, moe_layer.h;
// expert_choice looks at the whole batch and is training-only, so inference has no such mode).
enum class RouteSelect {
  kTopK,  // the k best selection scores (softmax_topk; sigmoid_bias with gating = kSigmoid)
  kTopP,  // the fewest n_t <= k best softmax probabilities whose sum reaches top_p (top_p)
  kHash,  // HashExperts(hash_seed, token id): no router logits (hash)
};

struct RouterConfig {
  GatingFunc gating = GatingFunc::kSoftmax;
  int n_expert = 0;
  int n_expert_used = 0;     // k (kTopP: k_max, the most experts a token may use)
  bool norm_topk = false;    // renormalise the weights of the used slots to sum 1 (not kHash)
  float weights_scale = 1.0f;
  RouteSelect select = RouteSelect::kTopK;
  float top_p = 0.4f;        // kTopP: cumulative probability threshold, in (0, 1]
  uint64_t hash_seed = 0;    // kHash: seed of HashExperts
};

// Slots: token t has k slots t*k + j, j = 0..k-1, best first. A slot is unused when its
// expert id is -1 (top_p tokens that reach top_p with fewer than k experts); its weight is 0.
struct RoutingPlan {
  int n_tokens = 0;
  int n_expert = 0;
  int k = 0;
  std::vector<int32_t> expert_ids;         // [n_tokens, k]  selected experts, best first; -1 unused
  std::vector<float> weights;              // [n_tokens, k]  gate weight of each selection (0 unused)
  std::vector<int32_t> tokens_per_expert;  // [n_expert]
  std::vector<int32_t> expert_offsets;     // [n_expert + 1] start of expert e in sorted order
  std::vector<int32_t> sorted_slots;       // [n_used]       slot (t*k + j) in expert order
  std::vector<int32_t> slot_position;      // [n_tokens * k] inverse: slot -> sorted position, -1 unused

  // Builds the grouping (tokens_per_expert, offsets, sorted_slots) from expert_ids. Within an
  // expert, slots keep token order (a stable counting sort), so the plan is deterministic.
  // Slots with a negative expert id are skipped: they get slot_position -1 and are not in
  // sorted_slots, which holds only the n_used = expert_offsets[n_expert] used slots (all
  // n_tokens * k when every id is >= 0).
  void BuildGroups();
};

// Hash routing (Roller et al. 2021): the k distinct experts of token id `token_id`, a fixed
// function of (seed, token_id): attempt a = 0, 1, ... draws SplitMix64(seed ^ (token_id << 32 |
// a)) mod n_expert and keeps it if new, until k are chosen. Shared by training and inference.
void HashExperts(uint64_t seed, int32_t token_id, int n_expert, int k, int32_t* ids);

// Router forward for n_tokens tokens: fills plan.expert_ids / weights and groups. The same
// semantics as the training layer's routers (MoeRouterKind, moe_layer.h):
//   kTopK  logits [n_tokens, n_expert] are overwritten with the gating probabilities; the k
//          largest of (probability + bias) are chosen (ties to the lower id), bias [n_expert]
//          being the selection-only exp_probs_b of sigmoid_bias (nullptr = none; only with
//          kSigmoid gating); weights = unbiased probabilities, renormalised if norm_topk, times
//          weights_scale.
//   kTopP  softmax gating; experts ranked by probability (ties to the lower id); token t uses
//          the fewest n_t whose cumulative probability (summed in double) is >= top_p, n_t <= k;
//          weights = probabilities (renormalised over the n_t used if norm_topk) * weights_scale;
//          slots n_t..k-1 get expert id -1 and weight 0.
//   kHash  token_ids [n_tokens] required, logits unused (may be nullptr); experts
//          HashExperts(hash_seed, token_ids[t], n_expert, k), each weight weights_scale / k.
void RouteTokens(const RouterConfig& cfg, float* logits, int n_tokens, RoutingPlan* plan,
                 const int32_t* token_ids = nullptr, const float* bias = nullptr);

}  // namespace moe
