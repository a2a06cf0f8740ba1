// The router and the RoutingPlan it produces (DESIGN.md §6-7): one implementation for training
// (MoeForward, in float and double) and inference (Forward, float), so a trained model routes
// the same tokens the same way when it is served.
//
// Router stages, in this fixed order, each a function below:
//   logits -> RouterGating (softmax | sigmoid) -> selection score (+ bias, selection only)
//          -> group limit -> RouterSelect (top-k | top-p | hash), or ExpertChoiceSelect over a
//          batch -> RouterWeights (renormalise, scale) -> ApplyCapacity -> RoutingPlan groups.
// Route() runs them all for a batch. The targets a router scores (FFN experts, then null and
// zero-computation experts) are laid out in MoeLayerConfig (moe_config.h).
#pragma once

#include <cstdint>
#include <vector>

#include "moe/moe_config.h"

namespace moe {

// Plain data computed once per MoE layer, shared by the expert products, the backward pass,
// balance losses, telemetry and (later) the offload scheduler.
//
// Slots: token t has k slots t*k + j, j = 0..k-1, best first. A slot is *unused* when its target
// id is -1 (top_p tokens that reach top_p with fewer than k targets; expert choice: the experts
// that did not pick the token); its weight is 0. A used slot on an FFN expert has a row in
// expert order unless capacity dropped it. Slots on null and zero-computation targets have no
// row: they cost no expert product.
struct RoutingPlan {
  int n_tokens = 0;
  int k = 0;
  int n_expert = 0;   // E: FFN experts, the ones grouped below
  int n_targets = 0;  // R >= E: router outputs (FFN experts, then null / zero-computation)
  std::vector<int32_t> expert_ids;  // [n_tokens, k] target id of each slot, best first; -1 unused
  std::vector<float> weights;       // [n_tokens, k] gate weight of each slot (0 unused)
  // Groups over the FFN experts: the rows their products compute, token order inside an expert.
  std::vector<int32_t> tokens_per_expert;  // [n_expert]
  std::vector<int32_t> expert_offsets;     // [n_expert + 1] start of expert e in expert order
  std::vector<int32_t> sorted_slots;       // [n_rows] slot (t*k + j) of each row
  std::vector<int32_t> slot_position;      // [n_tokens * k] slot -> row, -1 when it has none
  int64_t n_dropped = 0;                   // used FFN slots that capacity dropped

