// Token sampling: greedy (temp 0), or temperature with top-k, top-p (nucleus) and min-p filtering,
// from a seeded generator so a run is reproducible; OpenAI's logit bias and presence and
// frequency penalties on the logits first.
#pragma once

#include <cstdint>
#include <random>
#include <unordered_map>
#include <utility>
#include <vector>

namespace moe {

struct SamplerConfig {
  float temp = 0.8f;
  int top_k = 40;      // 0 = whole vocabulary
  float top_p = 0.95f; // 1 = off
  // llama.cpp's min-p, after top-k and top-p: only tokens at least min_p times as likely as the
  // most likely one (logit >= the best logit + ln min_p, at any temperature); 0 = off.
  float min_p = 0.0f;
  uint64_t seed = 0;
  // OpenAI's penalties on the tokens drawn so far: a token's logit loses presence_penalty once it
  // has been drawn and frequency_penalty for every time it was (each in [-2, 2]; 0 = off).
  float presence_penalty = 0.0f;
  float frequency_penalty = 0.0f;
  // Added to those tokens' logits (OpenAI's logit_bias: token id, bias in [-100, 100]).
  std::vector<std::pair<int32_t, float>> logit_bias;
};

class Sampler {
 public:
  explicit Sampler(const SamplerConfig& cfg) : cfg_(cfg), rng_(cfg.seed) {}
  // The logits a token is drawn from, in place: the model's, plus each logit_bias, then minus
  // count x frequency_penalty + presence_penalty for every token drawn so far (count times); no
  // change without a bias or a penalty. The caller reports log-probabilities from these too (the
  // distribution drawn from).
  void Adjust(float* logits, int n_vocab) const;
  // Draws a token from (adjusted) logits and, with a penalty, counts it.
  int Sample(const float* logits, int n_vocab);

 private:
  bool Penalizes() const { return cfg_.presence_penalty != 0.0f || cfg_.frequency_penalty != 0.0f; }
  int Pick(const float* logits, int n_vocab);
  void Bucket(int n_vocab);
  template <class Less>
  void SelectTop(const float* logits, int n_vocab, int k, const Less& by_logit);
  template <class Less>
  int SampleNucleus(const float* logits, int n_vocab, const Less& by_logit, float min_logit);

  SamplerConfig cfg_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int>> cand_;
  std::vector<float> probs_;  // the tempered softmax of the vocabulary
  std::vector<double> mass_;        // top_p alone: the probability mass of each bucket
  std::vector<uint16_t> bucket_;    // each token's bucket (its probability's top 12 bits)
  std::vector<int> count_;          // top_k: the tokens of each bucket
  std::unordered_map<int32_t, int> drawn_;  // with a penalty: the times each token was drawn
};

// The n most likely tokens with their natural-log probabilities under the full-vocabulary
// softmax of the raw logits (computed in double), best first.
std::vector<std::pair<int, double>> TopLogprobs(const float* logits, int n_vocab, int n);

// log sum_i exp(logits[i]), in double: a token's log-probability is logits[id] - this.
double LogSumExp(const float* logits, int n_vocab);

// Index of the largest logit (lowest index on ties).
int Argmax(const float* logits, int n_vocab);

}  // namespace moe
