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
  const bool top_k = cfg_.top_k > 0 && cfg_.top_k < n_vocab;
  if (!top_k && cfg_.top_p >= 1.0f) {
    // The whole vocabulary: no ordering needed, one pass to weigh and one to draw (a sort of the
    // vocabulary per token had been a third of a 16-stream server's time).
    double mx = logits[0];
    for (int i = 1; i < n_vocab; ++i) mx = std::max(mx, static_cast<double>(logits[i]));
    weights_.resize(n_vocab);
    double sum = 0;
    for (int i = 0; i < n_vocab; ++i) sum += weights_[i] = std::exp((logits[i] - mx) / cfg_.temp);
    std::uniform_real_distribution<double> u(0.0, sum);
    double r = u(rng_);
    for (int i = 0; i < n_vocab; ++i) {
      r -= weights_[i];
      if (r <= 0) return i;
    }
    return n_vocab - 1;
  }
  cand_.resize(n_vocab);
  for (int i = 0; i < n_vocab; ++i) cand_[i] = {logits[i], i};
  auto by_logit = [](const std::pair<float, int>& a, const std::pair<float, int>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  // Candidates best first: the top k, or (top_p alone) as many as the nucleus needs, sorted a
  // growing prefix at a time; their weights are normalised by the sum over every candidate.
  size_t n = cand_.size(), sorted = 0;
  const auto sort_prefix = [&](size_t m) {
    std::partial_sort(cand_.begin() + sorted, cand_.begin() + m, cand_.end(), by_logit);
    sorted = m;
  };
  if (top_k) {
    sort_prefix(static_cast<size_t>(cfg_.top_k));
    n = cfg_.top_k;
  } else {
    sort_prefix(std::min<size_t>(n, 64));
  }
  const double mx = cand_[0].first;
  double sum = 0;
  for (size_t i = 0; i < n; ++i) sum += std::exp((cand_[i].first - mx) / cfg_.temp);
  weights_.clear();
  if (cfg_.top_p < 1.0f) {
    double cum = 0;
    size_t keep = n;
    for (size_t i = 0; i < n; ++i) {
      if (i == sorted) sort_prefix(std::min(n, 4 * sorted));
      weights_.push_back(std::exp((cand_[i].first - mx) / cfg_.temp));
      cum += weights_[i] / sum;
      if (cum >= cfg_.top_p) {
        keep = i + 1;
        break;
      }
    }
    n = keep;
  } else {
    for (size_t i = 0; i < n; ++i) weights_.push_back(std::exp((cand_[i].first - mx) / cfg_.temp));
  }
  double kept = 0;
  for (size_t i = 0; i < n; ++i) kept += weights_[i];
  std::uniform_real_distribution<double> u(0.0, kept);
  double r = u(rng_);
  for (size_t i = 0; i < n; ++i) {
    r -= weights_[i];
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
