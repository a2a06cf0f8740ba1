#include "runtime/engine.h"

#include <algorithm>
#include <chrono>

#include "kernels/kernels.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe {

namespace {
int ResolveEngineCtx(const ModelConfig& c, const EngineConfig& cfg) {
  if (cfg.parallel < 1 || cfg.parallel > 256) Fail("--parallel %d must be in 1..256", cfg.parallel);
  if (cfg.chunk < 1 || cfg.chunk > 4096) Fail("the prefill chunk %d must be in 1..4096", cfg.chunk);
  if (cfg.max_queue < 0) Fail("the queue bound must be >= 0");
  if (cfg.ctx < 0) Fail("--ctx-size %d must be >= 0 (0 = the model's context, at most 4096)", cfg.ctx);
  const int ctx = cfg.ctx > 0 ? cfg.ctx : DefaultContext(c);
  CheckKvFits(c, static_cast<int64_t>(ctx) * cfg.parallel,
              StrFormat("--parallel %d sequences of --ctx-size %d", cfg.parallel, ctx), cfg.kv_type);
  return ctx;
}
using Clock = std::chrono::steady_clock;
}  // namespace

Engine::Engine(const Model& model, ThreadPool& pool, const EngineConfig& cfg)
    : model_(model), pool_(pool), cfg_(cfg), ctx_(ResolveEngineCtx(model.config(), cfg)),
      fwd_(model, pool, ctx_, cfg.parallel + cfg.chunk, cfg.kv_type) {
  fwd_.SetMlaForm(cfg.mla);
  invariant_before_ = kernels::BatchInvariant();
  if (cfg.batch_invariant) kernels::SetBatchInvariant(true);
  const ModelConfig& c = model.config();
  stats_.expert_load.assign(c.n_layer, std::vector<int64_t>(c.n_expert, 0));
  fwd_.SetRoutingObserver([this](int layer, int, const float*, const float*, const int32_t*, const RoutingPlan& plan) {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<int64_t>& l = stats_.expert_load[layer];
    for (size_t e = 0; e < l.size() && e < plan.tokens_per_expert.size(); ++e) l[e] += plan.tokens_per_expert[e];
  });
  thread_ = std::thread([this] { Loop(); });
}

Engine::~Engine() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  cv_.notify_all();
  thread_.join();
  kernels::SetBatchInvariant(invariant_before_);
}

void Engine::Submit(EngineRequest r) {
  const int V = static_cast<int>(model_.config().n_vocab);
  ValidateGenerateOptions(r.options, V);
  if (r.prompt.empty()) Fail("the prompt is empty");
  for (int32_t t : r.prompt)
    if (t < 0 || t >= V) Fail("token id %d is out of range: the vocabulary has %d tokens", t, V);
  const int64_t need = static_cast<int64_t>(r.prompt.size()) + std::max(r.options.n_predict, 1) - 1;
  if (need > ctx_)
    Fail("the prompt (%zu tokens) and max_tokens (%d) need %lld positions, more than the context of %d",
         r.prompt.size(), r.options.n_predict, static_cast<long long>(need), ctx_);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (stop_) Fail("the server is shutting down");
    if (static_cast<int>(queue_.size()) >= cfg_.max_queue) Fail("the queue is full (%d waiting requests)", cfg_.max_queue);
    queue_.push_back(std::move(r));
    stats_.queue_depth = static_cast<int>(queue_.size());
  }
  cv_.notify_one();
}

EngineStats Engine::Stats() const {
  std::lock_guard<std::mutex> lock(mu_);
  return stats_;
}

void Engine::Finish(Slot& s, const std::string& reason, const std::string& error) {
  FinishInfo f;
  f.reason = reason;
  f.error = error;
  f.prompt_tokens = static_cast<int>(s.req.prompt.size());
  f.completion_tokens = s.generated;
  f.cached_tokens = s.cached;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (reason == "error") {
      ++stats_.requests_failed;
    } else {
      ++stats_.requests_finished;
    }
  }
  s.done = true;
  s.failed = reason == "error";
  if (s.req.on_finish) s.req.on_finish(f);
}

