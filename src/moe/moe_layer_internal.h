// Bookkeeping shared by the grouped and the naive MoE layer (no layer math lives here, so the two
// implementations stay independent where it matters).
#pragma once

#include "moe/moe_layer.h"

namespace moe::internal {

// The number of values of every MoeWeights array for cfg (MoeGrads: the same minus exp_probs_b).
struct MoeArraySizes {
  size_t router, gate_exps, up_exps, down_exps, exp_probs_b;
  size_t gate_shexp, up_shexp, down_shexp, gate_inp_shexp, const_wc, const_v, gate_res;
};
MoeArraySizes ArraySizes(const MoeLayerConfig& cfg);

// Checks that every weight (gradient) array has the size cfg needs; throws moe::Error naming the
// array. Nothing is allocated: both run on every forward / backward.
template <typename T>
void CheckWeights(const MoeLayerConfig& cfg, const MoeWeights<T>& w);
template <typename T>
void CheckGrads(const MoeLayerConfig& cfg, const MoeGrads<T>& g);

// Checks the per-call inputs against cfg (token ids for kHash, seq_len, the fixed routing's size,
// the balance scope's width); throws moe::Error naming the problem.
template <typename T>
void CheckForwardOptions(const MoeLayerConfig& cfg, int n_tokens, const MoeForwardOptions& opt);

// Fills cache->loss_f and cache->loss_tokens: from the global scope when given, else from the
// cache's own used slots (f_i = active slots on i / all active slots; N = n_tokens).
template <typename T>
void SetLossScope(const MoeLayerConfig& cfg, const MoeBalanceScope* scope, MoeCache<T>* cache);

// eta_i of the aux loss: 1 for FFN and null experts, zc_balance_tau for zero-computation ones.
double BalanceEta(const MoeLayerConfig& cfg, int target);

// Coefficient of the aux loss: 0 for kExpertChoice and kHash.
double AuxCoef(const MoeLayerConfig& cfg);

}  // namespace moe::internal
