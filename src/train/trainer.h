// The step driver of `moe train`: data, the whole-model forward/backward (model_train.h), AdamW
// (optimizer.h), the aux-loss-free bias update, validation, metrics, checkpoints and resume.
//
// Output directory:
//   model.gguf        the trained model (the input's architecture; F32), rewritten at every save
//   checkpoint.gguf   the model plus the optimizer state and the step (tensors opt.m.<name>,
//                     opt.v.<name>; keys train.*), written atomically every --save-every steps
//                     and at the end
//   metrics.jsonl     one JSON object per step (step, loss, aux_loss, lr, grad_norm, tokens_per_s,
//                     max_vio, expert_load, elapsed_s) and per evaluation (step, val_loss, val_ppl)
// A run is a function of its flags (seed included) and of nothing else: --resume continues from
// the checkpoint and ends with the same losses and the same files as an uninterrupted run.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "moe/moe_config.h"
#include "model/params.h"
#include "train/model_train.h"
#include "train/optimizer.h"

namespace moe {

struct TrainConfig {
  std::string model;                    // the starting point (moe init / moe upcycle / a trained file)
  std::vector<std::string> data;        // text files, folders, .jsonl
  std::vector<std::string> val_data;    // held-out data; empty = the last val_fraction of data
  std::string out_dir;
  int steps = 0;                        // optimizer steps
  int batch = 8;                        // sequences per micro-batch
  int seq = 256;                        // tokens per sequence
  int grad_accum = 1;                   // micro-batches per optimizer step
  int threads = 0;                      // 0 = all CPUs (results do not depend on it)
  uint64_t seed = 0;
  AdamWConfig adam;                     // lr, schedule, decay, clipping (total_steps = steps)
  double val_fraction = 0.05;           // held-out share when there is no --val-data
  int eval_every = 0;                   // validation every N steps (0 = at the end only)
  int eval_batches = 0;                 // batches per validation (0 = all held-out sequences)
  int save_every = 0;                   // checkpoint every N steps (0 = at the end only)
  int log_every = 0;                    // a progress line every N steps when not on a terminal
  bool resume = false;
  // Training settings of the MoE layers: aux_loss_coef, z_loss_coef, entropy_loss_coef,
  // capacity_factor, jitter_eps, bias_update_rate, ec_capacity_factor, zc_balance_tau. Capacity
  // dropping and jitter act on training steps only: validation, like moe eval and moe run,
  // computes the model dropless and without noise (the model the file holds).
  MoeLayerConfig moe;
};

// One optimizer step of the whole model: the micro-batches' forward and backward with the
// gradients accumulated (each target weighted 1 / the step's targets, the MoE balance terms
// 1 / micro-batches), clipping, AdamW, then the aux-loss-free bias update of sigmoid_bias layers
// from the step's loads. Train() runs it; tests drive it directly.
struct StepStats {
  double loss = 0;                             // mean cross-entropy over the step's targets
  double aux_loss = 0;                         // sum of the MoE balance terms (as weighted)
  double grad_norm = 0;                        // before clipping
  double lr = 0;
  double max_vio = 0;                          // mean over layers of (max load - mean) / mean
  std::vector<std::vector<int64_t>> loads;     // [layer][target] routed slots in the step
  int64_t targets = 0;
};

class StepEngine {
 public:
  // p must outlive the engine. moe_train: the training settings of the MoE layers (see TrainConfig).
  StepEngine(ModelParams<float>* p, const MoeLayerConfig& moe_train, const AdamWConfig& adam, int grad_accum,
             ThreadPool* pool);
  // Step `step` (0-based, the schedule's position) on grad_accum micro-batches of n_seq
  // sequences: tokens[m] [n_seq][seq_len + 1], targets[m] the same shape or nullptr (all).
  // jitter_seed seeds the router jitter of micro-batch m as jitter_seed ^ m-th mix.
  StepStats Step(int step, const std::vector<const int32_t*>& tokens, const std::vector<const uint8_t*>& targets,
                 int n_seq, int seq_len, uint64_t jitter_seed);
  AdamW& optimizer() { return opt_; }
  const std::vector<NamedArray<float>>& grad_tensors() const { return gnamed_; }
  const std::vector<MoeLayerConfig>& layer_configs() const { return cfgs_; }

 private:
  ModelParams<float>* p_;
  ThreadPool* pool_;
  AdamWConfig adam_;
  int grad_accum_;
  std::vector<MoeLayerConfig> cfgs_;
  ModelGrads<float> grads_;
  std::vector<NamedArray<float>> gnamed_, pnamed_;
  AdamW opt_;
  ModelCache<float> cache_;
};

struct TrainSummary {
  int steps = 0;                   // optimizer steps done (in total, resumed ones included)
  double last_loss = 0;            // mean CE of the last step
  double val_loss = 0;             // last validation (NaN when there was none)
  int64_t train_tokens = 0;        // tokens in the training split
  int64_t val_tokens = 0;
  double seconds = 0;              // this process's training time
  double tokens_per_s = 0;         // this process's average
};

// Runs (or resumes) a training run. Throws moe::Error with a one-line message on bad flags, data
// or files, before anything on disk is changed; a run never overwrites another run's output
// unless --resume continues it. `log` receives progress and summary lines (nullptr = stderr).
TrainSummary Train(const TrainConfig& cfg, const std::function<void(const std::string&)>& log = nullptr);

}  // namespace moe
