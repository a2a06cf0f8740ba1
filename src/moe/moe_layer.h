// The trainable MoE layer (issue 3): routers, null and zero-computation experts, capacity, SwiGLU
// experts, shared experts, balance losses (per call or over a global batch), exact backward and
// telemetry, for T in {float, double}.
//
// Router outputs ("targets"): the router scores R = router_width() targets, laid out as
//   [0, E)                      FFN experts (SwiGLU, the only ones that cost FLOPs)
//   [E, E+n_null)               null experts (AdaMoE): output 0
//   then n_zero, n_copy, n_const zero-computation experts (MoE++): 0, x, a1 x + a2 v
// Every token has k slots; slot j of token t is active (used) when the router uses it (all slots
// for top-k routers; the first n_t for top_p; the experts' picks for expert_choice). An active
// slot on an FFN expert is kept unless capacity drops it. Gate weight 0 on inactive slots. The
// router itself is moe/routing.h, shared with the inference forward; its RoutingPlan (target id
// -1 for an unused slot, rows for the kept FFN slots only) is the cache's record of the decision.
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

#include "moe/moe_config.h"
#include "moe/routing.h"

namespace moe {

class ThreadPool;

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
  // The router's decision (routing.h): plan.expert_ids [T][k] target ids best first (-1 = unused
  // slot), plan.weights the gate weights in float, and the rows of the kept FFN slots in expert
  // order (plan.expert_offsets, sorted_slots, slot_position; plan.n_dropped).
  RoutingPlan plan;
  std::vector<T> gate_w;       // [T][k] gate weight of each slot (0 when unused)

  std::vector<T> x;            // [T][D] input copy
  std::vector<int32_t> token_ids;  // [T] (kHash)
  std::vector<T> noise;        // [T][D] jitter multipliers (empty when no jitter was applied)
  std::vector<T> prev_logits;  // [T][R] gating residual input (empty: none)
  std::vector<T> logits;       // [T][R] router logits (kHash: empty)
  std::vector<T> probs;        // [T][R] gating output: softmax, or sigmoid scores (unbiased)
  std::vector<T> bprobs;       // [T][R] balance probabilities (softmax; normalised sigmoid)
  std::vector<T> const_a;      // [T][n_const][2] constant experts' mixing weights [a1, a2]

  // Grouped path only (the naive backward recomputes): per row of the plan, in expert order.
  std::vector<T> xe;          // [n_rows][D] the rows' inputs, gathered
  std::vector<T> h_gate;      // [n_rows][F] W_gate x
  std::vector<T> h_up;        // [n_rows][F] W_up x
  std::vector<T> act;         // [n_rows][F] silu(h_gate) * h_up (saved: the backward skips a pass)
  std::vector<T> expert_out;  // [n_rows][D] expert output before the gate weight
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

// Dispatch helpers (the plan's permutation), exposed for tests.
// out [n_rows][d]: row p is x's row of token sorted_slots[p] / k (expert order).
template <typename T>
void PermuteTokens(const RoutingPlan& plan, const T* x, int d, T* out);
// out [n_tokens*k][d] in slot order (t*k + j) from rows in expert order; slots without a row
// (unused, non-FFN target, dropped) get zeros.
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
