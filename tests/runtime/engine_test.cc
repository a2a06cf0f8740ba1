// The serving engine's batch invariance: requests submitted together, whose prompt chunks share
// steps (and whose prompts are longer than a chunk, so they take both attention paths, the
// per-token one under 32 new tokens and the batched one above), give bitwise the tokens and
// log-probabilities they give alone; and requests that start from an earlier request's cached
// prompt prefix give bitwise what they give from an empty cache.
#include "runtime/engine.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <condition_variable>
#include <cstring>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "model/model.h"
#include "test_models.h"
#include "util/threadpool.h"

namespace moe {
namespace {

struct Outcome {
  std::vector<int32_t> ids;
  std::vector<double> logprobs;
  std::string reason;
  int cached_tokens = 0;
  std::vector<std::vector<std::pair<int, double>>> top;  // top_logprobs per token
};

// Runs one request to its end.
Outcome RunOne(Engine& engine, EngineRequest r) {
  Outcome out;
  std::mutex mu;
  std::condition_variable cv;
  bool finished = false;
  r.on_token = [&out](const TokenEvent& ev) {
    out.ids.push_back(ev.id);
    out.logprobs.push_back(ev.logprob);
    out.top.push_back(ev.top);
    return true;
  };
  r.on_finish = [&](const FinishInfo& f) {
    std::lock_guard<std::mutex> lock(mu);
    out.reason = f.reason + f.error;
    out.cached_tokens = f.cached_tokens;
    finished = true;
    cv.notify_all();
  };
  engine.Submit(std::move(r));
  std::unique_lock<std::mutex> lock(mu);
  cv.wait(lock, [&] { return finished; });
  return out;
}

void ExpectSameBits(const Outcome& got, const Outcome& want, const std::string& what) {
  ASSERT_EQ(got.reason, want.reason) << what;
  ASSERT_EQ(got.ids, want.ids) << what;
  ASSERT_EQ(got.logprobs.size(), want.logprobs.size()) << what;
  for (size_t k = 0; k < want.logprobs.size(); ++k)
    EXPECT_EQ(std::memcmp(&got.logprobs[k], &want.logprobs[k], sizeof(double)), 0)
        << what << " token " << k << ": " << got.logprobs[k] << " vs " << want.logprobs[k];
}

// Runs the requests through one engine and returns what each got. They all wait in the queue
// before the engine takes any of them: a first one-token request holds the engine's thread in its
// token callback until they are submitted (so the steps they share do not depend on timing).
std::vector<Outcome> RunTogether(Engine& engine, const std::vector<EngineRequest>& reqs) {
  std::vector<Outcome> out(reqs.size());
  std::mutex mu;
  std::condition_variable cv;
  size_t finished = 0;
  bool all_queued = false, gate_done = false;
  EngineRequest gate;
  gate.prompt = {1, 2, 3};
  gate.options.n_predict = 1;
  gate.on_token = [&](const TokenEvent&) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return all_queued; });
    return true;
  };
  gate.on_finish = [&](const FinishInfo&) {
    std::lock_guard<std::mutex> lock(mu);
    gate_done = true;
    cv.notify_all();
  };
  engine.Submit(std::move(gate));
  for (size_t i = 0; i < reqs.size(); ++i) {
    EngineRequest r = reqs[i];
    r.on_token = [&out, i](const TokenEvent& ev) {  // the engine's thread only
      out[i].ids.push_back(ev.id);
      out[i].logprobs.push_back(ev.logprob);
      return true;
    };
    r.on_finish = [&, i](const FinishInfo& f) {
      std::lock_guard<std::mutex> lock(mu);
      out[i].reason = f.reason + f.error;
      ++finished;
      cv.notify_all();
    };
    engine.Submit(std::move(r));
  }
  std::unique_lock<std::mutex> lock(mu);
  all_queued = true;
  cv.notify_all();
  cv.wait(lock, [&] { return finished == reqs.size() && gate_done; });
  return out;
}

