#include "runtime/generate.h"

#include <chrono>
#include <cmath>
#include <limits>

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
  if (o.n_predict < 0) Fail("the number of tokens to generate (%d) must be >= 0", o.n_predict);
  if (o.top_logprobs < 0 || o.top_logprobs > n_vocab)
    Fail("top_logprobs %d must be in 0..%d (the vocabulary)", o.top_logprobs, n_vocab);
}

int ContextSize(const ModelConfig& c, int ctx, int n_prompt, int n_predict,
                const std::function<void(const std::string&)>& warn) {
  if (ctx < 0) Fail("the context size %d must be >= 0 (0 = prompt + tokens to generate)", ctx);
  const int64_t need = static_cast<int64_t>(n_prompt) + n_predict + 1;
  if (ctx > 0 && ctx < n_prompt + 1)
    Fail("the prompt has %d tokens, more than the context size %d holds with one to generate", n_prompt, ctx);
  const int64_t n = ctx > 0 ? ctx : need;
  if (n > std::numeric_limits<int32_t>::max() / 2)
    Fail("a context of %lld tokens is more than moe.cpp supports", static_cast<long long>(n));
  const uint64_t kv = static_cast<uint64_t>(n) * c.KvBytesPerPosition();
  const uint64_t mem = PhysicalMemoryBytes();
  if (mem > 0 && kv > mem)
    Fail("a context of %lld tokens needs %.1f GiB of KV cache, more than this machine's %.1f GiB of memory "
         "(ask for fewer tokens or a smaller context)", static_cast<long long>(n), kv / 1073741824.0, mem / 1073741824.0);
  if (warn && n > c.n_ctx_train)
    warn(StrFormat("a context of %lld tokens is longer than the model's training context (%u): past it the "
                   "model was never trained, and the prompt's attention costs grow with its square",
                   static_cast<long long>(n), c.n_ctx_train));
  return static_cast<int>(n);
}

GenerateResult Generate(Forward& fwd, const Tokenizer& tok, const std::vector<int32_t>& prompt,
                        const GenerateOptions& o, const std::function<bool(int32_t, const std::string&)>& on_token) {
  const int V = static_cast<int>(fwd.n_vocab());
  ValidateGenerateOptions(o, V);
  GenerateResult r;
  Sampler sampler(o.sampler);
  std::vector<float> logits;
  const auto t0 = Clock::now();
  fwd.Eval(prompt.data(), static_cast<int>(prompt.size()), false, &logits);
  const auto t1 = Clock::now();
  for (int i = 0; i < o.n_predict; ++i) {
    if (o.top_logprobs > 0) r.top.push_back(TopLogprobs(logits.data(), V, o.top_logprobs));
    const int32_t id = sampler.Sample(logits.data(), V);
    r.tokens.push_back(id);
    const std::string piece = tok.HasVocab() ? tok.TokenToPiece(id) : std::string();
    r.text += piece;
    const bool go_on = on_token ? on_token(id, piece) : true;
    if (!o.ignore_eos && tok.IsEog(id)) {
      r.stopped_by_eog = true;
      break;
    }
    if (!go_on) break;
    if (i + 1 < o.n_predict) fwd.Eval(&id, 1, false, &logits);
  }
  const auto t2 = Clock::now();
  r.prefill_s = Seconds(t0, t1);
  r.decode_s = Seconds(t1, t2);
  return r;
}

}  // namespace moe