size_t Engine::Reusable(const std::vector<int32_t>& cached, const std::vector<int32_t>& prompt) const {
  // The common prefix, short of the last prompt token (evaluated for its logits), in whole chunks:
  // the request's own chunks then start where they would start from an empty cache.
  const auto n = static_cast<std::ptrdiff_t>(std::min(cached.size(), prompt.size() - 1));
  const auto common = std::mismatch(cached.begin(), cached.begin() + n, prompt.begin()).first - cached.begin();
  return static_cast<size_t>(common) / cfg_.chunk * cfg_.chunk;
}

void Engine::Admit(Slot& s, std::vector<IdleCache>& idle, int& n_caches) {
  size_t pick = idle.size(), reuse = 0;
  if (s.req.reuse_prefix && cfg_.prefix_reuse) {
    for (size_t i = 0; i < idle.size(); ++i) {
      if (idle[i].salt != s.req.cache_salt) continue;
      const size_t r = Reusable(idle[i].tokens, s.req.prompt);
      if (r > reuse) pick = i, reuse = r;
    }
  }
  if (pick == idle.size() && n_caches >= cfg_.parallel && !idle.empty()) {
    // Nothing to reuse and every cache made: the one idle longest is cleared. (While there are
    // fewer caches than slots a new one is made, so the idle ones keep their prefixes.)
    pick = static_cast<size_t>(std::min_element(idle.begin(), idle.end(), [](const IdleCache& a, const IdleCache& b) {
                                 return a.last_use < b.last_use;
                               }) - idle.begin());
  }
  if (pick < idle.size()) {
    s.cache = std::move(idle[pick].cache);
    idle.erase(idle.begin() + static_cast<std::ptrdiff_t>(pick));
    s.cache->Truncate(static_cast<int>(reuse));
  } else {
    s.cache = std::make_unique<KvCache>(model_.config(), ctx_, cfg_.kv_type);
    ++n_caches;
  }
  s.prefilled = reuse;
  s.cached = static_cast<int>(reuse);
  s.sampler = std::make_unique<Sampler>(s.req.options.sampler);
  s.logits.resize(model_.config().n_vocab);
  std::lock_guard<std::mutex> lock(mu_);
  stats_.prompt_tokens_cached += static_cast<int64_t>(reuse);
}

void Engine::Loop() {
  std::vector<std::unique_ptr<Slot>> active;
  std::vector<IdleCache> idle;
  int n_caches = 0;
  uint64_t finished = 0;
  for (;;) {
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [&] { return stop_ || !queue_.empty() || !active.empty(); });
      if (stop_) break;
      while (static_cast<int>(active.size()) < cfg_.parallel && !queue_.empty()) {
        auto s = std::make_unique<Slot>();
        s->req = std::move(queue_.front());
        queue_.pop_front();
        active.push_back(std::move(s));
      }
      stats_.queue_depth = static_cast<int>(queue_.size());
      stats_.active = static_cast<int>(active.size());
    }
    for (auto& s : active)
      if (!s->cache) Admit(*s, idle, n_caches);
    Step(active);
    for (auto& s : active) {
      if (!s->done || !s->cache) continue;
      IdleCache c;
      c.cache = std::move(s->cache);
      c.last_use = ++finished;
      // The prompt's whole chunks, kept for later requests; none after a failed step (rows may be
      // half written) or from a request that asked for no reuse (it leaves nothing behind).
      if (!s->failed && s->req.reuse_prefix && cfg_.prefix_reuse) {
        const size_t keep = std::min(s->prefilled, s->req.prompt.size()) / cfg_.chunk * cfg_.chunk;
        c.tokens.assign(s->req.prompt.begin(), s->req.prompt.begin() + static_cast<std::ptrdiff_t>(keep));
        c.salt = s->req.cache_salt;
      }
      idle.push_back(std::move(c));
    }
    active.erase(std::remove_if(active.begin(), active.end(), [](const auto& s) { return s->done; }), active.end());
  }
  // Shutting down: everything still running or waiting ends with an error.
  for (auto& s : active) Finish(*s, "error", "the server is shutting down");
  std::deque<EngineRequest> left;
  {
    std::lock_guard<std::mutex> lock(mu_);
    left.swap(queue_);
  }
  for (EngineRequest& r : left) {
    Slot s;
    s.req = std::move(r);
    Finish(s, "error", "the server is shutting down");
  }
}

