// The trainable MoE layer (issue 3): routers, null and zero-computation experts, capacity, SwiGLU
// experts, shared experts, balance losses (per call or over a global batch), exact backward and
// telemetry, for T in {float, double}.
//
// Router outputs ("targets"): the router scores R = router_width() targets, laid out as
//   [0, E)                      FFN experts (SwiGLU, the only ones that cost FLOPs)
//   [E, E+n_null)               null experts (AdaMoE): output 0
//   then n_zero, n_copy, n_const zero-computation experts (MoE++): 0, x, a1 x + a2 v
// Every token has k slots; slot j of token t is active when the router uses it (all slots for
// top-k routers; the first n_t for top_p; the experts' picks for expert_choice). An active slot
// on an FFN expert is kept unless capacity drops it. Gate weight 0 on inactive slots.
//
// Layout: row-major, x [n_tokens][d_model]; a weight that maps D -> F is stored [F][D] (GGUF's
// ne0 = D fastest), so h = W x is a dot product of x with each row of W.
//
// Two implementations with the same Cache contract:
//   MoeForward / MoeBackward            grouped path: tokens permuted into expert order through the
//                                       RoutingPlan, one GEMM per expert block and projection,
//                                       experts spread over a ThreadPool;
//   MoeForwardNaive / MoeBackwardNaive  a per-token loop with plain loops (no BLAS), the reference.
// A token's output is combined in slot order (best target first, then the shared experts), and
// every GEMM's per-row arithmetic is independent of the other rows (float: kernels/gemm.h; double:
// BLAS on blocks of exactly kMoeRowBlock rows), so under dropless token-choice routing a token's
// output does not depend on which other tokens share the batch (docs/batch-invariance.md).
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "moe/routing.h"

namespace moe {

class ThreadPool;

enum class MoeRouterKind {
  kSoftmaxTopK,  // softmax over R, top-k, optional renormalisation (Switch, GShard, Mixtral, Qwen)
  kSigmoidBias,  // sigmoid scores + selection-only bias, DeepSeek-V3 (aux-loss-free balancing)
  // Expert choice (Zhou et al. 2022), training only (it looks at the whole batch): p = softmax
  // over experts per token; expert e takes the c = clamp(floor(T * ec_capacity_factor / E), 1, T)
  // tokens with the largest p[.][e] (ties to the lower token index); weight = p[t][e] *
  // weights_scale; a token gets 0..E experts. Represented with k = n_expert slots per token, slot
  // j of token t being expert j, active when e chose t, so the token-choice backward applies
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

// GGUF names in comments; every array is row-major with the shape given.
template <typename T>
struct MoeWeights {
  std::vector<T> router;          // ffn_gate_inp   [R][D]  (kHash: empty, no learned router)
  std::vector<T> gate_exps;       // ffn_gate_exps  [E][F][D]
  std::vector<T> up_exps;         // ffn_up_exps    [E][F][D]
  std::vector<T> down_exps;       // ffn_down_exps  [E][D][F]
  std::vector<T> exp_probs_b;     // exp_probs_b    [E]  selection bias (kSigmoidBias), not trained
                                  //                     by gradient: see UpdateBias
  std::vector<T> gate_shexp;      // ffn_gate_shexp [S][Fs][D]
  std::vector<T> up_shexp;        // ffn_up_shexp   [S][Fs][D]
  std::vector<T> down_shexp;      // ffn_down_shexp [S][D][Fs]
  std::vector<T> gate_inp_shexp;  // ffn_gate_inp_shexp [D]  (shared_gate only)
  std::vector<T> const_wc;        // [n_const][2][D] constant experts' mixing router W_c
  std::vector<T> const_v;         // [n_const][D]    constant experts' vectors v
  std::vector<T> gate_res;        // [R][R] gating residual W_g (gating_residual only)

