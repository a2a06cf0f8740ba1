// moe run / moe bench.
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <iostream>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "model/forward.h"
#include "model/model.h"
#include "moe/routing.h"
#include "runtime/chat_template.h"
#include "runtime/generate.h"
#include "runtime/sampler.h"
#include "util/atomic_file.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe::cli {

namespace {

using Clock = std::chrono::steady_clock;
double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

uint64_t PeakRssBytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<uint64_t>(u.ru_maxrss) * 1024;  // Linux reports KiB
}

std::vector<int32_t> ParseIds(const std::string& s) {
  std::vector<int32_t> ids;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    size_t pos = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &pos);
    } catch (...) {
      pos = 0;
    }
    if (pos == 0 || pos != item.size() || v < 0 || v > INT32_MAX)
      Fail("--prompt-ids: '%s' is not a token id (expected comma-separated integers like 1,2,3)", item.c_str());
    ids.push_back(static_cast<int32_t>(v));
  }
  if (ids.empty()) Fail("--prompt-ids is empty");
  return ids;
}

nlohmann::json LogprobsJson(const float* logits, int n_vocab, int n) {
  nlohmann::json arr = nlohmann::json::array();
  for (auto& [id, lp] : TopLogprobs(logits, n_vocab, n)) arr.push_back({{"id", id}, {"logprob", lp}});
  return arr;
}

struct RunOptions {
  std::string model;
  std::string prompt;
  std::string prompt_ids;
  std::string prompt_file;
  bool chat = false;
  std::string system;
  int n_predict = 64;
  SamplerConfig sampler;
  int threads = 0;
  int ctx = 0;
  bool ignore_eos = false;
  bool json = false;
  int top_logprobs = 0;
  bool teacher_forcing = false;
  std::string cache_type;  // AddCacheTypeOption sets its default
  std::string mla;         // AddMlaOption sets its default
};

