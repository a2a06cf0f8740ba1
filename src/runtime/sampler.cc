#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>

namespace moe {

int Argmax(const float* logits, int n_vocab) {
  int best = 0;
  for (int i = 1; i < n_vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  return best;
}

int Sampler::Sample(const float* logits, int n_vocab) {
  if (cfg_.temp <= 0.0f) return Argmax(logits, n_vocab);
  cand_.resize(n_vocab);
  for (int i = 0; i < n_vocab; ++i) cand_[i] = {logits[i], i};
  auto by_logit = [](const std::pair<float, int>& a, const std::pair<float, int>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  size_t n = cand_.size();
  if (cfg_.top_k > 0 && static_cast<size_t>(cfg_.top_k) < n) {
    std::partial_sort(cand_.begin(), cand_.begin() + cfg_.top_k, cand_.end(), by_logit);
    n = cfg_.top_k;
  } else {
    std::sort(cand_.begin(), cand_.end(), by_logit);
  }
  // Softmax with temperature over the kept candidates.
  std::vector<double> p(n);
  const double mx = cand_[0].first;
  double sum = 0;
  for (size_t i = 0; i < n; ++i) {
    p[i] = std::exp((cand_[i].first - mx) / cfg_.temp);
    sum += p[i];
  }
  if (cfg_.top_p < 1.0f) {
    double cum = 0;
    size_t keep = n;
    for (size_t i = 0; i < n; ++i) {
      cum += p[i] / sum;
      if (cum >= cfg_.top_p) {
        keep = i + 1;
        break;
      }
    }
    n = keep;
    sum = 0;
    for (size_t i = 0; i < n; ++i) sum += p[i];
  }
  std::uniform_real_distribution<double> u(0.0, sum);
  double r = u(rng_);
  for (size_t i = 0; i < n; ++i) {
    r -= p[i];
    if (r <= 0) return cand_[i].second;
  }
  return cand_[n - 1].second;
}

double LogSumExp(const float* logits, int n_vocab) {
  double mx = logits[0];
  for (int i = 1; i < n_vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
  double sum = 0;
  for (int i = 0; i < n_vocab; ++i) sum += std::exp(logits[i] - mx);
  return mx + std::log(sum);
}

std::vector<std::pair<int, double>> TopLogprobs(const float* logits, int n_vocab, int n) {
  const double lse = LogSumExp(logits, n_vocab);
  n = std::min(n, n_vocab);
  std::vector<int> idx(n_vocab);
  for (int i = 0; i < n_vocab; ++i) idx[i] = i;
  std::partial_sort(idx.begin(), idx.begin() + n, idx.end(), [&](int a, int b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  });
  std::vector<std::pair<int, double>> out(n);
  for (int i = 0; i < n; ++i) out[i] = {idx[i], logits[idx[i]] - lse};
  return out;
}

}  // namespace moe
