// The trainable MoE layer (issue 3 foundation): router, capacity, SwiGLU experts, shared experts,
// balance losses, exact backward and telemetry, for T in {float, double}.
//
// TODO (later work, not done here):
//   - routers kHash, kTopP (+ its entropy regulariser), null experts (AdaMoE),
//     zero-computation experts and gating residuals (MoE++), fine-grained expert helpers;
//   - balance-loss scope across gradient-accumulation steps (global batch); today: the call's batch;
//   - ToJson of MoeTelemetry (the lead wires nlohmann_json), selection by name in ModelConfig;
//   - PyTorch goldens, `moe bench-layer`, bench/ comparison; docs/ on which modes are safe to serve;
//   - batch invariance of the expert GEMMs rests on BLAS computing a row identically at any position
//     of a fixed-shape block (true for OpenBLAS here, natively and under valgrind; tested); a BLAS
//     without that property needs a per-row kernel. The router uses plain loops for that reason.
//
// Layout: row-major, x [n_tokens][d_model]; a weight that maps D -> F is stored [F][D] (GGUF's
// ne0 = D fastest), so h = W x is a dot product of x with each row of W.
//
// Two implementations with the same Cache contract:
//   MoeForward / MoeBackward            grouped path: tokens permuted into expert order through the
//                                       RoutingPlan, one BLAS GEMM per expert and projection,
//                                       experts spread over a ThreadPool;
//   MoeForwardNaive / MoeBackwardNaive  a per-token loop with plain loops (no BLAS), the reference.
// A token's output is combined in selection order (best expert first, then the shared experts), and
// every GEMM runs on blocks of exactly kMoeRowBlock rows (the last block zero-padded), so under
// dropless routing a token's output does not depend on which other tokens share the batch.
#pragma once

#include <cstdint>
#include <vector>

#include "moe/routing.h"

namespace moe {

class ThreadPool;

enum class MoeRouterKind {
  kSoftmaxTopK,  // softmax over E, top-k, optional renormalisation (Switch, GShard, Mixtral, Qwen)
  kSigmoidBias,  // sigmoid scores + selection-only bias, DeepSeek-V3 (aux-loss-free balancing)
  // Expert choice (Zhou et al. 2022), training only (it looks at the whole batch): p = softmax
  // over experts per token; expert e takes the c = clamp(floor(T * ec_capacity_factor / E), 1, T)
  // tokens with the largest p[.][e] (ties to the lower token index); weight = p[t][e] *
  // weights_scale; a token gets 0..E experts. Represented with k = n_expert slots per token, slot
  // j of token t being expert j, kept when e chose t (the cache's `kept`), so the token-choice
  // backward applies unchanged. No aux loss (its loss term is 0), no norm_topk, no groups, no
  // token-choice capacity_factor, no per-sequence scope.
  kExpertChoice,
  // Later: kHash, kTopP.
};

struct MoeLayerConfig {
  int d_model = 0;
  int d_ff = 0;      // width of one routed expert
  int n_expert = 0;  // E
  int k = 1;         // experts per token
  MoeRouterKind router = MoeRouterKind::kSoftmaxTopK;
  bool norm_topk = false;      // renormalise the k selected weights to sum 1
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
  // Shared experts (DeepSeekMoE): n_shared always-active SwiGLU experts of width d_ff_shared; with
  // shared_gate their summed output is scaled by sigmoid(w_g . x) (qwen2moe).
  int n_shared = 0;
  int d_ff_shared = 0;
  bool shared_gate = false;
  // 0 = dropless. Otherwise each expert keeps at most C = ceil(cf * tokens * k / E) slots per
  // capacity scope (the batch, or each sequence: MoeForwardOptions::seq_len); overflow slots are
  // dropped in token order and contribute nothing (the residual outside the layer carries them).
  double capacity_factor = 0.0;
  // kExpertChoice: tokens per expert c = floor(n_tokens * ec_capacity_factor / E), clipped to
  // [1, n_tokens].
  double ec_capacity_factor = 2.0;
  // Loss terms added to the layer's reported loss, with exact gradients:
  //   aux = aux_loss_coef * E * sum_i f_i P_i (Switch; f_i = share of routed slots, no gradient;
  //         P_i = mean over tokens of the router probability of i: softmax probabilities, or for
  //         kSigmoidBias the per-token normalised sigmoid scores as DeepSeek-V3 defines them);
  //   z   = z_loss_coef * mean_t logsumexp(logits_t)^2 (ST-MoE).
  double aux_loss_coef = 1e-2;
  double z_loss_coef = 1e-3;
};

// Throws moe::Error naming the bad field when the configuration is unusable.
void ValidateMoeConfig(const MoeLayerConfig& cfg);

// GGUF names in comments; every array is row-major with the shape given.
template <typename T>
struct MoeWeights {
  std::vector<T> router;          // ffn_gate_inp   [E][D]
  std::vector<T> gate_exps;       // ffn_gate_exps  [E][F][D]
  std::vector<T> up_exps;         // ffn_up_exps    [E][F][D]
  std::vector<T> down_exps;       // ffn_down_exps  [E][D][F]
  std::vector<T> exp_probs_b;     // exp_probs_b    [E]  selection bias (kSigmoidBias), not trained
                                  //                     by gradient: see UpdateBias
  std::vector<T> gate_shexp;      // ffn_gate_shexp [S][Fs][D]
  std::vector<T> up_shexp;        // ffn_up_shexp   [S][Fs][D]
  std::vector<T> down_shexp;      // ffn_down_shexp [S][D][Fs]
  std::vector<T> gate_inp_shexp;  // ffn_gate_inp_shexp [D]  (shared_gate only)

