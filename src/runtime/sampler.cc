#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>

#include "kernels/kernels.h"

namespace moe {

int Argmax(const float* logits, int n_vocab) {
  int best = 0;
  for (int i = 1; i < n_vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  return best;
}

int Sampler::Sample(const float* logits, int n_vocab) {
  if (cfg_.temp <= 0.0f) return Argmax(logits, n_vocab);
  // The tempered distribution over the whole vocabulary, vectorised (kernels::Softmax: exp in
  // float, sums in double): an exp per logit in double had been most of a sampled token's cost.
  probs_.resize(n_vocab);
  const float inv_temp = 1.0f / cfg_.temp;
  for (int i = 0; i < n_vocab; ++i) probs_[i] = logits[i] * inv_temp;
  kernels::Softmax(probs_.data(), n_vocab);
  const bool top_k = cfg_.top_k > 0 && cfg_.top_k < n_vocab;
  if (!top_k && cfg_.top_p >= 1.0f) {  // no filter: no ordering needed, one pass to draw
    std::uniform_real_distribution<double> u(0.0, 1.0);
    const double r = u(rng_);
    double cum = 0;
    int last = 0;  // the last token with any weight, if rounding leaves r past the total
    for (int i = 0; i < n_vocab; ++i) {
      if (probs_[i] <= 0.0f) continue;
      cum += probs_[i];
      last = i;
      if (r < cum) return i;
    }
    return last;
  }
  cand_.resize(n_vocab);
  for (int i = 0; i < n_vocab; ++i) cand_[i] = {logits[i], i};
  auto by_logit = [](const std::pair<float, int>& a, const std::pair<float, int>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  // Candidates best first: the top k, or (top_p alone) as many as the nucleus needs, sorted a
  // growing prefix at a time. top_p applies to the candidates' renormalised probabilities.
  size_t n = cand_.size(), sorted = 0;
  const auto sort_prefix = [&](size_t m) {
    std::partial_sort(cand_.begin() + sorted, cand_.begin() + m, cand_.end(), by_logit);
    sorted = m;
  };
  double total = 1.0;  // the candidates' probability mass
  if (top_k) {
    sort_prefix(static_cast<size_t>(cfg_.top_k));
    n = cfg_.top_k;
    total = 0;
    for (size_t i = 0; i < n; ++i) total += probs_[cand_[i].second];
  } else {
    sort_prefix(std::min<size_t>(n, 64));
  }
  if (cfg_.top_p < 1.0f) {
    double cum = 0;
    size_t keep = n;
    for (size_t i = 0; i < n; ++i) {
      if (i == sorted) sort_prefix(std::min(n, 4 * sorted));
      cum += probs_[cand_[i].second] / total;
      if (cum >= cfg_.top_p) {
        keep = i + 1;
        break;
      }
    }
    n = keep;
  }
  double kept = 0;
  for (size_t i = 0; i < n; ++i) kept += probs_[cand_[i].second];
  std::uniform_real_distribution<double> u(0.0, kept);
  double r = u(rng_);
  size_t last = 0;  // the last candidate with any weight, if rounding leaves r past the total
  for (size_t i = 0; i < n; ++i) {
    const float p = probs_[cand_[i].second];
    if (p <= 0.0f) continue;
    last = i;
    r -= p;
    if (r < 0) return cand_[i].second;
  }
  return cand_[last].second;
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
