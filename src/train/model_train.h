// The whole model, forward and backward, for training: embeddings, RMSNorm, causal attention with
// RoPE and GQA (Q/K norms and Q/K/V biases where the architecture has them), the MoE layer of
// moe/moe_layer.h with every router and expert kind, the output head and cross-entropy. One
// implementation for T = float (the trainer: fast kernels of kernels/train_ops.h and the own GEMM)
// and T = double (references and BLAS: gradient checks and PyTorch goldens).
//
// It computes the same function as the inference forward (model/forward.cc) on the same store
// (Model::FromParams), up to float rounding: the router is the same code (moe/routing.h) and the
// rotary embeddings rotate bit for bit alike; tests/train check the logits against each other.
//
// Deterministic: every product is split over rows or output slices whose arithmetic does not
// depend on the split, and every sum over tokens runs in a fixed order, so results depend on the
// inputs only, not on the thread count.
#pragma once

#include <cstdint>
#include <vector>

#include "model/params.h"
#include "moe/moe_layer.h"

namespace moe {

class ThreadPool;

struct TrainForwardOptions {
  ThreadPool* pool = nullptr;
  bool training = true;        // router jitter on; compute the cross-entropy gradient
  uint64_t jitter_seed = 0;    // seed of the router jitter (layer il uses a seed derived from it)
  int capacity_seq_len = 0;    // capacity scope of the MoE layers: 0 = the call, else per sequence
  // Weight of each target's cross-entropy in the objective the backward differentiates
  // (1 / targets of the optimizer step with gradient accumulation); 0 = 1 / this call's targets.
  double token_weight = 0.0;
  bool keep_logits = false;    // keep the logits (not overwritten by their gradient)
};

template <typename T>
struct BlockCache {
  std::vector<T> x_in;          // [N][D] residual stream entering the block
  std::vector<T> rstd1;         // [N] attn_norm
  std::vector<T> h1;            // [N][D] attn_norm output
  std::vector<T> q_pre, k_pre;  // [N][n_q], [N][n_k] projections (+ bias) before the Q/K norm
  std::vector<T> q_rstd, k_rstd;  // [N][heads] or [N]: the Q/K norms' rstd
  std::vector<T> q, k, v;       // [N][n_q], [N][n_k], [N][n_v] attention inputs (normed, rotated)
  std::vector<T> probs;         // [n_seq][H][L][L] attention probabilities
  std::vector<T> att;           // [N][n_q] attention output before attn_output
  std::vector<T> x_mid;         // [N][D] after the attention residual
  std::vector<T> rstd2;         // [N] ffn_norm
  std::vector<T> h2;            // [N][D] ffn_norm output, the MoE layer's input
  MoeCache<T> moe;              // empty in a dense block
  // deepseek2 (MLA, computed in the plain form: every head's keys and values decompressed from
  // the latent; Dp = max(qk_nope + qk_rope, v) pads q, k and v to one head size):
  std::vector<T> qa_pre, qa, qa_rstd;  // [N][Rq] q_a output, its normalisation, [N] rstd
  std::vector<T> kva;           // [N][Kr + Dr] attn_kv_a_mqa output (before norm and RoPE)
  std::vector<T> kv_rstd;       // [N] attn_kv_a_norm's rstd
  std::vector<T> lat;           // [N][Kr] the normalised latent c
  std::vector<T> qp, kp, vp;    // [N][H][Dp] the heads' rotated queries, keys, values (zero padded)
  // A dense block's FFN (deepseek2's leading blocks): gate and up outputs [N][n_ff], and
  // silu(gate) * up.
  std::vector<T> fg, fu, fa;
};

template <typename T>
struct ModelCache {
  int n_seq = 0, seq_len = 0;
  std::vector<int32_t> inputs;   // [N] N = n_seq * seq_len
  std::vector<int32_t> targets;  // [N]
  std::vector<uint8_t> counted;  // [N] 1 = the target is in the loss
  int64_t n_counted = 0;
  std::vector<BlockCache<T>> blocks;
  std::vector<T> x_final;        // [N][D]
  std::vector<T> rstd_f;         // [N]
  std::vector<T> h_f;            // [N][D] output_norm output
  std::vector<T> logits;         // [N][V] logits, or (training) token_weight * dCE/dlogits
  // Work arrays of the forward and backward, kept between calls (every use writes before it reads,
  // so nothing is cleared or allocated per step once the sizes settle).
  std::vector<T> x, y, dh, dx, dh2, datt, dq, dk, dv;
  std::vector<T> dqp, dkp, dvp, datp, dlat, dkva, dqa;  // deepseek2's attention
  std::vector<T> dfa, dfg, dfu;                         // a dense block's FFN
  double ce_sum = 0;             // sum over counted targets of -log p(target)
  double moe_loss = 0;           // sum over layers of the MoE balance terms (as weighted)
  double loss() const { return n_counted ? ce_sum / static_cast<double>(n_counted) : 0.0; }  // mean CE
};

// The MoE layer of each block as the trainer runs it: the model's (ModelParams::LayerMoe) with the
// training-only settings of `train` (loss weights, capacity, jitter, expert choice capacity, bias
// rate) and the balance terms weighted by loss_weight (tokens of this call / tokens of the
// optimizer step, so micro-batches sum to the step's mean).
template <typename T>
std::vector<MoeLayerConfig> TrainLayerConfigs(const ModelParams<T>& p, const MoeLayerConfig& train,
                                              double loss_weight = 1.0);

// Forward over n_seq sequences: tokens [n_seq][seq_len + 1] (inputs are positions 0..L-1, the
// targets 1..L); target [n_seq][seq_len + 1] (nullptr = all): 0 at a position keeps that token
// out of the loss (a prompt). Returns the mean cross-entropy over the counted targets. Throws
// moe::Error on a token id out of range or a sequence longer than the model's context.
template <typename T>
double ModelForward(const ModelParams<T>& p, const std::vector<MoeLayerConfig>& cfgs,
                    const int32_t* tokens, const uint8_t* target, int n_seq, int seq_len,
                    const TrainForwardOptions& opt, ModelCache<T>* cache);

// Backward of token_weight * sum CE + sum over layers of the MoE balance terms; ADDS every
// parameter's gradient into g (zero it per optimizer step). Needs a training forward.
template <typename T>
void ModelBackward(const ModelParams<T>& p, const std::vector<MoeLayerConfig>& cfgs,
                   ModelCache<T>& cache, ModelGrads<T>* g, ThreadPool* pool);

}  // namespace moe
