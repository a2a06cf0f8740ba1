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
  // capacity_factor, jitter_eps, bias_update_rate, ec_capacity_factor, zc_balance_tau.
  MoeLayerConfig moe;
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
