// Token sampling: greedy (temp 0), or temperature with top-k and top-p (nucleus) filtering,
// from a seeded generator so a run is reproducible.
#pragma once

#include <cstdint>
#include <random>
#include <utility>
#include <vector>

namespace moe {

struct SamplerConfig {
  float temp = 0.8f;
  int top_k = 40;      // 0 = whole vocabulary
  float top_p = 0.95f; // 1 = off
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerConfig& cfg) : cfg_(cfg), rng_(cfg.seed) {}
  int Sample(const float* logits, int n_vocab);

 private:
  void Bucket(int n_vocab);
  template <class Less>
  void SelectTop(const float* logits, int n_vocab, int k, const Less& by_logit);
  template <class Less>
  int SampleNucleus(const float* logits, int n_vocab, const Less& by_logit);

  SamplerConfig cfg_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int>> cand_;
  std::vector<float> probs_;  // the tempered softmax of the vocabulary
  std::vector<double> mass_;        // top_p alone: the probability mass of each bucket
  std::vector<uint16_t> bucket_;    // each token's bucket (its probability's top 12 bits)
  std::vector<int> count_;          // top_k: the tokens of each bucket
};

// The n most likely tokens with their natural-log probabilities under the full-vocabulary
// softmax of the raw logits (computed in double), best first.
std::vector<std::pair<int, double>> TopLogprobs(const float* logits, int n_vocab, int n);

// log sum_i exp(logits[i]), in double: a token's log-probability is logits[id] - this.
double LogSumExp(const float* logits, int n_vocab);

// Index of the largest logit (lowest index on ties).
int Argmax(const float* logits, int n_vocab);

}  // namespace moe
