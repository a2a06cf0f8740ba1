#include "train/optimizer.h"

#include <cmath>

#include "kernels/train_ops.h"
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
  for (const NamedArray<float>& g : grads) s += kernels::SumSquares(g.data->data(), static_cast<int64_t>(g.data->size()));
  return std::sqrt(s);
}

void AdamW::Step(const std::vector<NamedArray<float>>& params, const std::vector<NamedArray<float>>& grads,
                 double lr, double grad_scale, ThreadPool* pool) {
  MOE_ASSERT(params.size() == grads.size() && grads.size() == m_.size());
  ++t_;
  const double bc1 = 1.0 - std::pow(cfg_.beta1, static_cast<double>(t_));
  const double bc2 = 1.0 - std::pow(cfg_.beta2, static_cast<double>(t_));
  kernels::AdamWParams ap;
  ap.b1 = static_cast<float>(cfg_.beta1);
  ap.b2 = static_cast<float>(cfg_.beta2);
  ap.step_size = static_cast<float>(lr / bc1);
  ap.inv_bc2 = static_cast<float>(1.0 / bc2);
  ap.eps = static_cast<float>(cfg_.eps);
  ap.grad_scale = static_cast<float>(grad_scale);
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
      kernels::AdamWParams q = ap;
      q.decay = DecaysWeights(params[it.tensor].role) ? static_cast<float>(lr * cfg_.weight_decay) : 0.0f;
      kernels::AdamWUpdate(params[it.tensor].data->data() + it.begin, grads[it.tensor].data->data() + it.begin,
                           m_[it.tensor].data() + it.begin, v_[it.tensor].data() + it.begin,
                           static_cast<int64_t>(it.end - it.begin), q);
    }
  };
  if (pool == nullptr || pool->size() == 1) {
    run(0, static_cast<int64_t>(items.size()));
  } else {
    pool->ParallelFor(static_cast<int64_t>(items.size()), 1, [&](int64_t a, int64_t e, int) { run(a, e); });
  }
}

}  // namespace moe
