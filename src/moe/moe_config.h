// The MoE layer's configuration: router kind, targets (FFN, null and zero-computation experts),
// shared experts, capacity and loss weights. One struct serves the training layer (moe_layer.h),
// the router (routing.h) and the inference forward, which derives it from ModelConfig
// (model/config.h: MoeConfigOf).
#pragma once

#include <cstdint>
#include <string_view>

namespace moe {

enum class MoeRouterKind {
  kSoftmaxTopK,  // softmax over R, top-k, optional renormalisation (Switch, GShard, Mixtral, Qwen)
  kSigmoidBias,  // sigmoid scores + selection-only bias, DeepSeek-V3 (aux-loss-free balancing)
  // Expert choice (Zhou et al. 2022), training only (it looks at the whole batch): p = softmax
  // over experts per token; expert e takes the c = clamp(floor(T * ec_capacity_factor / E), 1, T)
  // tokens with the largest p[.][e] (ties to the lower token index); weight = p[t][e] *
  // weights_scale; a token gets 0..E experts. Represented with k = n_expert slots per token, slot
  // j of token t being expert j when e chose t (else unused, id -1), so the token-choice backward applies
  // unchanged. No aux loss (balanced by construction), no norm_topk, no groups, no token-choice
  // capacity_factor, no per-sequence scope.
  kExpertChoice,
  // Hash layers (Roller et al. 2021): no learned router. Token id v goes to the k distinct experts
  // HashExperts(hash_seed, v, E, k) (moe/routing.h), each with weight weights_scale / k (k = 1:
  // the paper's single expert with weight 1). Needs MoeForwardOptions::token_ids. No router
  // weights, no aux / z / entropy loss (their terms are 0).
  kHash,
  // Dynamic top-p (Huang et al. 2024, "Harder tasks need more experts"): p = softmax over R; the
  // targets sorted by p (ties to the lower id); token t uses the fewest n_t whose cumulative p
  // reaches top_p, n_t <= k (= k_max). Weights are the probabilities themselves (norm_topk
  // optional). Trained with the entropy loss (entropy_loss_coef, default 1e-4 for this router).
  kTopP,
};

// "softmax_topk", "sigmoid_bias", "expert_choice", "hash", "top_p".
const char* MoeRouterName(MoeRouterKind kind);
// Parses one of the names above; false if unknown.
bool ParseMoeRouterKind(std::string_view name, MoeRouterKind* out);
// The list of names, comma separated, for error messages.
const char* MoeRouterNames();

// What a router output (target id in [0, router_width())) computes.
enum class MoeTargetKind { kFfn, kNull, kZero, kCopy, kConst };

struct MoeLayerConfig {
  int d_model = 0;
  int d_ff = 0;      // width of one routed expert
  int n_expert = 0;  // E: FFN experts
  int k = 1;         // slots per token (top_p: k_max; expert_choice: = n_expert)
  MoeRouterKind router = MoeRouterKind::kSoftmaxTopK;
  // Renormalise the weights of the active slots to sum 1 before the scale. Null-expert slots take
  // no part (AdaMoE renormalises over the true experts only; a null slot keeps its probability,
  // which multiplies a zero output).
  bool norm_topk = false;
  double weights_scale = 1.0;  // multiplies the (normalised) gate weights
  // Switch-style jitter: during training the router sees x * u, u ~ U[1 - eps, 1 + eps] per
  // element; the experts see x unchanged. 0 = off.
  double jitter_eps = 0.0;
  // kSigmoidBias: UpdateBias moves b_i by bias_update_rate * sign(mean load - load_i).
  double bias_update_rate = 1e-3;
  // Group-limited top-k (DeepSeek-V3): experts in n_group contiguous groups; a group's score is the
  // sum of its top-2 selection scores; only the topk_group best groups compete in the top-k.
  // n_group <= 1 disables it.
  int n_group = 0;
  int topk_group = 0;
  // kHash: seed of the token -> expert hash.
  uint64_t hash_seed = 0;
  // kTopP: cumulative probability threshold, in (0, 1].
  double top_p = 0.4;
  // Null experts (AdaMoE, Zeng et al. 2024): extra targets with zero output and zero cost in the
  // top-k pool, so a token can use fewer FFN experts. Softmax routers (softmax_topk, top_p) only.
  int n_null = 0;
  // Zero-computation experts (MoE++, Jin et al. 2024), softmax routers only: zero (output 0), copy
  // (output x) and constant (a1 x + a2 v_c, [a1, a2] = softmax(W_c x), W_c [2][D] and v_c [D]
  // learned) experts.
  int n_zero = 0;
  int n_copy = 0;
  int n_const = 0;
  // MoE++ heterogeneous balance loss: eta_i = 1 for FFN and null experts, zc_balance_tau for zero,
  // copy and constant experts (tau < 1 lets more tokens go to zero-computation experts).
  double zc_balance_tau = 1.0;
  // MoE++ gating residuals: logits = W_r x + W_g prev_logits, W_g [R][R] learned, prev_logits
  // the previous layer's logits (MoeForwardOptions::prev_logits; absent = zeros, the first
  // layer). Softmax routers only; the previous layer must have the same router_width().
  bool gating_residual = false;
  // Shared experts (DeepSeekMoE): n_shared always-active SwiGLU experts of width d_ff_shared; with
  // shared_gate their summed output is scaled by sigmoid(w_g . x) (qwen2moe).
  int n_shared = 0;
  int d_ff_shared = 0;
  bool shared_gate = false;
  // 0 = dropless. Otherwise each FFN expert keeps at most C = ceil(cf * tokens * k / E) slots per
  // capacity scope (the batch, or each sequence: MoeForwardOptions::seq_len); overflow slots are
  // dropped in token order and contribute nothing (the residual outside the layer carries them).
  // Null and zero-computation targets have no capacity limit (they cost nothing).
  double capacity_factor = 0.0;
  // kExpertChoice: tokens per expert c = floor(n_tokens * ec_capacity_factor / E), clipped to
  // [1, n_tokens].
  double ec_capacity_factor = 2.0;
  // Loss terms added to the layer's reported loss, with exact gradients. With N the number of
  // tokens of the loss scope (this call, or MoeForwardOptions::balance's global batch):
  //   aux = aux_loss_coef * R * sum_i eta_i f_i P_i (Switch; f_i = share of the scope's active
  //         slots that chose target i, no gradient; P_i = sum over this call's tokens of the
  //         balance probability of i, / N: softmax probabilities, or for kSigmoidBias the
  //         per-token normalised sigmoid scores as DeepSeek-V3 defines them);
  //   z   = z_loss_coef * sum_t logsumexp(logits_t)^2 / N (ST-MoE);
  //   ent = entropy_loss_coef * sum_t H(balance probabilities of t) / N (Huang et al.'s dynamic
  //         loss: low entropy pushes top_p towards fewer experts). Negative = the router's
  //         default: 1e-4 for kTopP, 0 otherwise.
  // kHash has no router, kExpertChoice no aux term.
  double aux_loss_coef = 1e-2;
  double z_loss_coef = 1e-3;
  double entropy_loss_coef = -1.0;

  // R: FFN experts + null + zero-computation targets.
  int router_width() const { return n_expert + n_null + n_zero + n_copy + n_const; }
  MoeTargetKind TargetKind(int id) const;
  double EntropyCoef() const;  // entropy_loss_coef with the router default applied
};

// Throws moe::Error naming the bad field when the configuration is unusable.
void ValidateMoeConfig(const MoeLayerConfig& cfg);

// Fine-grained experts (DeepSeekMoE): m*E experts of width F/m with m*k active (F % m == 0);
// groups, if any, keep their count (m times wider). Everything else is unchanged.
MoeLayerConfig FineGrainedConfig(const MoeLayerConfig& cfg, int m);

}  // namespace moe