  // Sizes every array for cfg and fills it with zeros.
  void Resize(const MoeLayerConfig& cfg);
};

// Same arrays and shapes as MoeWeights minus the bias (the selection is not differentiable).
template <typename T>
struct MoeGrads {
  std::vector<T> router, gate_exps, up_exps, down_exps;
  std::vector<T> gate_shexp, up_shexp, down_shexp, gate_inp_shexp;
  void Resize(const MoeLayerConfig& cfg);  // zeros
  void Zero();
};

// Everything the backward pass, the losses and telemetry need from one forward call.
template <typename T>
struct MoeCache {
  int n_tokens = 0;
  // Selection: expert_ids [T][k] best first, grouping over all selected slots (dropped included).
  // plan.weights holds the gate weights rounded to float, for the inference-side consumers.
  RoutingPlan plan;
  std::vector<T> gate_w;             // [T][k] gate weight of each slot (full precision)
  std::vector<uint8_t> kept;         // [T][k] 1 = slot processed, 0 = dropped by capacity
  std::vector<int32_t> kept_offsets; // [E+1] start of expert e in kept (expert) order
  std::vector<int32_t> kept_slots;   // [n_kept] slot t*k+j in expert order, token order inside
  std::vector<int32_t> slot_row;     // [T][k] row of the slot in kept order, -1 when dropped
  int64_t n_dropped = 0;

  std::vector<T> x;       // [T][D] input copy
  std::vector<T> noise;   // [T][D] jitter multipliers (empty when no jitter was applied)
  std::vector<T> logits;  // [T][E] router logits
  std::vector<T> probs;   // [T][E] gating output: softmax, or sigmoid scores (unbiased)
  std::vector<T> bprobs;  // [T][E] balance probabilities (softmax; normalised sigmoid scores)

  // Grouped path only (the naive backward recomputes): per kept row, in kept order.
  std::vector<T> h_gate;      // [n_kept][F] W_gate x
  std::vector<T> h_up;        // [n_kept][F] W_up x
  std::vector<T> expert_out;  // [n_kept][D] expert output before the gate weight
  std::vector<T> sh_gate;     // [S][T][Fs]
  std::vector<T> sh_up;       // [S][T][Fs]
  std::vector<T> sh_out;      // [T][D] sum of shared experts before the shared gate
  std::vector<T> sh_g;        // [T]    sigmoid(w_g . x) (shared_gate only)

