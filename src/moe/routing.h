// Routing: the router's configuration and the RoutingPlan it produces (DESIGN.md §6-7).
// The plan is plain data computed once per MoE layer and shared by the expert products, the
// backward pass, balance losses, telemetry and (later) the offload scheduler.
//
// Router stages, in this fixed order, each a switch on an enum:
//   logits -> gating function -> selection score (+ bias, selection only) -> top-k
//          -> optional renormalisation -> optional scale.
#pragma once

#include <cstdint>
#include <vector>

namespace moe {

enum class GatingFunc { kSoftmax, kSigmoid };

struct RouterConfig {
  GatingFunc gating = GatingFunc::kSoftmax;
  int n_expert = 0;
  int n_expert_used = 0;     // k
  bool norm_topk = false;    // renormalise the k selected weights to sum 1
  float weights_scale = 1.0f;
};

struct RoutingPlan {
  int n_tokens = 0;
  int n_expert = 0;
  int k = 0;
  std::vector<int32_t> expert_ids;         // [n_tokens, k]  selected experts, best first
  std::vector<float> weights;              // [n_tokens, k]  gate weight of each selection
  std::vector<int32_t> tokens_per_expert;  // [n_expert]
  std::vector<int32_t> expert_offsets;     // [n_expert + 1] start of expert e in sorted order
  std::vector<int32_t> sorted_slots;       // [n_tokens * k] slot (t*k + j) in expert order
  std::vector<int32_t> slot_position;      // [n_tokens * k] inverse: slot -> sorted position

  // Builds the grouping (tokens_per_expert, offsets, sorted_slots) from expert_ids. Within an
  // expert, slots keep token order (a stable counting sort), so the plan is deterministic.
  void BuildGroups();
};

// Hash routing (Roller et al. 2021): the k distinct experts of token id `token_id`, a fixed
// function of (seed, token_id): attempt a = 0, 1, ... draws SplitMix64(seed ^ (token_id << 32 |
// a)) mod n_expert and keeps it if new, until k are chosen. Shared by training and inference.
void HashExperts(uint64_t seed, int32_t token_id, int n_expert, int k, int32_t* ids);

// Router forward for n_tokens rows of logits [n_tokens, n_expert] (overwritten with the gating
// probabilities): fills plan.expert_ids / weights and groups.
void RouteTokens(const RouterConfig& cfg, float* logits, int n_tokens, RoutingPlan* plan);

}  // namespace moe