TEST(Engine, RequestsTogetherAreBitwiseTheirOwn) {
  // F32 weights, so activations stay float: a prompt cut differently (the other attention path)
  // shows in the bits.
  InitOptions o = TestModelOptions(Arch::kLlama, DType::kF32, 2, 128, 128, 4, 2, 7);
  o.config.n_ctx_train = 256;
  const std::string path = WriteTestModel(o, "engine", "engine_f32");
  auto model = Model::Load(path);
  ThreadPool pool(2);

  // Prompts of 5 to 110 tokens against chunks of 48: the long ones are cut 48 + 48 + rest, and
  // the short ones fill the rest of a step's budget around them.
  std::mt19937 rng(11);
  std::vector<EngineRequest> reqs;
  for (int len : {9, 70, 5, 100, 33, 12, 110, 47, 20, 64}) {
    EngineRequest r;
    std::uniform_int_distribution<int> tok(1, 299);
    for (int i = 0; i < len; ++i) r.prompt.push_back(tok(rng));
    r.options.n_predict = 6;
    r.options.ignore_eos = true;
    r.options.sampler.temp = reqs.size() % 2 ? 0.9f : 0.0f;
    r.options.sampler.top_k = 0;
    r.options.sampler.top_p = 1.0f;
    r.options.sampler.seed = 100 + reqs.size();
    r.logprobs = true;
    reqs.push_back(std::move(r));
  }
  EngineConfig cfg;
  cfg.parallel = 8;
  cfg.ctx = 160;
  cfg.chunk = 48;
  std::vector<Outcome> together;
  {
    Engine engine(*model, pool, cfg);
    together = RunTogether(engine, reqs);
    const EngineStats st = engine.Stats();
    // Prompt chunks shared steps: one chunk per step would take at least 22 (the gate's step,
    // 16 chunks, then 5 more tokens of the last request).
    EXPECT_LT(st.steps, 22);
  }
  for (size_t i = 0; i < reqs.size(); ++i) {
    Engine engine(*model, pool, cfg);
    const Outcome alone = RunTogether(engine, {reqs[i]})[0];
    ASSERT_EQ(alone.reason, "length") << i;
    ExpectSameBits(together[i], alone, "request " + std::to_string(i));
  }
}