  double aux_loss = 0.0;
  double z_loss = 0.0;
  double loss() const { return aux_loss + z_loss; }
};

struct MoeForwardOptions {
  bool training = false;     // enables jitter
  uint64_t jitter_seed = 0;  // seed of the jitter noise (training only)
  int seq_len = 0;           // capacity scope: 0 = the whole batch, else sequences of seq_len tokens
  ThreadPool* pool = nullptr;
  // Reuse the expert assignment (ids and drops) and the jitter noise of a previous forward on the
  // same number of tokens: gate weights, probabilities and losses are recomputed from the current
  // weights and input. Gradient checks use it to differentiate at a fixed assignment.
  const void* fixed_routing = nullptr;  // const MoeCache<T>*
};

// y [n_tokens][D] = MoE(x [n_tokens][D]); the cache must outlive the matching backward.
template <typename T>
void MoeForward(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const T* x, int n_tokens,
                T* y, MoeCache<T>* cache, const MoeForwardOptions& opt = {});

// Backward of L = <dy, y> + cache.loss(): writes dx [n_tokens][D] and ADDS every weight gradient
// into grads (zero it first for one step). The routing decision is held fixed.
template <typename T>
void MoeBackward(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const MoeCache<T>& cache,
                 const T* dy, T* dx, MoeGrads<T>* grads, ThreadPool* pool = nullptr);

// The reference: same semantics, a per-token loop with plain loops. opt.pool is ignored.
template <typename T>
void MoeForwardNaive(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const T* x, int n_tokens,
                     T* y, MoeCache<T>* cache, const MoeForwardOptions& opt = {});
template <typename T>
void MoeBackwardNaive(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const MoeCache<T>& cache,
                      const T* dy, T* dx, MoeGrads<T>* grads);

// Dispatch helpers of the grouped path, exposed for tests.
// out [n_tokens*k][d]: row p is x's row of token sorted_slots[p] / k (expert order).
template <typename T>
void PermuteTokens(const RoutingPlan& plan, const T* x, int d, T* out);
// out [n_tokens*k][d] in slot order (t*k + j) from rows in expert order.
template <typename T>
void UnpermuteSlots(const RoutingPlan& plan, const T* sorted, int d, T* out);

// Rows per GEMM call of the grouped path (see the batch-invariance note above).
inline constexpr int kMoeRowBlock = 256;

// Plain-struct statistics of one forward (the trainer reads it; JSON comes later).
struct MoeTelemetry {
  int n_tokens = 0;
  int n_expert = 0;
  int k = 0;
  std::vector<int64_t> routed_per_expert;  // [E] slots chosen (before capacity)
  std::vector<int64_t> kept_per_expert;    // [E] slots processed (after capacity)
  std::vector<double> share;               // [E] routed / (n_tokens * k)
  double max_vio = 0.0;        // (max routed load - mean load) / mean load
  double drop_rate = 0.0;      // dropped slots / (n_tokens * k)
  double router_entropy = 0.0; // mean over tokens of the entropy (nats) of the balance probabilities
  double mean_experts_per_token = 0.0;  // kept slots / n_tokens
  double aux_loss = 0.0;
  double z_loss = 0.0;
};

template <typename T>
MoeTelemetry ComputeTelemetry(const MoeLayerConfig& cfg, const MoeCache<T>& cache);

// DeepSeek's auxiliary-loss-free balancing step: b_i += u * sign(mean load - load_i), loads from
// telemetry.routed_per_expert, u = cfg.bias_update_rate. Call once per optimizer step.
template <typename T>
void UpdateBias(const MoeLayerConfig& cfg, const MoeTelemetry& telemetry, MoeWeights<T>* w);

}  // namespace moe
