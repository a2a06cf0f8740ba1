#include "runtime/sampler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>
#include <random>
#include <vector>

namespace moe {
namespace {

// The tempered softmax in double: the reference the draws must follow.
std::vector<double> Probabilities(const std::vector<float>& logits, double temp) {
  const double mx = *std::max_element(logits.begin(), logits.end());
  std::vector<double> p(logits.size());
  double sum = 0;
  for (size_t i = 0; i < logits.size(); ++i) sum += p[i] = std::exp((logits[i] - mx) / temp);
  for (double& v : p) v /= sum;
  return p;
}

// Draws n tokens and checks each token's frequency against want (within 5 standard deviations).
void ExpectFrequencies(const SamplerConfig& cfg, const std::vector<float>& logits, const std::vector<double>& want,
                       int n) {
  Sampler s(cfg);
  std::vector<int> count(logits.size(), 0);
  for (int i = 0; i < n; ++i) {
    const int id = s.Sample(logits.data(), static_cast<int>(logits.size()));
    ASSERT_GE(id, 0);
    ASSERT_LT(id, static_cast<int>(logits.size()));
    ++count[id];
  }
  for (size_t i = 0; i < logits.size(); ++i) {
    const double f = static_cast<double>(count[i]) / n;
    if (want[i] == 0.0) {
      EXPECT_EQ(count[i], 0) << "token " << i << " is outside the filter";
      continue;
    }
    EXPECT_NEAR(f, want[i], 5 * std::sqrt(want[i] * (1 - want[i]) / n) + 1e-4) << "token " << i;
  }
}

const std::vector<float> kLogits = {2.0f, 1.0f, 0.5f, 0.0f, -1.0f, -3.0f, 1.5f};

TEST(Sampler, ZeroTemperatureIsArgmaxWithTheLowestIndexOnTies) {
  SamplerConfig cfg;
  cfg.temp = 0.0f;
  Sampler s(cfg);
  const std::vector<float> tied = {0.5f, 3.0f, -1.0f, 3.0f};
  EXPECT_EQ(s.Sample(tied.data(), 4), 1);
  EXPECT_EQ(Argmax(kLogits.data(), static_cast<int>(kLogits.size())), 0);
}

// OpenAI's formula, in double: logit + bias - (count x frequency + [count > 0] x presence) for the
// tokens drawn so far.
TEST(Sampler, AdjustAddsTheBiasAndSubtractsThePenaltiesOfTheTokensDrawn) {
  constexpr int V = 50;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  SamplerConfig cfg;
  cfg.temp = 0.0f;  // each draw is the argmax of the logits given
  cfg.presence_penalty = 0.75f;
  cfg.frequency_penalty = -0.3f;
  cfg.logit_bias = {{3, 2.5f}, {9, -100.0f}, {17, 0.125f}};
  Sampler s(cfg);
  // Draw 9, 9, 9, 17, 41 (one-hot logits), counting 9 three times.
  std::map<int, int> drawn;
  for (int t : {9, 9, 17, 9, 41}) {
    std::vector<float> onehot(V, 0.0f);
    onehot[t] = 1.0f;
    ASSERT_EQ(s.Sample(onehot.data(), V), t);
    ++drawn[t];
  }
  std::vector<float> logits(V);
  for (float& x : logits) x = u(rng);
  std::vector<float> adjusted = logits;
  s.Adjust(adjusted.data(), V);
  for (int i = 0; i < V; ++i) {
    double want = logits[i];
    for (const auto& [id, bias] : cfg.logit_bias)
      if (id == i) want += bias;
    if (drawn.count(i)) want -= drawn[i] * double(cfg.frequency_penalty) + cfg.presence_penalty;
    EXPECT_NEAR(adjusted[i], want, 1e-4) << "token " << i;
  }
  // Without a bias or a penalty nothing changes (and nothing is counted).
  Sampler plain(SamplerConfig{});
  std::vector<float> same = logits;
  plain.Adjust(same.data(), V);
  EXPECT_EQ(same, logits);
}

TEST(Sampler, WholeVocabularyFollowsTheTemperedSoftmax) {
  for (float temp : {0.5f, 1.0f, 1.7f}) {
    SamplerConfig cfg;
    cfg.temp = temp;
    cfg.top_k = 0;
    cfg.top_p = 1.0f;
    cfg.seed = 11;
    ExpectFrequencies(cfg, kLogits, Probabilities(kLogits, temp), 200000);
  }
}

// min-p keeps the tokens at least min_p times as likely as the best at temperature 1 (logit >=
// best + ln min_p), whatever the temperature, after top-k and top-p; renormalised.
TEST(Sampler, MinPKeepsTokensNearTheBest) {
  // kLogits: 2.0, 1.0, 0.5, 0.0, -1.0, -3.0, 1.5. min_p 0.3: ln 0.3 = -1.20, so logits >= 0.80
  // stay (2.0, 1.5, 1.0).
  const auto restricted = [](const std::vector<double>& p, std::initializer_list<int> keep) {
    std::vector<double> want(p.size(), 0.0);
    double kept = 0;
    for (int i : keep) kept += p[i];
    for (int i : keep) want[i] = p[i] / kept;
    return want;
  };
  for (float temp : {0.6f, 1.3f}) {
    SamplerConfig cfg;
    cfg.temp = temp;
    cfg.top_k = 0;
    cfg.top_p = 1.0f;
    cfg.min_p = 0.3f;
    cfg.seed = 17;
    ExpectFrequencies(cfg, kLogits, restricted(Probabilities(kLogits, temp), {0, 6, 1}), 200000);
    cfg.top_k = 5;  // the 5 best, then min-p
    ExpectFrequencies(cfg, kLogits, restricted(Probabilities(kLogits, temp), {0, 6, 1}), 200000);
    cfg.top_k = 2;  // top-k cuts first
    ExpectFrequencies(cfg, kLogits, restricted(Probabilities(kLogits, temp), {0, 6}), 200000);
    cfg.top_k = 0;
    cfg.top_p = 0.999f;  // a nucleus of more than the three best, which min-p cuts to them
    ExpectFrequencies(cfg, kLogits, restricted(Probabilities(kLogits, temp), {0, 6, 1}), 200000);
  }
  SamplerConfig one;
  one.temp = 1.0f;
  one.top_k = 0;
  one.top_p = 1.0f;
  one.min_p = 1.0f;  // only the best
  ExpectFrequencies(one, kLogits, restricted(Probabilities(kLogits, 1.0), {0}), 1000);
}

TEST(Sampler, TopKKeepsTheKBestRenormalised) {
  SamplerConfig cfg;
  cfg.temp = 0.9f;
  cfg.top_k = 3;
  cfg.top_p = 1.0f;
  cfg.seed = 3;
  std::vector<double> p = Probabilities(kLogits, 0.9);
  std::vector<double> want(p.size(), 0.0);
  const double kept = p[0] + p[6] + p[1];  // logits 2.0, 1.5, 1.0
  for (int i : {0, 6, 1}) want[i] = p[i] / kept;
  ExpectFrequencies(cfg, kLogits, want, 200000);
}

TEST(Sampler, TopPKeepsTheSmallestNucleusReachingP) {
  for (int top_k : {0, 5}) {
    SamplerConfig cfg;
    cfg.temp = 1.0f;
    cfg.top_k = top_k;
    cfg.top_p = 0.7f;
    cfg.seed = 5;
    std::vector<double> p = Probabilities(kLogits, 1.0);
    std::vector<int> order(p.size());
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    if (top_k > 0) order.resize(top_k);
    double mass = 0;
    for (int i : order) mass += p[i];
    std::vector<double> want(p.size(), 0.0);
    double cum = 0, kept = 0;
    std::vector<int> nucleus;
    for (int i : order) {
      nucleus.push_back(i);
      kept += p[i];
      cum += p[i] / mass;
      if (cum >= 0.7) break;
    }
    ASSERT_GE(nucleus.size(), 2u);
    ASSERT_LT(nucleus.size(), order.size());
    for (int i : nucleus) want[i] = p[i] / kept;
    ExpectFrequencies(cfg, kLogits, want, 200000);
  }
}

// top_p alone on a large vocabulary (the path that finds the nucleus through probability
// buckets instead of sorting): every draw lies in the reference nucleus (the double softmax's
// tokens by logit, then index, up to the first cumulative mass >= top_p; one more token of slack
// at its end for float rounding), and every token of it but the last is drawn about as often as
// its share of the nucleus says. Logits with ties (repeated values) and several nucleus sizes.
TEST(Sampler, TopPAloneOnALargeVocabularyDrawsTheNucleus) {
  std::mt19937 rng(7);
  std::normal_distribution<float> g(0.0f, 1.5f);
  std::vector<float> logits(3000);
  for (float& x : logits) x = std::round(g(rng) * 64.0f) / 64.0f;  // many equal logits
  const std::vector<double> p = Probabilities(logits, 1.0);
  std::vector<int> order(p.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(),
            [&](int a, int b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); });
  for (float top_p : {0.05f, 0.5f, 0.9f, 0.999f}) {
    size_t n = 0;
    double cum = 0;
    while (n < order.size() && cum < top_p) cum += p[order[n++]];
    std::vector<int> rank(p.size());
    for (size_t i = 0; i < order.size(); ++i) rank[order[i]] = static_cast<int>(i);
    SamplerConfig cfg;
    cfg.temp = 1.0f;
    cfg.top_k = 0;
    cfg.top_p = top_p;
    cfg.seed = 11;
    Sampler s(cfg);
    const int draws = 40000;
    std::vector<int> count(p.size(), 0);
    for (int i = 0; i < draws; ++i) {
      const int id = s.Sample(logits.data(), static_cast<int>(logits.size()));
      ASSERT_GE(id, 0);
      ASSERT_LT(static_cast<size_t>(rank[id]), n + 1) << "top_p " << top_p << ": token " << id << " is outside the nucleus";
      ++count[id];
    }
    for (size_t r = 0; r + 1 < n; ++r) {
      const int id = order[r];
      const double want = p[id] / cum;
      EXPECT_NEAR(static_cast<double>(count[id]) / draws, want, 5 * std::sqrt(want * (1 - want) / draws) + 2e-4)
          << "top_p " << top_p << " token " << id;
    }
  }
}

TEST(Sampler, SameSeedSameTokensOtherSeedOtherTokens) {
  std::mt19937 rng(1);
  std::normal_distribution<float> g(0.0f, 2.0f);
  std::vector<float> logits(32000);
  for (float& x : logits) x = g(rng);
  for (int top_k : {0, 40}) {
    SamplerConfig cfg;
    cfg.temp = 1.0f;
    cfg.top_k = top_k;
    cfg.top_p = top_k ? 0.95f : 1.0f;
    cfg.seed = 42;
    Sampler a(cfg), b(cfg);
    cfg.seed = 43;
    Sampler c(cfg);
    int same_seed = 0, other_seed = 0;
    for (int i = 0; i < 200; ++i) {
      const int x = a.Sample(logits.data(), 32000);
      same_seed += x == b.Sample(logits.data(), 32000);
      other_seed += x == c.Sample(logits.data(), 32000);
    }
    EXPECT_EQ(same_seed, 200);
    EXPECT_LT(other_seed, 100);
  }
}

}  // namespace
}  // namespace moe