// A conversation's turns through one engine: each later prompt starts with an earlier one (or a
// part of it), so it takes that request's cache and evaluates only the rest. Every result must be
// bitwise the one an engine with empty caches gives, and the reused count must be the common
// prefix short of the last prompt token, in whole chunks. F32 weights keep the activations float,
// so a row computed in another chunk (the other attention path) would show in the bits; the
// deepseek2 case's chunks of 32 take MLA's expanded form (f32 attn_k_b / attn_v_b), shorter
// ones the absorbed form.
TEST(Engine, ReusedPromptPrefixesGiveTheBitsOfAnEmptyCache) {
  struct Case {
    std::string name;
    InitOptions init;
    int chunk;
    DType kv;
  };
  InitOptions llama = TestModelOptions(Arch::kLlama, DType::kF32, 2, 128, 128, 4, 2, 9);
  llama.config.n_ctx_train = 256;
  InitOptions deepseek = DeepseekTestOptions(DType::kF32, 48, false, true);
  deepseek.config.n_ctx_train = 256;
  const std::vector<Case> cases = {{"llama_f32", llama, 16, DType::kF32},
                                   {"llama_f16cache", llama, 16, DType::kF16},
                                   {"deepseek2", deepseek, 32, DType::kF32}};
  ThreadPool pool(2);
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    auto model = Model::Load(WriteTestModel(c.init, "engine", "prefix_" + c.name));
    EngineConfig cfg;
    cfg.parallel = 2;
    cfg.ctx = 200;
    cfg.chunk = c.chunk;
    cfg.kv_type = c.kv;
    // Prompt tokens from 1..199; the tokens that continue a prefix differently from 200..299, so
    // a prefix never runs on by chance.
    std::mt19937 rng(21);
    const auto tokens = [&](int n, int lo, int hi) {
      std::vector<int32_t> t(static_cast<size_t>(n));
      for (int32_t& x : t) x = std::uniform_int_distribution<int>(lo, hi)(rng);
      return t;
    };
    const auto join = [](std::vector<int32_t> a, const std::vector<int32_t>& b) {
      a.insert(a.end(), b.begin(), b.end());
      return a;
    };
    const auto request = [&](std::vector<int32_t> prompt, bool reuse, uint64_t seed) {
      EngineRequest r;
      r.prompt = std::move(prompt);
      r.options.n_predict = 6;
      r.options.ignore_eos = true;
      r.options.sampler.temp = seed % 2 ? 0.9f : 0.0f;
      r.options.sampler.top_k = 0;
      r.options.sampler.top_p = 1.0f;
      r.options.sampler.seed = seed;
      r.logprobs = true;
      r.reuse_prefix = reuse;
      return r;
    };
    const auto whole_chunks = [&](size_t common, size_t prompt) {
      return static_cast<int>(std::min(common, prompt - 1) / c.chunk * c.chunk);
    };
    Engine engine(*model, pool, cfg);
    const std::vector<int32_t> a = tokens(50, 1, 199);
    const Outcome ra = RunOne(engine, request(a, true, 1));
    EXPECT_EQ(ra.cached_tokens, 0);
    // The next turn: the first prompt, its answer and more (its cache keeps a's whole chunks).
    const std::vector<int32_t> b = join(join(a, ra.ids), tokens(20, 200, 299));
    // b's first 40 tokens and others (b's cache shares 40); a's first 48 tokens exactly (the
    // cache it finds is cc's, which shares a's first 40); b without reuse (a second cache, made
    // while there are fewer than the slots, and left empty); b with reuse (it finds d's whole
    // chunks, not its own from the request before); an unrelated prompt (no reuse: the cache
    // idle longest, the empty one, is the one cleared); b and more (b's whole chunks are still
    // there).
    const std::vector<int32_t> cc = join(std::vector<int32_t>(b.begin(), b.begin() + 40), tokens(9, 200, 299));
    const std::vector<int32_t> d(a.begin(), a.begin() + 48);
    const std::vector<int32_t> e = tokens(30, 1, 199);
    const std::vector<int32_t> f = join(b, tokens(5, 200, 299));
    const auto chunks_of = [&](const std::vector<int32_t>& p) { return p.size() / c.chunk * c.chunk; };
    struct Turn {
      std::vector<int32_t> prompt;
      bool reuse;
      int want_cached;
    };
    const std::vector<Turn> turns = {{b, true, whole_chunks(a.size(), b.size())},
                                     {cc, true, whole_chunks(40, cc.size())},
                                     {d, true, whole_chunks(40, d.size())},
                                     {b, false, 0},
                                     {b, true, whole_chunks(chunks_of(d), b.size())},
                                     {e, true, 0},
                                     {f, true, whole_chunks(chunks_of(b), f.size())}};
    int64_t cached = 0;
    for (size_t i = 0; i < turns.size(); ++i) {
      const Outcome got = RunOne(engine, request(turns[i].prompt, turns[i].reuse, 10 + i));
      EXPECT_EQ(got.cached_tokens, turns[i].want_cached) << "turn " << i;
      cached += got.cached_tokens;
      Engine fresh(*model, pool, cfg);
      const Outcome want = RunOne(fresh, request(turns[i].prompt, true, 10 + i));
      ASSERT_EQ(want.cached_tokens, 0);
      ASSERT_EQ(want.reason, "length");
      ExpectSameBits(got, want, "turn " + std::to_string(i));
    }
    EXPECT_GT(turns[0].want_cached, 0);
    EXPECT_EQ(engine.Stats().prompt_tokens_cached, cached);
  }
}

// Prefixes are shared only between requests with the same cache_salt, and not at all without
// prefix reuse.
TEST(Engine, PrefixesAreSharedOnlyUnderTheSameSalt) {
  InitOptions o = TestModelOptions(Arch::kLlama, DType::kF32, 2, 128, 128, 4, 2, 9);
  auto model = Model::Load(WriteTestModel(o, "engine", "engine_salt"));
  ThreadPool pool(2);
  std::mt19937 rng(8);
  std::vector<int32_t> a(50), b;
  for (int32_t& t : a) t = std::uniform_int_distribution<int>(1, 299)(rng);
  b = a;
  for (int i = 0; i < 20; ++i) b.push_back(std::uniform_int_distribution<int>(1, 299)(rng));
  const auto request = [](const std::vector<int32_t>& prompt, const std::string& salt) {
    EngineRequest r;
    r.prompt = prompt;
    r.options.n_predict = 2;
    r.options.sampler.temp = 0.0f;
    r.cache_salt = salt;
    return r;
  };
  EngineConfig cfg;
  cfg.parallel = 2;
  cfg.ctx = 100;
  cfg.chunk = 16;
  {
    Engine engine(*model, pool, cfg);
    EXPECT_EQ(RunOne(engine, request(a, "alice")).cached_tokens, 0);
    EXPECT_EQ(RunOne(engine, request(b, "bob")).cached_tokens, 0) << "another salt's prefix was reused";
    EXPECT_EQ(RunOne(engine, request(b, "alice")).cached_tokens, 48);
    EXPECT_EQ(RunOne(engine, request(b, "")).cached_tokens, 0);
  }
  cfg.prefix_reuse = false;
  Engine engine(*model, pool, cfg);
  EXPECT_EQ(RunOne(engine, request(a, "")).cached_tokens, 0);
  EXPECT_EQ(RunOne(engine, request(b, "")).cached_tokens, 0) << "reused with prefix_reuse off";
}

