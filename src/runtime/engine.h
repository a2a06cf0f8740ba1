// Continuous batching: many generation requests through one Forward. Requests join and leave at
// token boundaries; every step evaluates the next token of each decoding request plus at most
// `chunk` prompt tokens of the requests still reading their prompts, oldest first, each prompt
// cut into chunks of `chunk` tokens from its start (SARATHI-style chunked prefill; short prompts
// share a step's budget), all in one Forward::EvalBatch, so an expert's weights are read once
// per step for every token that chose it. A request's result is bitwise the same alone or beside
// any others: each has its own KV cache and seeded sampler, its prompt is always cut into the
// same chunks, and the kernels run batch-invariant (kernels::SetBatchInvariant).
//
// Prefix reuse: a finished request's cache keeps the rows of its prompt's whole chunks, and a
// later request whose prompt starts with the same tokens (a conversation's next turn, a shared
// system prompt) takes that cache and evaluates only the rest. It reuses whole chunks only, and
// never the chunk that holds its own last prompt token: every row it reuses was computed from
// the same tokens in the same chunk as its own prompt's chunks would compute it, so its result
// is bitwise the same as with an empty cache. Only requests with the same cache_salt share
// prefixes; EngineConfig::prefix_reuse off shares none.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "model/forward.h"
#include "runtime/generate.h"

namespace moe {

struct EngineConfig {
  int parallel = 4;    // sequences decoding at once (slots)
  int ctx = 0;         // KV cache positions per sequence (0: the model's context, at most 4096)
  int chunk = 64;      // prompt tokens per step (every prompt is cut into chunks of this size)
  int max_queue = 256; // waiting requests beyond the slots; more are refused
  bool batch_invariant = true;  // kernels::SetBatchInvariant (a single-stream run may skip it)
  DType kv_type = DType::kF32;  // the sequences' KV caches: kF32 or kF16 (KvCache)
  bool prefix_reuse = true;     // requests may reuse earlier requests' cached prompt prefixes
  Forward::MlaForm mla = Forward::MlaForm::kAuto;  // deepseek2's attention (Forward::SetMlaForm)
};

// One generated token as the client sees it.
struct TokenEvent {
  int32_t id = 0;
  std::string piece;
  std::vector<std::pair<int, double>> top;  // top_logprobs, when asked
  double logprob = 0;                      // of the chosen token (natural log), when asked
};

// How a request ended.
struct FinishInfo {
  std::string reason;  // "stop" (end-of-generation token, or on_token said stop), "length", "error"
  std::string error;   // when reason == "error"
  int prompt_tokens = 0, completion_tokens = 0;
  int cached_tokens = 0;  // prompt tokens whose cache rows came from an earlier request
};

struct EngineRequest {
  std::vector<int32_t> prompt;
  GenerateOptions options;
  bool logprobs = false;  // TokenEvent::logprob wanted (also when options.top_logprobs > 0)
  // May start from a cached prompt prefix and leave its own for later requests (either way the
  // result is the same); false evaluates the whole prompt and leaves nothing behind.
  bool reuse_prefix = true;
  // Prefixes are shared only between requests with the same salt (vLLM's cache_salt): a request
  // can tell from its cached count or its speed whether an earlier one began as it does, so
  // users who must not learn of each other's prompts get different salts.
  std::string cache_salt;
  // Called from the engine's thread for each token; return false to stop the request (a stop
  // sequence matched, the client went away).
  std::function<bool(const TokenEvent&)> on_token;
  std::function<void(const FinishInfo&)> on_finish;  // exactly once
};

// Counters for /metrics.
struct EngineStats {
  int64_t requests_finished = 0, requests_failed = 0;
  int64_t prompt_tokens = 0, generated_tokens = 0;
  int64_t prompt_tokens_cached = 0;     // prompt tokens not evaluated: reused cache rows
  int64_t steps = 0, batch_tokens = 0;  // sums over steps (mean batch = batch_tokens / steps)
  int queue_depth = 0, active = 0, last_batch = 0;
  double busy_seconds = 0;              // time spent in steps
  std::vector<std::vector<int64_t>> expert_load;  // [layer][expert] routed tokens since start
};

class Engine {
 public:
  Engine(const Model& model, ThreadPool& pool, const EngineConfig& cfg);
  ~Engine();  // stops the loop; unfinished requests finish with reason "error"

  // Validates and queues a request (throws moe::Error with the reason when it cannot run: an
  // option out of range, a prompt that does not fit the context, a full queue).
  void Submit(EngineRequest r);
  EngineStats Stats() const;
  const EngineConfig& config() const { return cfg_; }
  int ctx() const { return ctx_; }

 private:
  struct Slot {
    EngineRequest req;
    std::unique_ptr<KvCache> cache;
    std::unique_ptr<Sampler> sampler;
    size_t prefilled = 0;   // prompt tokens in the cache (reused or evaluated)
    int cached = 0;         // of which reused from an earlier request
    int generated = 0;
    int32_t next = -1;      // the token to evaluate next while decoding
    std::vector<float> logits;
    bool done = false;      // finished (on_finish called)
    bool failed = false;    // finished with an error
  };
  // A cache no request holds, with the prompt tokens whose rows it keeps (whole chunks).
  struct IdleCache {
    std::unique_ptr<KvCache> cache;
    std::vector<int32_t> tokens;
    std::string salt;       // the salt of the request that left it
    uint64_t last_use = 0;  // its request's place in the order of finishing: the oldest goes first
  };
  void Loop();
  void Admit(Slot& s, std::vector<IdleCache>& idle, int& n_caches);
  // Prompt positions of `prompt` whose rows `cached` (a prompt's whole chunks) can give.
  size_t Reusable(const std::vector<int32_t>& cached, const std::vector<int32_t>& prompt) const;
  void Step(std::vector<std::unique_ptr<Slot>>& active);
  void Finish(Slot& s, const std::string& reason, const std::string& error = "");

  const Model& model_;
  ThreadPool& pool_;
  EngineConfig cfg_;
  int ctx_ = 0;
  Forward fwd_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::deque<EngineRequest> queue_;
  bool stop_ = false;
  EngineStats stats_;
  bool invariant_before_ = false;  // kernels::BatchInvariant() before this engine (restored after)
  std::thread thread_;
};

}  // namespace moe