// A conversation on stdin: each line a user message (the first may come from -p), answered
// through the model's chat template; each turn's prompt is the whole conversation, whose cached
// whole chunks the Generator reuses, so a turn evaluates little more than its new text.
int DoChat(const RunOptions& o, Model& model, const GenerateOptions& g, DType kv_type, Forward::MlaForm mla) {
  const Tokenizer& tok = model.tokenizer();
  if (!tok.HasVocab()) Fail("--chat needs a model with a vocabulary (this one has token ids only)");
  const ModelConfig& c = model.config();
  const ChatFormat format = DetectChatFormat(model.file().GetStringOpt("tokenizer.chat_template").value_or(""));
  const int n_ctx = ContextSize(c, o.ctx > 0 ? o.ctx : DefaultContext(c), 1, 0,
                                [](const std::string& w) { std::fprintf(stderr, "moe: warning: %s\n", w.c_str()); },
                                kv_type);
  ThreadPool pool(o.threads);
  model.RepackForInference(pool);
  Generator gen(model, pool, n_ctx, kv_type, mla);
  std::vector<ChatMessage> messages;
  if (!o.system.empty()) messages.push_back({"system", o.system});
  const bool tty = isatty(STDIN_FILENO) != 0;
  std::fprintf(stderr, "chat format: %s; a line per message, end with Ctrl-D\n", ChatFormatName(format));
  for (bool first = true;; first = false) {
    std::string user;
    if (first && !o.prompt.empty()) {
      user = o.prompt;
    } else {
      if (tty) std::fprintf(stderr, "> ");
      if (!std::getline(std::cin, user)) break;
      if (user.find_first_not_of(" \t\r") == std::string::npos) continue;
    }
    messages.push_back({"user", user});
    const auto encode = [&] { return tok.Encode(FormatChat(format, messages), /*add_special=*/true, /*parse_special=*/true); };
    const auto fits = [&](size_t n) { return static_cast<int64_t>(n) + std::max(g.n_predict, 1) <= n_ctx; };
    std::vector<int32_t> prompt = encode();
    // Past the context the oldest exchange goes (the system message and this message stay); the
    // turn then evaluates its whole prompt, whose start changed.
    const size_t kept = o.system.empty() ? 0 : 1;  // messages that never leave
    while (!fits(prompt.size()) && messages.size() > kept + 1) {
      const size_t n = messages.size() > kept + 2 ? 2 : 1;
      messages.erase(messages.begin() + static_cast<std::ptrdiff_t>(kept),
                     messages.begin() + static_cast<std::ptrdiff_t>(kept + n));
      std::fprintf(stderr, "[the oldest exchange left the conversation to fit the context of %d tokens]\n", n_ctx);
      prompt = encode();
    }
    if (!fits(prompt.size()))
      Fail("the message (%zu tokens with the system message) and -n %d do not fit the context of %d tokens (--ctx)",
           prompt.size(), g.n_predict, n_ctx);
    std::string answer;
    const GenerateResult r = gen.Run(prompt, g, [&](int32_t id, const std::string& piece) {
      if (tok.IsEog(id)) return true;  // the template closes the turn itself
      answer += piece;
      if (!o.json) {
        std::fwrite(piece.data(), 1, piece.size(), stdout);
        std::fflush(stdout);
      }
      return true;
    });
    const size_t n_gen = r.tokens.size();
    const double prefill = (prompt.size() - r.cached_tokens) / r.prefill_s;
    const double decode = n_gen > 1 ? (n_gen - 1) / r.decode_s : 0.0;
    if (o.json) {  // a line per turn
      const nlohmann::json turn = {{"prompt_tokens", prompt}, {"cached_tokens", r.cached_tokens}, {"tokens", r.tokens},
                                   {"text", answer}, {"prefill_tokens_per_s", prefill}, {"decode_tokens_per_s", decode}};
      std::printf("%s\n", turn.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    } else {
      std::printf("\n");
      std::fprintf(stderr, "[prompt: %zu tokens, %d of them from the cache, %.1f tok/s; %zu generated, %.1f tok/s]\n",
                   prompt.size(), r.cached_tokens, prefill, n_gen, decode);
    }
    std::fflush(stdout);
    messages.push_back({"assistant", answer});
  }
  return 0;
}

int DoRun(const RunOptions& o) {
  auto model = Model::Load(o.model);
  const ModelConfig& c = model->config();
  const Tokenizer& tok = model->tokenizer();
  GenerateOptions g;
  g.n_predict = o.n_predict;
  g.sampler = o.sampler;
  g.ignore_eos = o.ignore_eos;
  g.top_logprobs = o.top_logprobs;
  ValidateGenerateOptions(g, static_cast<int>(c.n_vocab));  // before the prompt is read
  const DType kv_type = ParseCacheType(o.cache_type);
  const Forward::MlaForm mla = ParseMlaForm(o.mla);
  if (o.chat) return DoChat(o, *model, g, kv_type, mla);
  std::vector<int32_t> prompt;
  if (!o.prompt_ids.empty()) {
    prompt = ParseIds(o.prompt_ids);
  } else {
    const std::string text = o.prompt_file.empty() ? o.prompt : ReadRegularFile(o.prompt_file, "the prompt file");
    prompt = tok.Encode(text, /*add_special=*/true);
    if (prompt.empty()) Fail("the prompt is empty after tokenization");
  }
  const int n_ctx = ContextSize(c, o.ctx, static_cast<int>(prompt.size()), o.teacher_forcing ? 0 : o.n_predict,
                                [](const std::string& w) { std::fprintf(stderr, "moe: warning: %s\n", w.c_str()); },
                                kv_type);
  ThreadPool pool(o.threads);
  model->RepackForInference(pool);
  const int V = static_cast<int>(c.n_vocab);
  nlohmann::json out;
  out["prompt_tokens"] = prompt;

  if (o.teacher_forcing) {
    // Per position, how near its routing came to a tie in any MoE layer (RoutingMargin): there
    // two engines' roundings may choose different experts (tests/conformance reads it). Chunk
    // by chunk, as Eval would split the prompt, so the observer knows the positions.
    constexpr int kChunk = 256;
    Forward fwd(*model, pool, n_ctx, kChunk, kv_type);
    fwd.SetMlaForm(mla);
    std::vector<float> margin(prompt.size(), std::numeric_limits<float>::infinity());
    const bool ranked = c.moe.router == MoeRouterKind::kSoftmaxTopK || c.moe.router == MoeRouterKind::kSigmoidBias;
    size_t first = 0;  // the position of the chunk's first token
    if (ranked && c.n_expert > 0) {
      const size_t R = static_cast<size_t>(c.moe.router_width());
      fwd.SetRoutingObserver([&](int layer, int n, const float*, const float* probs, const int32_t*,
                                 const RoutingPlan& plan) {
        const TensorView* bias = model->layers[static_cast<size_t>(layer)].exp_probs_b;
        for (int t = 0; t < n; ++t) {
          float& m = margin[first + static_cast<size_t>(t)];
          m = std::min(m, RoutingMargin(c.moe, probs + static_cast<size_t>(t) * R, bias ? bias->F32() : nullptr,
                                        &plan.expert_ids[static_cast<size_t>(t) * plan.k]));
        }
      });
    }
    std::vector<float> logits(prompt.size() * static_cast<size_t>(V)), chunk;
    const auto t0 = Clock::now();
    for (first = 0; first < prompt.size(); first += kChunk) {
      const int m = static_cast<int>(std::min<size_t>(kChunk, prompt.size() - first));
      fwd.Eval(prompt.data() + first, m, /*all_logits=*/true, &chunk);
      std::copy(chunk.begin(), chunk.end(), logits.begin() + static_cast<std::ptrdiff_t>(first * V));
    }
    const auto t1 = Clock::now();
    nlohmann::json tl = nlohmann::json::array();
    const int n = o.top_logprobs > 0 ? o.top_logprobs : 5;
    for (size_t i = 0; i < prompt.size(); ++i) tl.push_back(LogprobsJson(&logits[i * V], V, n));
    out["teacher_logprobs"] = tl;
    if (ranked && c.n_expert > 0) {
      nlohmann::json ms = nlohmann::json::array();  // null: no MoE layer chose for this position
      for (float m : margin) ms.push_back(std::isfinite(m) ? nlohmann::json(m) : nlohmann::json());
      out["routing_margin"] = ms;
    }
    out["prefill_tokens_per_s"] = prompt.size() / Seconds(t0, t1);
    out["peak_rss_bytes"] = PeakRssBytes();
    std::printf("%s\n", out.dump().c_str());
    return 0;
  }

  int shown = 0;
  const GenerateResult r = Generate(*model, pool, n_ctx, prompt, g, [&](int32_t id, const std::string& piece) {
    if (!o.json) {  // stream to the terminal
      if (tok.HasVocab()) {
        std::fwrite(piece.data(), 1, piece.size(), stdout);
      } else {
        std::printf("%s%d", shown ? " " : "", id);
      }
      std::fflush(stdout);
    }
    ++shown;
    return true;
  }, kv_type, mla);
  const size_t n_gen = r.tokens.size();
  const int n_decoded = n_gen > 1 ? static_cast<int>(n_gen) - 1 : 0;
  if (!o.json) {
    std::printf("\n");
    std::fflush(stdout);
    std::fprintf(stderr, "prefill: %zu tokens, %.1f tok/s; decode: %zu tokens, %.1f tok/s\n",
                 prompt.size(), prompt.size() / r.prefill_s, n_gen, n_decoded ? n_decoded / r.decode_s : 0.0);
    return 0;
  }
  nlohmann::json top = nlohmann::json::array();
  for (const auto& pos : r.top) {
    nlohmann::json arr = nlohmann::json::array();
    for (const auto& [id, lp] : pos) arr.push_back({{"id", id}, {"logprob", lp}});
    top.push_back(arr);
  }
  out["tokens"] = r.tokens;
  out["text"] = r.text;
  out["top_logprobs"] = top;
  out["prefill_tokens_per_s"] = prompt.size() / r.prefill_s;
  out["decode_tokens_per_s"] = n_decoded ? n_decoded / r.decode_s : 0.0;
  out["peak_rss_bytes"] = PeakRssBytes();
  std::printf("%s\n", out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
  return 0;
}

}  // namespace

Runner AddRun(CLI::App& app) {
  auto o = std::make_shared<RunOptions>();
  app.add_option("-m,--model", o->model, "GGUF model file")->required();
  auto* p = app.add_option("-p,--prompt", o->prompt, "prompt text");
  auto* ids = app.add_option("--prompt-ids", o->prompt_ids, "prompt as token ids: 1,2,3");
  auto* file = app.add_option("-f,--file", o->prompt_file, "prompt text from a file");
  p->excludes(ids);
  file->excludes(p);
  file->excludes(ids);
  auto* chat = app.add_flag("--chat", o->chat,
                            "a conversation: a user message per line of stdin (the first may be -p), answered "
                            "through the model's chat template, the cached prompt prefix reused every turn");
  app.add_option("--system", o->system, "with --chat: the system message")->needs(chat);
  chat->excludes(ids);
  chat->excludes(file);
  app.add_option("-n,--n-predict", o->n_predict, "tokens to generate")->default_val(64);
  app.add_option("--temp", o->sampler.temp, "temperature (0 = greedy)")->default_val(0.8f);
  app.add_option("--top-k", o->sampler.top_k, "keep the k most likely tokens (0 = all)")->default_val(40);
  app.add_option("--top-p", o->sampler.top_p, "nucleus sampling threshold (1 = off)")->default_val(0.95f);
  app.add_option("--min-p", o->sampler.min_p, "keep tokens at least this fraction as likely as the best (0 = off)")
      ->default_val(0.0f);
  app.add_option("--seed", o->sampler.seed, "sampling seed")->default_val(0);
  app.add_option("--presence-penalty", o->sampler.presence_penalty,
                 "subtracted from the logit of every token generated so far, in [-2, 2]")->default_val(0.0f);
  app.add_option("--frequency-penalty", o->sampler.frequency_penalty,
                 "subtracted from a token's logit for every time it was generated, in [-2, 2]")->default_val(0.0f);
  app.add_option("-t,--threads", o->threads, "threads (default: all CPUs)")->default_val(0);
  app.add_option("-c,--ctx", o->ctx, "KV cache size in tokens (default prompt + n)")->default_val(0);
  AddCacheTypeOption(app, o->cache_type);
  AddMlaOption(app, o->mla);
  app.add_flag("--ignore-eos", o->ignore_eos, "keep generating after an end-of-generation token");
  app.add_flag("--json", o->json, "print one JSON object with tokens, log-probs and speeds (--chat: one per turn)");
  app.add_option("--top-logprobs", o->top_logprobs, "report the N most likely tokens per position")->default_val(0);
  auto* teacher = app.add_flag("--teacher-forcing", o->teacher_forcing,
                               "no generation: report the top log-probs after every prompt position (with --json)");
  chat->excludes(teacher);
  return [=]() {
    if (o->prompt.empty() && o->prompt_ids.empty() && o->prompt_file.empty() && !o->chat)
      Fail("give a prompt with -p TEXT, -f FILE or --prompt-ids 1,2,3 (or --chat)");
    CheckThreadCount(o->threads);
    return DoRun(*o);
  };
}

Runner AddBench(CLI::App& app) {
  struct BenchOptions {
    std::string model;
    int n_prompt = 128, n_gen = 64, threads = 0, reps = 1, sequences = 1;
    uint64_t seed = 1;
    bool json = false;
    std::string cache_type;  // AddCacheTypeOption sets its default
    std::string mla;         // AddMlaOption sets its default
  };
  auto o = std::make_shared<BenchOptions>();
  app.add_option("-m,--model", o->model, "GGUF model file")->required();
  app.add_option("-p,--n-prompt", o->n_prompt, "prompt tokens (prefill)")->default_val(128);
  app.add_option("-n,--n-gen", o->n_gen, "generated tokens (decode)")->default_val(64);
  app.add_option("-t,--threads", o->threads, "threads (default: all CPUs)")->default_val(0);
  app.add_option("-r,--repetitions", o->reps, "repetitions; the median is reported")->default_val(1);
  app.add_option("--seed", o->seed, "seed of the random tokens")->default_val(1);
  app.add_option("-s,--sequences", o->sequences,
                 "sequences decoded together, one token each per step (Forward::EvalBatch, as moe serve "
                 "batches streams); decode tok/s counts all of them")
      ->default_val(1);
  AddCacheTypeOption(app, o->cache_type);
  AddMlaOption(app, o->mla);
  app.add_flag("--json", o->json, "print one JSON object");
  return [=]() {
    if (o->n_prompt < 1 || o->n_gen < 1 || o->reps < 1) Fail("-p, -n and -r must be >= 1");
    const DType kv_type = ParseCacheType(o->cache_type);
    const Forward::MlaForm mla = ParseMlaForm(o->mla);
    if (o->sequences < 1 || o->sequences > 256) Fail("--sequences must be in 1..256 (got %d)", o->sequences);
    auto model = Model::Load(o->model);
    const int V = static_cast<int>(model->config().n_vocab);
    CheckThreadCount(o->threads);
    // One cache of prompt + tokens + 1 positions (checked against int and memory, and a warning
    // past the training context: a long prompt's attention grows with its square), and one more
    // per sequence when several decode together; checked before the weights are repacked.
    const int ctx = ContextSize(model->config(), 0, o->n_prompt, o->n_gen,
                                [](const std::string& w) { std::fprintf(stderr, "moe: warning: %s\n", w.c_str()); },
                                kv_type);
    if (o->sequences > 1)
      CheckKvFits(model->config(), static_cast<int64_t>(ctx) * (o->sequences + 1),
                  StrFormat("--sequences %d of %d positions each", o->sequences, ctx), kv_type);
    ThreadPool pool(o->threads);
    model->RepackForInference(pool);
    Forward fwd(*model, pool, ctx, 256, kv_type);
    fwd.SetMlaForm(mla);
    // Random tokens, never one repeated token: a repeated token always hits the same experts.
    std::mt19937_64 rng(o->seed);
    std::uniform_int_distribution<int> tok(0, V - 1);
    std::vector<double> pp, tg;
    std::vector<float> logits;
    {  // warm-up, untimed: pages the mapped weights in (a prefill touches every expert)
      std::vector<int32_t> warm(std::min(o->n_prompt, 64));
      for (auto& t : warm) t = tok(rng);
      fwd.Eval(warm.data(), static_cast<int>(warm.size()), false, &logits);
    }
    const int S = o->sequences;
    std::vector<KvCache> caches;  // S > 1: each sequence's own cache, as the server's slots
    if (S > 1) {
      if (S > fwd.n_batch()) Fail("--sequences %d exceeds the batch of %d tokens", S, fwd.n_batch());
      for (int i = 0; i < S; ++i) caches.emplace_back(model->config(), fwd.n_ctx(), kv_type);
    }
    std::vector<float> batch_logits(static_cast<size_t>(S) * V);
    for (int r = 0; r < o->reps && S > 1; ++r) {
      std::vector<int32_t> prompt(static_cast<size_t>(S) * o->n_prompt), step(S);
      for (auto& t : prompt) t = tok(rng);
      std::vector<SeqBatch> seqs(S);
      auto t0 = Clock::now();
      for (int i = 0; i < S; ++i) {  // prompts one sequence at a time, in chunks of the batch
        caches[i].Reset();
        for (int p = 0; p < o->n_prompt; p += fwd.n_batch()) {
          const SeqBatch one{&caches[i], &prompt[static_cast<size_t>(i) * o->n_prompt + p],
                             std::min(fwd.n_batch(), o->n_prompt - p), batch_logits.data()};
          fwd.EvalBatch(&one, 1);
        }
      }
      auto t1 = Clock::now();
      for (int g = 0; g < o->n_gen; ++g) {
        for (int i = 0; i < S; ++i) {
          step[i] = tok(rng);
          seqs[i] = SeqBatch{&caches[i], &step[i], 1, &batch_logits[static_cast<size_t>(i) * V]};
        }
        fwd.EvalBatch(seqs.data(), S);
      }
      auto t2 = Clock::now();
      pp.push_back(static_cast<double>(S) * o->n_prompt / Seconds(t0, t1));
      tg.push_back(static_cast<double>(S) * o->n_gen / Seconds(t1, t2));
    }
    for (int r = 0; r < o->reps && S == 1; ++r) {
      std::vector<int32_t> prompt(o->n_prompt);
      for (auto& t : prompt) t = tok(rng);
      fwd.Reset();
      auto t0 = Clock::now();
      fwd.Eval(prompt.data(), o->n_prompt, false, &logits);
      auto t1 = Clock::now();
      for (int i = 0; i < o->n_gen; ++i) {
        int32_t id = tok(rng);
        fwd.Eval(&id, 1, false, &logits);
      }
      auto t2 = Clock::now();
      pp.push_back(o->n_prompt / Seconds(t0, t1));
      tg.push_back(o->n_gen / Seconds(t1, t2));
    }
    nlohmann::json j;
    j["prefill_tokens_per_s"] = Median(pp);
    j["decode_tokens_per_s"] = Median(tg);
    j["n_prompt"] = o->n_prompt;
    j["n_gen"] = o->n_gen;
    // What one decoded token reads (the decode floor is this over the memory bandwidth):
    // the weights (Model::BytesPerToken) and the KV cache at the decode's mean context.
    j["weight_bytes_per_token"] = model->BytesPerToken();
    // And its weight products' multiply-adds (prefill is bound by this over the multiply-add rate).
    j["weight_macs_per_token"] = model->MacsPerToken();
    j["kv_bytes_per_token"] = static_cast<double>(model->config().KvBytesPerPosition(KvElementBytes(kv_type))) *
                              (o->n_prompt + (o->n_gen - 1) / 2.0);
    j["threads"] = pool.size();
    j["sequences"] = S;
    j["peak_rss_bytes"] = PeakRssBytes();
    if (o->json) {
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("prefill %d tokens: %.1f tok/s\ndecode %d tokens: %.1f tok/s\nthreads: %d\n",
                  o->n_prompt, Median(pp), o->n_gen, Median(tg), pool.size());
      if (S > 1) std::printf("sequences: %d (prefill and decode tok/s count all of them)\n", S);
    }
    return 0;
  };
}

}  // namespace moe::cli
