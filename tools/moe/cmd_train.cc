// moe train: trains a model file (moe init, moe upcycle or an earlier run) on text; see
// train/trainer.h for the output folder.
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "train/trainer.h"
#include "util/error.h"

namespace moe::cli {

Runner AddTrain(CLI::App& app) {
  struct Options {
    TrainConfig c;
    bool json = false;
  };
  auto o = std::make_shared<Options>();
  TrainConfig& c = o->c;
  c.moe.aux_loss_coef = 0.01;
  c.moe.z_loss_coef = 0.001;
  app.add_option("-m,--model", c.model, "starting model (moe init, moe upcycle, or a trained file)")->required();
  app.add_option("--data", c.data, "training text: files, folders, .jsonl with a \"text\" field")->required();
  app.add_option("--val-data", c.val_data, "held-out text (default: the last --val-fraction of --data)");
  app.add_option("--out", c.out_dir, "output folder: model.gguf, checkpoint.gguf, metrics.jsonl")->required();
  app.add_option("--steps", c.steps, "optimizer steps")->required();
  app.add_option("--batch", c.batch, "sequences per micro-batch")->default_val(8);
  app.add_option("--seq", c.seq, "tokens per sequence")->default_val(256);
  app.add_option("--grad-accum", c.grad_accum, "micro-batches per optimizer step")->default_val(1);
  app.add_option("--lr", c.adam.lr, "peak learning rate")->default_val(1e-3);
  CLI::Option* min_lr = app.add_option("--min-lr", c.adam.min_lr, "learning rate at the end of the cosine decay (default lr/10)");
  app.add_option("--warmup", c.adam.warmup, "steps of linear warmup")->default_val(0);
  app.add_option("--weight-decay", c.adam.weight_decay, "AdamW decoupled weight decay (matrices only)")->default_val(0.1);
  app.add_option("--beta1", c.adam.beta1, "AdamW beta1")->default_val(0.9);
  app.add_option("--beta2", c.adam.beta2, "AdamW beta2")->default_val(0.95);
  app.add_option("--clip", c.adam.clip, "clip the global gradient norm (0 = off)")->default_val(1.0);
  app.add_option("--threads,-t", c.threads, "threads (default: all CPUs; results do not depend on it)")->default_val(0);
  app.add_option("--seed", c.seed, "seed of the data order and the router jitter")->default_val(0);
  app.add_option("--val-fraction", c.val_fraction, "held-out share of --data when there is no --val-data")->default_val(0.05);
  app.add_option("--eval-every", c.eval_every, "validation loss every N steps (0 = at the end)")->default_val(0);
  app.add_option("--eval-batches", c.eval_batches, "batches per validation (0 = all held-out sequences)")->default_val(0);
  app.add_option("--save-every", c.save_every, "checkpoint every N steps (0 = at the end)")->default_val(0);
  app.add_option("--log-every", c.log_every, "progress line every N steps when not on a terminal (default steps/20)")->default_val(0);
  app.add_flag("--resume", c.resume, "continue the run in --out from its checkpoint (same flags)");
  app.add_option("--aux-loss", c.moe.aux_loss_coef, "Switch load-balancing loss weight")->default_val(0.01);
  app.add_option("--z-loss", c.moe.z_loss_coef, "router z-loss weight")->default_val(0.001);
  app.add_option("--entropy-loss", c.moe.entropy_loss_coef, "router entropy loss weight (negative: the router's default)")
      ->default_val(-1.0);
  app.add_option("--capacity-factor", c.moe.capacity_factor,
                 "token-choice expert capacity during training (0 = dropless; evaluation and serving are dropless)")
      ->default_val(0.0);
  app.add_option("--jitter", c.moe.jitter_eps, "router input jitter during training (Switch)")->default_val(0.0);
  app.add_option("--bias-update-rate", c.moe.bias_update_rate, "sigmoid_bias: the aux-loss-free bias step")->default_val(1e-3);
  app.add_option("--ec-capacity", c.moe.ec_capacity_factor, "expert_choice: tokens per expert = tokens * this / experts")
      ->default_val(2.0);
  app.add_flag("--json", o->json, "print the summary as one JSON object");
  return [=]() {
    TrainConfig cfg = o->c;
    if (min_lr->count() == 0) cfg.adam.min_lr = cfg.adam.lr / 10;
    const TrainSummary s = Train(cfg);
    if (o->json) {
      nlohmann::json j = {{"steps", s.steps}, {"loss", s.last_loss},
                          {"val_loss", std::isfinite(s.val_loss) ? nlohmann::json(s.val_loss) : nlohmann::json()},
                          {"train_tokens", s.train_tokens}, {"val_tokens", s.val_tokens},
                          {"seconds", s.seconds}, {"tokens_per_s", s.tokens_per_s}};
      std::printf("%s\n", j.dump().c_str());
    }
    return 0;
  };
}

}  // namespace moe::cli