void Engine::Step(std::vector<std::unique_ptr<Slot>>& active) {
  const int V = static_cast<int>(model_.config().n_vocab);
  std::vector<SeqBatch> batch;
  std::vector<Slot*> who;
  std::vector<int> n_prompt;  // prompt tokens each entry evaluates (0: a decode token)
  // Prompt chunks share a budget of `chunk` tokens per step (running streams wait one chunk at
  // most), oldest first: several short prompts start in one step instead of one per step. Each
  // prompt is still cut at multiples of `chunk` from its start (a chunk that does not fit waits
  // whole for the next step), so its chunks never depend on the other requests.
  int prefill_left = cfg_.chunk;
  for (auto& sp : active) {
    Slot& s = *sp;
    const size_t np = s.req.prompt.size();
    if (s.prefilled < np) {
      const int n = static_cast<int>(std::min<size_t>(cfg_.chunk, np - s.prefilled));
      if (n > prefill_left) continue;
      prefill_left -= n;
      const bool last = s.prefilled + n == np;
      batch.push_back({s.cache.get(), s.req.prompt.data() + s.prefilled, n, last ? s.logits.data() : nullptr});
      n_prompt.push_back(n);
    } else {
      batch.push_back({s.cache.get(), &s.next, 1, s.logits.data()});
      n_prompt.push_back(0);
    }
    who.push_back(&s);
  }
  if (batch.empty()) return;
  int T = 0;
  for (const SeqBatch& b : batch) T += b.n;
  const auto t0 = Clock::now();
  try {
    fwd_.EvalBatch(batch.data(), static_cast<int>(batch.size()));
  } catch (const Error& e) {
    for (Slot* s : who) Finish(*s, "error", e.what());
    return;
  }
  int64_t prompt_done = 0, generated = 0;
  // Which entries sample a token now, then the sampling itself over the pool (each slot has its
  // own sampler; a full-vocabulary softmax per stream is not small next to a decode step).
  std::vector<int> sampling;
  for (size_t i = 0; i < who.size(); ++i) {
    Slot& s = *who[i];
    if (n_prompt[i] > 0) {
      s.prefilled += n_prompt[i];
      prompt_done += n_prompt[i];
      if (s.prefilled < s.req.prompt.size()) continue;  // more prompt to read
      if (s.req.options.n_predict == 0) {
        Finish(s, "length");
        continue;
      }
    }
    sampling.push_back(static_cast<int>(i));
  }
  const Tokenizer& tok = model_.tokenizer();
  std::vector<TokenEvent> events(sampling.size());
  pool_.ParallelFor(static_cast<int64_t>(sampling.size()), 1, [&](int64_t b, int64_t e, int) {
    for (int64_t k = b; k < e; ++k) {
      Slot& s = *who[sampling[k]];
      TokenEvent& ev = events[k];
      s.sampler->Adjust(s.logits.data(), V);
      ev.id = s.sampler->Sample(s.logits.data(), V);
      if (s.req.logprobs || s.req.options.top_logprobs > 0)
        ev.logprob = s.logits[ev.id] - LogSumExp(s.logits.data(), V);
      if (s.req.options.top_logprobs > 0) ev.top = TopLogprobs(s.logits.data(), V, s.req.options.top_logprobs);
      if (tok.HasVocab()) ev.piece = tok.TokenToPiece(ev.id);
    }
  });
  const double dt = std::chrono::duration<double>(Clock::now() - t0).count();
  for (size_t k = 0; k < sampling.size(); ++k) {
    Slot& s = *who[sampling[k]];
    const GenerateOptions& o = s.req.options;
    const TokenEvent& ev = events[k];
    ++s.generated;
    ++generated;
    const bool go_on = s.req.on_token ? s.req.on_token(ev) : true;
    if (!go_on || (!o.ignore_eos && tok.IsEog(ev.id))) {
      Finish(s, "stop");
    } else if (s.generated >= o.n_predict) {
      Finish(s, "length");
    } else {
      s.next = ev.id;
    }
  }
  std::lock_guard<std::mutex> lock(mu_);
  stats_.active = static_cast<int>(std::count_if(active.begin(), active.end(), [](const auto& s) { return !s->done; }));
  ++stats_.steps;
  stats_.batch_tokens += T;
  stats_.last_batch = T;
  stats_.busy_seconds += dt;
  stats_.prompt_tokens += prompt_done;
  stats_.generated_tokens += generated;
}

}  // namespace moe