// Logit bias and OpenAI's penalties through the engine: at every generated position the reported
// distribution over the whole vocabulary is the model's own there, shifted by each token's bias
// minus count x frequency_penalty + [count > 0] x presence_penalty for the tokens generated
// before it (up to the normaliser). The model's own comes from the same engine without either,
// on the prompt extended by the tokens generated so far.
TEST(Engine, LogitBiasAndPenaltiesShiftTheDistributionAsOpenAiDefines) {
  InitOptions o = TestModelOptions(Arch::kLlama, DType::kF32, 2, 128, 128, 4, 2, 7);
  o.config.n_ctx_train = 256;
  auto model = Model::Load(WriteTestModel(o, "engine", "engine_penalties"));
  const int V = static_cast<int>(model->config().n_vocab);
  ThreadPool pool(2);
  EngineConfig cfg;
  cfg.parallel = 2;
  cfg.ctx = 64;
  Engine engine(*model, pool, cfg);
  std::mt19937 rng(5);
  std::vector<int32_t> prompt(12);
  for (int32_t& t : prompt) t = std::uniform_int_distribution<int>(1, V - 1)(rng);
  EngineRequest r;
  r.prompt = prompt;
  r.options.n_predict = 10;
  r.options.ignore_eos = true;
  r.options.top_logprobs = V;
  r.options.sampler.temp = 0.9f;
  r.options.sampler.top_k = 0;
  r.options.sampler.top_p = 1.0f;
  r.options.sampler.seed = 4;
  r.options.sampler.presence_penalty = 0.5f;
  r.options.sampler.frequency_penalty = 0.7f;
  r.options.sampler.logit_bias = {{7, 4.0f}, {8, 3.5f}, {20, -2.0f}};  // 7 and 8 come back: counts grow
  r.logprobs = true;
  const Outcome got = RunOne(engine, r);
  ASSERT_EQ(got.reason, "length");
  std::map<int, int> count;
  int most = 0;
  for (size_t k = 0; k < got.ids.size(); ++k) {
    // The model's own distribution at position k.
    EngineRequest raw;
    raw.prompt = prompt;
    raw.prompt.insert(raw.prompt.end(), got.ids.begin(), got.ids.begin() + static_cast<std::ptrdiff_t>(k));
    raw.options.n_predict = 1;
    raw.options.top_logprobs = V;
    raw.options.sampler.temp = 0.0f;
    raw.logprobs = true;
    const Outcome own = RunOne(engine, raw);
    ASSERT_EQ(own.top.size(), 1u);
    std::vector<double> shifted(V), model_lp(V);
    ASSERT_EQ(got.top[k].size(), static_cast<size_t>(V));
    for (const auto& [id, lp] : got.top[k]) shifted[id] = lp;
    for (const auto& [id, lp] : own.top[0]) model_lp[id] = lp;
    // The reported log-probability of the drawn token is its entry in the shifted distribution.
    EXPECT_EQ(got.logprobs[k], shifted[got.ids[k]]) << "position " << k;
    double lo = 1e300, hi = -1e300;
    for (int j = 0; j < V; ++j) {
      double want = 0;
      for (const auto& [id, bias] : r.options.sampler.logit_bias)
        if (id == j) want += bias;
      if (auto it = count.find(j); it != count.end())
        want -= it->second * double(r.options.sampler.frequency_penalty) + r.options.sampler.presence_penalty;
      const double c = shifted[j] - model_lp[j] - want;  // the same for every token: the normalisers' difference
      lo = std::min(lo, c);
      hi = std::max(hi, c);
    }
    EXPECT_LT(hi - lo, 2e-4) << "position " << k;
    most = std::max(most, ++count[got.ids[k]]);
  }
  EXPECT_GE(most, 2) << "no token came twice: the frequency penalty was not exercised";
}

}  // namespace
}  // namespace moe