  // Sizes every array for cfg and fills it with zeros.
  void Resize(const MoeLayerConfig& cfg);
};

// Upcycles cfg/w into FineGrainedConfig(cfg, m): expert e becomes experts e*m .. e*m+m-1, child c
// holding rows [c*F/m, (c+1)*F/m) of W_gate / W_up and the same columns of W_down; each child gets
// its parent's router row and weights_scale is multiplied by m. The softmax then gives each child
// p/m and the top-(m*k) picks the children of the parents' top-k, so the split layer computes the
// same function (up to rounding) while it can be trained further as a fine-grained one.
// kSoftmaxTopK without null / zero-computation experts only.
template <typename T>
void SplitExperts(const MoeLayerConfig& cfg, const MoeWeights<T>& w, int m,
                  MoeLayerConfig* cfg_out, MoeWeights<T>* w_out);

// Same arrays and shapes as MoeWeights minus the bias (the selection is not differentiable).
template <typename T>
struct MoeGrads {
  std::vector<T> router, gate_exps, up_exps, down_exps;
  std::vector<T> gate_shexp, up_shexp, down_shexp, gate_inp_shexp;
  std::vector<T> const_wc, const_v, gate_res;
  // dL/d(previous layer's logits) [T][R], WRITTEN (not added) by the backward when
  // gating_residual is set; pass it as the previous layer's `dlogits` in its backward.
  std::vector<T> prev_logits;
  void Resize(const MoeLayerConfig& cfg);  // zeros (prev_logits: empty, sized by the backward)
  void Zero();
};

// Loss scope over a global batch (Qiu et al. 2025, "Demons in the detail"): the aux loss uses the
// selection frequencies f_i of the whole batch (all micro-batches of a gradient-accumulation step)
// and every term is normalised by the global token count, so the losses and gradients of the
// micro-batches sum to those of the global batch. Fill it with AddToBalanceScope from a pass over
// the micro-batches (a forward-only pass gives the exact counts; the running counts of the
// micro-batches seen so far are the cheap approximation), then pass it in MoeForwardOptions.
struct MoeBalanceScope {
  std::vector<double> counts;  // [R] active slots per target over the global batch
  double n_slots = 0;          // active slots over the global batch (sum of counts)
  double n_tokens = 0;         // tokens of the global batch
};

// Everything the backward pass, the losses and telemetry need from one forward call.
template <typename T>
struct MoeCache {
  int n_tokens = 0;
  // Selection: expert_ids [T][k] best first (target ids in [0, R), valid for every slot, active or
  // not), grouping over all R targets and all slots. plan.weights holds the gate weights rounded
  // to float, for the inference-side consumers.
  RoutingPlan plan;
  std::vector<T> gate_w;             // [T][k] gate weight of each slot (0 when inactive)
  std::vector<uint8_t> active;       // [T][k] 1 = the router uses the slot
  std::vector<uint8_t> kept;         // [T][k] 1 = active FFN slot processed (not dropped)
  std::vector<int32_t> kept_offsets; // [E+1] start of FFN expert e in kept (expert) order
  std::vector<int32_t> kept_slots;   // [n_kept] slot t*k+j in expert order, token order inside
  std::vector<int32_t> slot_row;     // [T][k] row of the slot in kept order, -1 when not kept
  int64_t n_dropped = 0;             // active FFN slots dropped by capacity

  std::vector<T> x;            // [T][D] input copy
  std::vector<int32_t> token_ids;  // [T] (kHash)
  std::vector<T> noise;        // [T][D] jitter multipliers (empty when no jitter was applied)
  std::vector<T> prev_logits;  // [T][R] gating residual input (empty: none)
  std::vector<T> logits;       // [T][R] router logits (kHash: empty)
  std::vector<T> probs;        // [T][R] gating output: softmax, or sigmoid scores (unbiased)
  std::vector<T> bprobs;       // [T][R] balance probabilities (softmax; normalised sigmoid)
  std::vector<T> const_a;      // [T][n_const][2] constant experts' mixing weights [a1, a2]

  // Grouped path only (the naive backward recomputes): per kept row, in kept order.
  std::vector<T> xe;          // [n_kept][D] the kept rows' inputs, gathered
  std::vector<T> h_gate;      // [n_kept][F] W_gate x
  std::vector<T> h_up;        // [n_kept][F] W_up x
  std::vector<T> act;         // [n_kept][F] silu(h_gate) * h_up (saved: the backward skips a pass)
  std::vector<T> expert_out;  // [n_kept][D] expert output before the gate weight
  std::vector<T> sh_gate;     // [S][T][Fs]
  std::vector<T> sh_up;       // [S][T][Fs]
  std::vector<T> sh_out;      // [T][D] sum of shared experts before the shared gate
  std::vector<T> sh_g;        // [T]    sigmoid(w_g . x) (shared_gate only)

  // The loss scope the losses were computed with (the backward differentiates the same terms).
  std::vector<double> loss_f;  // [R] f_i
  double loss_tokens = 0;      // N

