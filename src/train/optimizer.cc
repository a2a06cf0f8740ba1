#include "train/optimizer.h"

#include <cmath>

#include "util/error.h"
#include "util/threadpool.h"

namespace moe {

double LearningRate(const AdamWConfig& c, int step) {
  if (c.warmup > 0 && step < c.warmup) return c.lr * (step + 1) / c.warmup;
  const int decay = c.total_steps - c.warmup;
  if (decay <= 1) return c.lr;
  const double progress = std::min(1.0, static_cast<double>(step - c.warmup) / (decay - 1));
  return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + std::cos(M_PI * progress));
}

bool DecaysWeights(TensorRole role) {
  switch (role) {
    case TensorRole::kMatrix: case TensorRole::kExperts: case TensorRole::kEmbedding:
    case TensorRole::kOutput: case TensorRole::kRouter: case TensorRole::kRouterAux:
      return true;
    case TensorRole::kNorm: case TensorRole::kBias: case TensorRole::kGate:
      return false;
  }
  return false;
}

std::vector<NamedArray<float>> TrainableParams(ModelParams<float>& p, const std::vector<NamedArray<float>>& grads) {
  std::vector<NamedArray<float>> all = NamedTensors(p), out;
  size_t j = 0;
  for (const NamedArray<float>& g : grads) {
    while (j < all.size() && all[j].name != g.name) ++j;  // both lists are in GGUF order
    MOE_ASSERT(j < all.size() && all[j].data->size() == g.data->size());
    out.push_back(all[j++]);
  }
  return out;
}

void AdamW::Init(const std::vector<NamedArray<float>>& grads) {
  t_ = 0;
  names_.clear();
  m_.clear();
  v_.clear();
  for (const NamedArray<float>& g : grads) {
    names_.push_back(g.name);
    m_.emplace_back(g.data->size(), 0.0f);
    v_.emplace_back(g.data->size(), 0.0f);
  }
}

double AdamW::GradNorm(const std::vector<NamedArray<float>>& grads) {
  double s = 0;
  for (const NamedArray<float>& g : grads)
    for (float x : *g.data) s += static_cast<double>(x) * x;
  return std::sqrt(s);
}

void AdamW::Step(const std::vector<NamedArray<float>>& params, const std::vector<NamedArray<float>>& grads,
                 double lr, double grad_scale, ThreadPool* pool) {
  MOE_ASSERT(params.size() == grads.size() && grads.size() == m_.size());
  ++t_;
  const double bc1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(t_));
  const float b1 = static_cast<float>(cfg_.beta1), b2 = static_cast<float>(cfg_.beta2);
  const float step_size = static_cast<float>(lr / bc1), inv_bc2 = static_cast<float>(1.0 / bc2);
  const float eps = static_cast<float>(cfg_.eps), gs = static_cast<float>(grad_scale);
  // Work items: fixed slices of each tensor (element-wise: the split does not change a bit).
  struct Item { size_t tensor, begin, end; };
  std::vector<Item> items;
  constexpr size_t kSlice = 1 << 16;
  for (size_t i = 0; i < grads.size(); ++i)
    for (size_t b = 0; b < grads[i].data->size(); b += kSlice)
      items.push_back({i, b, std::min(grads[i].data->size(), b + kSlice)});
  auto run = [&](int64_t a, int64_t e) {
    for (int64_t k = a; k < e; ++k) {
      const Item& it = items[k];
      float* w = params[it.tensor].data->data();
      const float* g = grads[it.tensor].data->data();
      float* m = m_[it.tensor].data();
      float* v = v_[it.tensor].data();
      const float decay = DecaysWeights(params[it.tensor].role) ? static_cast<float>(lr * cfg_.weight_decay) : 0.0f;
      for (size_t i = it.begin; i < it.end; ++i) {
        const float gi = g[i] * gs;
        m[i] = b1 * m[i] + (1.0f - b1) * gi;
        v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
        w[i] -= decay * w[i];  // decoupled weight decay
        w[i] -= step_size * m[i] / (std::sqrt(v[i] * inv_bc2) + eps);
      }
    }
  };
  if (pool == nullptr || pool->size() == 1) {
    run(0, static_cast<int64_t>(items.size()));
  } else {
    pool->ParallelFor(static_cast<int64_t>(items.size()), 1, [&](int64_t a, int64_t e, int) { run(a, e); });
  }
}

}  // namespace moe