  int n_rows() const { return expert_offsets.empty() ? 0 : expert_offsets[n_expert]; }
  bool used(size_t slot) const { return expert_ids[slot] >= 0; }
  // Builds the groups from expert_ids (a stable counting sort, so the plan is deterministic).
  // dropped [n_tokens * k] (optional): 1 marks a used FFN slot that capacity dropped.
  void BuildGroups(const uint8_t* dropped = nullptr);
};

// Hash routing (Roller et al. 2021): the k distinct experts of token id `token_id`, a fixed
// function of (seed, token_id): attempt a = 0, 1, ... draws SplitMix64(seed ^ (token_id << 32 |
// a)) mod n_expert and keeps it if new, until k are chosen.
void HashExperts(uint64_t seed, int32_t token_id, int n_expert, int k, int32_t* ids);

// ---- the router, stage by stage (T = float or double) ----------------------------------------

// Gating of one token: probs [R] = softmax(logits) (every router but sigmoid_bias) or
// sigmoid(logits) (sigmoid_bias). float softmax is the kernel that matches ggml's (subtract the
// max, exp, sum in double, scale by 1/sum), so inference reproduces llama.cpp's probabilities.
// bprobs [R] (nullptr = not needed): the balance probabilities of the losses: the softmax
// itself, or the sigmoid scores normalised to sum 1 (DeepSeek-V3). Not for hash (no logits).
template <typename T>
void RouterGating(const MoeLayerConfig& cfg, const T* logits, T* probs, T* bprobs);

// Token-choice selection of one token: ids [k], best first (ties to the lower id).
//   softmax_topk, sigmoid_bias: the k largest selection scores, score = probs + bias (bias [E],
//     sigmoid_bias only, nullptr = none); with n_group > 1 only the topk_group groups whose
//     sum of their two best scores is largest compete (DeepSeek-V3);
//   top_p: targets ranked by probability; the fewest n_t whose cumulative probability (summed
//     in double) reaches top_p, n_t <= k; slots n_t..k-1 get -1;
//   hash: HashExperts(hash_seed, token_id, E, k) (probs unused).
// Not for expert_choice (ExpertChoiceSelect).
template <typename T>
void RouterSelect(const MoeLayerConfig& cfg, const T* probs, const T* bias, int32_t token_id,
                  int32_t* ids);

// Expert choice (training only): expert e takes the c = ExpertChoiceCapacity tokens with the
// largest probs[.][e] (ties to the lower token index). ids [n_tokens][E]: slot j of token t is j
// when expert j took t, else -1.
template <typename T>
void ExpertChoiceSelect(const MoeLayerConfig& cfg, int n_tokens, const T* probs, int32_t* ids);

// Gate weights of one token's slots from its probabilities: 0 on unused slots; hash:
// weights_scale / k; otherwise the target's probability, divided by the probability mass of the
// used non-null slots when norm_topk (a null pick keeps its probability, as AdaMoE), times
// weights_scale.
template <typename T>
void RouterWeights(const MoeLayerConfig& cfg, const T* probs, const int32_t* ids, T* weights);

// Token-choice capacity: each FFN expert keeps at most ExpertCapacity slots per scope (the
// batch, or each sequence of seq_len tokens), in token order and slot order within a token.
// dropped [n_tokens * k] gets 1 for the used FFN slots over capacity, 0 elsewhere. Returns the
// number dropped (0 when dropless).
int64_t ApplyCapacity(const MoeLayerConfig& cfg, int n_tokens, int seq_len, const int32_t* ids,
                      uint8_t* dropped);

// Capacity per scope (slots per FFN expert, ceil(cf * tokens * k / E)), or -1 for dropless.
int64_t ExpertCapacity(const MoeLayerConfig& cfg, int n_tokens, int seq_len);
// expert_choice: tokens per expert, clamp(floor(n_tokens * ec_capacity_factor / E), 1, n_tokens).
int64_t ExpertChoiceCapacity(const MoeLayerConfig& cfg, int n_tokens);

// How near one token's top-k choice came to a tie (conformance: a choice that float rounding can
// decide either way): the smallest gap between the selection score (probs, + bias for
// sigmoid_bias, as RouterSelect ranks them) of a chosen target (ids [k], -1 unused) and of an unchosen one.
// Infinity when nothing or everything was chosen. For the ranking routers (softmax_topk,
// sigmoid_bias; group-limited top-k counts every unchosen target, so it can only say nearer).
float RoutingMargin(const MoeLayerConfig& cfg, const float* probs, const float* bias, const int32_t* ids);

// ---- the whole router for a batch -------------------------------------------------------------

struct RouteOptions {
  const int32_t* token_ids = nullptr;  // [n_tokens] token ids (hash routing)
  int seq_len = 0;                     // capacity scope: 0 = the batch
};

// Routes n_tokens tokens: logits [n_tokens][R] (unused for hash: may be nullptr), bias [E] the
// selection-only bias of sigmoid_bias (nullptr = none). Writes probs and bprobs [n_tokens][R]
// (unused for hash; bprobs may be nullptr), gate_w [n_tokens][k] in T, and the plan (ids,
// float weights, groups with capacity applied).
template <typename T>
void Route(const MoeLayerConfig& cfg, const T* logits, int n_tokens, const T* bias,
           const RouteOptions& opt, T* probs, T* bprobs, T* gate_w, RoutingPlan* plan);

}  // namespace moe