  double aux_loss = 0.0;
  double z_loss = 0.0;
  double entropy_loss = 0.0;
  double loss() const { return aux_loss + z_loss + entropy_loss; }
};

// Adds the active slots and tokens of one forward to a global loss scope (sizes it on first use).
template <typename T>
void AddToBalanceScope(const MoeLayerConfig& cfg, const MoeCache<T>& cache, MoeBalanceScope* scope);

struct MoeForwardOptions {
  bool training = false;     // enables jitter
  uint64_t jitter_seed = 0;  // seed of the jitter noise (training only)
  int seq_len = 0;           // capacity scope: 0 = the whole batch, else sequences of seq_len tokens
  ThreadPool* pool = nullptr;
  const int32_t* token_ids = nullptr;  // [n_tokens] token ids (required by kHash)
  // gating_residual: the previous layer's logits, const T* [n_tokens][R]; nullptr = zeros.
  const void* prev_logits = nullptr;
  // Global-batch loss scope; nullptr = this call's tokens are the scope.
  const MoeBalanceScope* balance = nullptr;
  // Reuse the slot assignment (ids, active slots and drops) and the jitter noise of a previous
  // forward on the same number of tokens: gate weights, probabilities and losses are recomputed
  // from the current weights and input. Gradient checks use it to differentiate at a fixed
  // assignment.
  const void* fixed_routing = nullptr;  // const MoeCache<T>*
};

// y [n_tokens][D] = MoE(x [n_tokens][D]); the cache must outlive the matching backward.
template <typename T>
void MoeForward(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const T* x, int n_tokens,
                T* y, MoeCache<T>* cache, const MoeForwardOptions& opt = {});

// Backward of L = <dy, y> + <dlogits, logits> + cache.loss(): writes dx [n_tokens][D] and ADDS
// every weight gradient into grads (zero it first for one step); with gating_residual it also
// writes grads->prev_logits. dlogits [n_tokens][R] (optional) is the gradient that reaches this
// layer's logits from the next layer's gating residual. The routing decision is held fixed.
template <typename T>
void MoeBackward(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const MoeCache<T>& cache,
                 const T* dy, T* dx, MoeGrads<T>* grads, ThreadPool* pool = nullptr,
                 const T* dlogits = nullptr);

// The reference: same semantics, a per-token loop with plain loops. opt.pool is ignored.
template <typename T>
void MoeForwardNaive(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const T* x, int n_tokens,
                     T* y, MoeCache<T>* cache, const MoeForwardOptions& opt = {});
template <typename T>
void MoeBackwardNaive(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const MoeCache<T>& cache,
                      const T* dy, T* dx, MoeGrads<T>* grads, const T* dlogits = nullptr);

// Dispatch helpers of the grouped path, exposed for tests.
// out [n_tokens*k][d]: row p is x's row of token sorted_slots[p] / k (expert order).
template <typename T>
void PermuteTokens(const RoutingPlan& plan, const T* x, int d, T* out);
// out [n_tokens*k][d] in slot order (t*k + j) from rows in expert order.
template <typename T>
void UnpermuteSlots(const RoutingPlan& plan, const T* sorted, int d, T* out);

// Rows per BLAS call of the grouped path in double (see the batch-invariance note above).
inline constexpr int kMoeRowBlock = 256;

// Statistics of one forward, per layer and target: a plain struct for the trainer, JSON for tools.
struct MoeTelemetry {
  int layer = -1;  // set by the caller (the trainer knows the layer index); -1 = unknown
  std::string router;  // MoeRouterName
  int n_tokens = 0;
  int n_expert = 0;  // E (FFN experts)
  int n_targets = 0;  // R
  int k = 0;
  std::vector<int64_t> routed_per_expert;  // [R] active slots per target (before capacity)
  std::vector<int64_t> kept_per_expert;    // [R] slots processed (after capacity; FFN only)
  std::vector<double> share;               // [R] routed / all active slots
  double max_vio = 0.0;        // over FFN experts: (max routed load - mean load) / mean load
  double drop_rate = 0.0;      // dropped FFN slots / active FFN slots
  double router_entropy = 0.0; // mean over tokens of the entropy (nats) of the balance probabilities
  double mean_experts_per_token = 0.0;  // kept FFN slots / n_tokens
  double mean_zc_per_token = 0.0;       // active null / zero-computation slots / n_tokens
  double aux_loss = 0.0;
  double z_loss = 0.0;
  double entropy_loss = 0.0;
};

// One JSON object with every field above (arrays as JSON arrays).
std::string MoeTelemetryToJson(const MoeTelemetry& telemetry);

template <typename T>
MoeTelemetry ComputeTelemetry(const MoeLayerConfig& cfg, const MoeCache<T>& cache);

// DeepSeek's auxiliary-loss-free balancing step: b_i += u * sign(mean load - load_i), loads from
// telemetry.routed_per_expert, u = cfg.bias_update_rate. Call once per optimizer step.
template <typename T>
void UpdateBias(const MoeLayerConfig& cfg, const MoeTelemetry& telemetry, MoeWeights<T>* w);

}  // namespace moe
