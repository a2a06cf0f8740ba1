// The serving engine's batch invariance: requests submitted together, whose prompt chunks share
// steps (and whose prompts are longer than a chunk, so they take both attention paths, the
// per-token one under 32 new tokens and the batched one above), give bitwise the tokens and
// log-probabilities they give alone.
#include "runtime/engine.h"

#include <gtest/gtest.h>

#include <condition_variable>
#include <cstring>
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
};

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
    ASSERT_EQ(together[i].reason, "length") << i;
    ASSERT_EQ(alone.reason, "length") << i;
    ASSERT_EQ(together[i].ids, alone.ids) << "request " << i;
    ASSERT_EQ(together[i].logprobs.size(), alone.logprobs.size());
    for (size_t k = 0; k < alone.logprobs.size(); ++k)
      EXPECT_EQ(std::memcmp(&together[i].logprobs[k], &alone.logprobs[k], sizeof(double)), 0)
          << "request " << i << " token " << k << ": " << together[i].logprobs[k] << " vs " << alone.logprobs[k];
  }
}

}  // namespace
}  // namespace moe
