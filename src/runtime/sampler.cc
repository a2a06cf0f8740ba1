#include "runtime/sampler.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "kernels/kernels.h"

namespace moe {

int Argmax(const float* logits, int n_vocab) {
  int best = 0;
  for (int i = 1; i < n_vocab; ++i)
    if (logits[i] > logits[best]) best = i;
  return best;
}

namespace {

// The first item of [from, n) at which the running sum of weight(i) passes r (items of no weight
// skipped), or the last item with weight if rounding leaves r past the total; -1 if none has any.
template <class Weight>
int Draw(int from, int n, double r, const Weight& weight) {
  int last = -1;
  for (int i = from; i < n; ++i) {
    const float w = weight(i);
    if (w <= 0.0f) continue;
    last = i;
    r -= w;
    if (r < 0) break;
  }
  return last;
}

}  // namespace

void Sampler::Adjust(float* logits, int n_vocab) const {
  for (const auto& [id, bias] : cfg_.logit_bias)
    if (id >= 0 && id < n_vocab) logits[id] += bias;
  for (const auto& [id, n] : drawn_)
    logits[id] -= static_cast<float>(n) * cfg_.frequency_penalty + cfg_.presence_penalty;
}

int Sampler::Sample(const float* logits, int n_vocab) {
  const int id = Pick(logits, n_vocab);
  if (Penalizes()) ++drawn_[id];
  return id;
}

int Sampler::Pick(const float* logits, int n_vocab) {
  if (cfg_.temp <= 0.0f) return Argmax(logits, n_vocab);
  // The tempered distribution over the whole vocabulary, vectorised (kernels::Softmax: exp in
  // float, sums in double): an exp per logit in double had been most of a sampled token's cost.
  probs_.resize(n_vocab);
  const float inv_temp = 1.0f / cfg_.temp;
  for (int i = 0; i < n_vocab; ++i) probs_[i] = logits[i] * inv_temp;
  kernels::Softmax(probs_.data(), n_vocab);
  // min-p: the logit a token needs (every token passes without it).
  const float min_logit = cfg_.min_p > 0.0f ? logits[Argmax(logits, n_vocab)] + std::log(cfg_.min_p)
                                            : -std::numeric_limits<float>::infinity();
  const bool top_k = cfg_.top_k > 0 && cfg_.top_k < n_vocab;
  if (!top_k && cfg_.top_p >= 1.0f) {  // no filter but min-p: no ordering needed, one pass to draw
    double mass = 1.0;
    if (cfg_.min_p > 0.0f) {
      mass = 0.0;
      for (int i = 0; i < n_vocab; ++i) {
        if (logits[i] < min_logit) probs_[i] = 0.0f;
        mass += probs_[i];
      }
    }
    std::uniform_real_distribution<double> u(0.0, mass);
    double r = u(rng_);
    // Blocks of 64 summed in four independent chains first, then the token within the block
    // where r falls: one chain of dependent additions over the whole vocabulary had been most of
    // a sampled token's cost (40 of 58 us on 32000 tokens).
    constexpr int kBlock = 64;
    int b = 0;
    for (; b + kBlock <= n_vocab; b += kBlock) {
      double s[4] = {0, 0, 0, 0};
      for (int i = 0; i < kBlock; i += 4)
        for (int j = 0; j < 4; ++j) s[j] += probs_[b + i + j];
      const double sum = (s[0] + s[1]) + (s[2] + s[3]);
      if (r < sum) break;
      r -= sum;
    }
    const auto p = [&](int i) { return probs_[i]; };
    const int id = Draw(b, n_vocab, r, p);
    return id >= 0 ? id : std::max(0, Draw(0, n_vocab, 2.0, p));  // r ran past the last block
  }
  auto by_logit = [](const std::pair<float, int>& a, const std::pair<float, int>& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  };
  if (!top_k) return SampleNucleus(logits, n_vocab, by_logit, min_logit);
  // The top k best first (found through the buckets, not by sorting the vocabulary), then top_p
  // over their renormalised probabilities.
  SelectTop(logits, n_vocab, cfg_.top_k, by_logit);
  size_t n = cand_.size();
  double total = 0;  // the candidates' probability mass
  for (size_t i = 0; i < n; ++i) total += probs_[cand_[i].second];
  if (cfg_.top_p < 1.0f) {
    double cum = 0;
    for (size_t i = 0; i < n; ++i) {
      cum += probs_[cand_[i].second] / total;
      if (cum >= cfg_.top_p) {
        n = i + 1;
        break;
      }
    }
  }
  while (n > 1 && cand_[n - 1].first < min_logit) --n;  // best first: min-p cuts the tail
  double kept = 0;
  for (size_t i = 0; i < n; ++i) kept += probs_[cand_[i].second];
  std::uniform_real_distribution<double> u(0.0, kept);
  const int i = Draw(0, static_cast<int>(n), u(rng_), [&](int c) { return probs_[cand_[c].second]; });
  return cand_[std::max(i, 0)].second;
}

// The filters rank tokens in buckets instead of sorting the vocabulary: a probability's bits, as
// an unsigned integer, order it like its value, so bucket bits >> 20 (the exponent and 3 bits of
// mantissa) holds only tokens that rank above every token of lower buckets (the tempered softmax
// keeps the logits' order; equal logits share a bucket).
constexpr int kBuckets = (0x3F800000u >> 20) + 1;  // probabilities in [0, 1]

void Sampler::Bucket(int n_vocab) {
  bucket_.resize(n_vocab);
  for (int i = 0; i < n_vocab; ++i) {
    uint32_t bits;
    std::memcpy(&bits, &probs_[i], sizeof(bits));
    bucket_[i] = static_cast<uint16_t>(std::min<uint32_t>(bits >> 20, kBuckets - 1));
  }
}

// The k best tokens (1 <= k < n_vocab) into cand_, best first: the buckets from the top until they
// hold k tokens; the last one's tokens sorted (the same order as a sort of the whole vocabulary
// by logit, then index, gives: partial_sort of the vocabulary cost 80 us per token at k = 40).
template <class Less>
void Sampler::SelectTop(const float* logits, int n_vocab, int k, const Less& by_logit) {
  Bucket(n_vocab);
  count_.assign(kBuckets, 0);
  for (int i = 0; i < n_vocab; ++i) ++count_[bucket_[i]];
  int b = kBuckets - 1, above = 0;
  while (b > 0 && above + count_[b] < k) above += count_[b--];
  cand_.clear();
  for (int i = 0; i < n_vocab; ++i)
    if (bucket_[i] >= b) cand_.push_back({logits[i], i});
  std::sort(cand_.begin(), cand_.end(), by_logit);
  cand_.resize(std::min<size_t>(cand_.size(), static_cast<size_t>(k)));
}

// top_p alone (sorting a growing prefix of the vocabulary had taken 455 us per token on 32000
// tokens whose nucleus held thousands: a fifth of a decode step): the buckets' masses, from the
// top, find the bucket where the nucleus ends, and only that bucket's tokens are sorted (by
// logit, then index, as everywhere) to find where in it. The draw scans the kept tokens in
// vocabulary order.
template <class Less>
int Sampler::SampleNucleus(const float* logits, int n_vocab, const Less& by_logit, float min_logit) {
  Bucket(n_vocab);
  mass_.assign(kBuckets, 0.0);
  for (int i = 0; i < n_vocab; ++i) mass_[bucket_[i]] += probs_[i];
  double cum = 0;
  int b = kBuckets - 1;
  for (; b >= 0 && cum + mass_[b] < cfg_.top_p; --b) cum += mass_[b];
  // Bucket b holds the nucleus' last token: its tokens best first, as many as reach top_p. (If
  // rounding leaves the whole vocabulary short of top_p, b is -1 and every token is kept.)
  cand_.clear();
  if (b >= 0) {
    for (int i = 0; i < n_vocab; ++i)
      if (bucket_[i] == b) cand_.push_back({logits[i], i});
    std::sort(cand_.begin(), cand_.end(), by_logit);
  }
  size_t n = 0;
  while (n < cand_.size() && (cum < cfg_.top_p || n == 0)) cum += probs_[cand_[n++].second];
  const auto kept = [&](int i) {
    return (static_cast<int>(bucket_[i]) > b ||
            (bucket_[i] == b && !by_logit(cand_[n - 1], std::pair<float, int>{logits[i], i}))) &&
           logits[i] >= min_logit;
  };
  double total = 0;
  for (int i = 0; i < n_vocab; ++i)
    if (kept(i)) total += probs_[i];
  std::uniform_real_distribution<double> u(0.0, total);
  const int chosen = Draw(0, n_vocab, u(rng_), [&](int i) { return kept(i) ? probs_[i] : 0.0f; });
  return chosen >= 0 ? chosen : cand_.empty() ? Argmax(logits, n_vocab) : cand_[0].second;
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
