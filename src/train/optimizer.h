// AdamW with decoupled weight decay (Loshchilov & Hutter), linear warmup then cosine decay, and
// clipping by the global gradient norm. The state is one (m, v) pair per named tensor of the
// parameter store, in NamedTensors order, so checkpoints save it under the tensors' names.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "model/params.h"

namespace moe {

class ThreadPool;

struct AdamWConfig {
  double lr = 1e-3;            // peak learning rate
  double min_lr = 1e-4;        // the cosine decay's floor, reached at the last step
  int warmup = 0;              // steps of linear warmup from lr / warmup to lr
  int total_steps = 1;         // the schedule's length
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.1;   // decoupled; only on matrices (not norms, biases, gates)
  double clip = 1.0;           // clip the global gradient norm to this (0 = off)
};

// The learning rate of optimizer step `step` (0-based): (step + 1) / warmup * lr during warmup,
// then lr -> min_lr along a half cosine over the remaining steps.
double LearningRate(const AdamWConfig& c, int step);

// Whether AdamW decays a tensor of this role (matrices, embeddings, output, router: yes).
bool DecaysWeights(TensorRole role);

// The parameters that have gradients, in the order of `grads` (NamedTensors(p, g)): the
// optimizer's view of the store.
std::vector<NamedArray<float>> TrainableParams(ModelParams<float>& p, const std::vector<NamedArray<float>>& grads);

class AdamW {
 public:
  // State for the trainable tensors of p (NamedTensors(p, grads) order), zeroed.
  void Init(const std::vector<NamedArray<float>>& grads);
  // Global L2 norm of the gradients (in double, in a fixed order).
  static double GradNorm(const std::vector<NamedArray<float>>& grads);
  // One update: grads scaled by grad_scale (clipping), then AdamW with learning rate lr.
  // params (TrainableParams) and grads are aligned: params[i] is grads[i]'s tensor. Increments t().
  void Step(const std::vector<NamedArray<float>>& params, const std::vector<NamedArray<float>>& grads,
            double lr, double grad_scale, ThreadPool* pool);

  int64_t t() const { return t_; }
  void set_t(int64_t t) { t_ = t; }
  const AdamWConfig& config() const { return cfg_; }
  void set_config(const AdamWConfig& c) { cfg_ = c; }
  // Moments, one per trainable tensor: names_[i], m_[i], v_[i].
  std::vector<std::string>& names() { return names_; }
  std::vector<std::vector<float>>& m() { return m_; }
  std::vector<std::vector<float>>& v() { return v_; }

 private:
  AdamWConfig cfg_;
  int64_t t_ = 0;
  std::vector<std::string> names_;
  std::vector<std::vector<float>> m_, v_;
};

}  // namespace moe
