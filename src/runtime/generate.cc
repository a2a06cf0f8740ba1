#include "runtime/generate.h"

#include <chrono>
#include <cmath>
#include <condition_variable>
#include <limits>
#include <mutex>

#include "runtime/engine.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe {

namespace {
using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); }
}  // namespace

void ValidateGenerateOptions(const GenerateOptions& o, int n_vocab) {
  const SamplerConfig& s = o.sampler;
  if (!std::isfinite(s.temp) || s.temp < 0 || s.temp > 1000)
    Fail("temperature %g must be a number in [0, 1000] (0 = greedy)", s.temp);
  if (s.top_k < 0) Fail("top_k %d must be >= 0 (0 = the whole vocabulary)", s.top_k);
  if (!std::isfinite(s.top_p) || s.top_p <= 0 || s.top_p > 1)
    Fail("top_p %g must be in (0, 1] (1 = off)", s.top_p);
  if (!std::isfinite(s.min_p) || s.min_p < 0 || s.min_p > 1) Fail("min_p %g must be in [0, 1] (0 = off)", s.min_p);
  if (!std::isfinite(s.presence_penalty) || std::fabs(s.presence_penalty) > 2)
    Fail("presence_penalty %g must be in [-2, 2] (0 = off)", s.presence_penalty);
  if (!std::isfinite(s.frequency_penalty) || std::fabs(s.frequency_penalty) > 2)
    Fail("frequency_penalty %g must be in [-2, 2] (0 = off)", s.frequency_penalty);
  for (const auto& [id, bias] : s.logit_bias) {
    if (id < 0 || id >= n_vocab) Fail("logit_bias names token %d, outside the vocabulary of %d tokens", id, n_vocab);
    if (!std::isfinite(bias) || std::fabs(bias) > 100) Fail("logit_bias %g for token %d must be in [-100, 100]", bias, id);
  }
  if (o.n_predict < 0) Fail("the number of tokens to generate (%d) must be >= 0", o.n_predict);
  if (o.top_logprobs < 0 || o.top_logprobs > n_vocab)
    Fail("top_logprobs %d must be in 0..%d (the vocabulary)", o.top_logprobs, n_vocab);
}

void CheckKvFits(const ModelConfig& c, int64_t positions, const std::string& what, DType kv_type) {
  const double kv = static_cast<double>(positions) * static_cast<double>(c.KvBytesPerPosition(KvElementBytes(kv_type)));
  if (const uint64_t mem = PhysicalMemoryBytes(); mem > 0 && kv > static_cast<double>(mem))
    Fail("%s needs %.1f GiB of KV cache, more than this machine's %.1f GiB of memory (ask for fewer tokens, "
         "sequences or a smaller context)", what.c_str(), kv / 1073741824.0, static_cast<double>(mem) / 1073741824.0);
}

int ContextSize(const ModelConfig& c, int ctx, int n_prompt, int n_predict,
                const std::function<void(const std::string&)>& warn, DType kv_type) {
  if (ctx < 0) Fail("the context size %d must be >= 0 (0 = prompt + tokens to generate)", ctx);
  const int64_t need = static_cast<int64_t>(n_prompt) + n_predict + 1;
  if (ctx > 0 && ctx < n_prompt + 1)
    Fail("the prompt has %d tokens, more than the context size %d holds with one to generate", n_prompt, ctx);
  const int64_t n = ctx > 0 ? ctx : need;
  if (n > std::numeric_limits<int32_t>::max() / 2)
    Fail("a context of %lld tokens is more than moe.cpp supports", static_cast<long long>(n));
  CheckKvFits(c, n, StrFormat("a context of %lld tokens", static_cast<long long>(n)), kv_type);
  if (warn && n > c.n_ctx_train)
    warn(StrFormat("a context of %lld tokens is longer than the model's training context (%u): past it the "
                   "model was never trained, and the prompt's attention costs grow with its square",
                   static_cast<long long>(n), c.n_ctx_train));
  return static_cast<int>(n);
}

Generator::Generator(const Model& model, ThreadPool& pool, int n_ctx, DType kv_type, Forward::MlaForm mla) {
  EngineConfig cfg;  // Engine::Submit validates the options
  cfg.kv_type = kv_type;
  cfg.mla = mla;
  cfg.parallel = 1;
  cfg.ctx = n_ctx;
  cfg.chunk = 256;
  cfg.batch_invariant = false;  // alone: the faster one-token kernels
  engine_ = std::make_unique<Engine>(model, pool, cfg);
}

Generator::~Generator() = default;

GenerateResult Generator::Run(const std::vector<int32_t>& prompt, const GenerateOptions& o,
                              const std::function<bool(int32_t, const std::string&)>& on_token) {
  GenerateResult r;
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  FinishInfo fin;
  Clock::time_point t1{};
  EngineRequest req;
  req.prompt = prompt;
  req.options = o;
  req.on_token = [&](const TokenEvent& ev) {
    if (r.tokens.empty()) t1 = Clock::now();
    r.tokens.push_back(ev.id);
    r.text += ev.piece;
    if (o.top_logprobs > 0) r.top.push_back(ev.top);
    return on_token ? on_token(ev.id, ev.piece) : true;
  };
  req.on_finish = [&](const FinishInfo& f) {
    std::lock_guard<std::mutex> lock(mu);
    fin = f;
    done = true;
    cv.notify_all();
  };
  const Clock::time_point t0 = Clock::now();
  engine_->Submit(std::move(req));
  {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return done; });
  }
  const auto t2 = Clock::now();
  if (fin.reason == "error") Fail("%s", fin.error.c_str());
  if (r.tokens.empty()) t1 = t2;
  r.prefill_s = Seconds(t0, t1);
  r.decode_s = Seconds(t1, t2);
  r.cached_tokens = fin.cached_tokens;
  return r;
}

GenerateResult Generate(const Model& model, ThreadPool& pool, int n_ctx, const std::vector<int32_t>& prompt,
                        const GenerateOptions& o, const std::function<bool(int32_t, const std::string&)>& on_token,
                        DType kv_type, Forward::MlaForm mla) {
  Generator g(model, pool, n_ctx, kv_type, mla);
  return g.Run(prompt, o, on_token);
}

}  // namespace moe
