// Bookkeeping shared by the grouped and the naive MoE layer (no math lives here, so the two
// implementations stay independent where it matters).
#pragma once

#include "moe/moe_layer.h"

namespace moe::internal {

// Checks that every weight array has the size cfg needs (throws moe::Error naming the array).
template <typename T>
void CheckWeights(const MoeLayerConfig& cfg, const MoeWeights<T>& w);

// From cache->plan.expert_ids, cache->gate_w and cache->kept (already filled): the plan's float
// weights and groups, the kept order (kept_offsets, kept_slots, slot_row) and n_dropped.
template <typename T>
void FinishRouting(const MoeLayerConfig& cfg, int n_tokens, MoeCache<T>* cache);

// kExpertChoice: tokens per expert, clamp(floor(n_tokens * ec_capacity_factor / E), 1, n_tokens).
int64_t ExpertChoiceCapacity(const MoeLayerConfig& cfg, int n_tokens);

// Capacity per scope (slots per expert), or -1 for dropless.
int64_t ExpertCapacity(const MoeLayerConfig& cfg, int n_tokens, int seq_len);

}  // namespace moe::internal
