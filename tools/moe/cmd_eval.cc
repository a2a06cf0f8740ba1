// moe eval: held-out cross-entropy and perplexity of a model file on text, counted as llama.cpp's
// perplexity tool counts them (tools/perplexity in llama.cpp): each document tokenized whole (BOS
// first when the vocabulary adds one, one trailing newline dropped as llama.cpp drops it from
// its -f file), the documents' tokens concatenated and cut into chunks of --seq tokens (the tail
// dropped), each chunk evaluated on its own with its first token replaced by BOS (when the
// vocabulary adds one), and the next-token log-probabilities of positions seq/2 .. seq-2 scored.
// Runs the inference forward, so every weight type and servable router is evaluated as moe run
// computes it.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "model/forward.h"
#include "model/model.h"
#include "train/data.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe::cli {

Runner AddEval(CLI::App& app) {
  struct Options {
    std::string model;
    std::vector<std::string> data;
    int seq = 512;
    int threads = 0;
    int max_chunks = 0;
    bool json = false;
    std::vector<std::string> unigram_from;
    std::string kl_from;
    std::string mla;  // AddMlaOption sets its default
  };
  auto o = std::make_shared<Options>();
  app.add_option("-m,--model", o->model, "GGUF model file")->required();
  app.add_option("--data", o->data, "text files, folders, .jsonl")->required();
  app.add_option("--seq", o->seq, "chunk length in tokens (llama.cpp's -c)")->default_val(512);
  app.add_option("-t,--threads", o->threads, "threads (default: all CPUs)")->default_val(0);
  app.add_option("--chunks", o->max_chunks, "evaluate at most this many chunks (0 = all)")->default_val(0);
  app.add_flag("--json", o->json, "print one JSON object: tokens, loss, perplexity");
  AddMlaOption(app, o->mla);
  app.add_option("--unigram-from", o->unigram_from,
                 "also score a unigram baseline estimated on this text (token frequencies, add-one smoothing)");
  app.add_option("--kl-from", o->kl_from,
                 "a reference model (the F32 original of a quantized -m): KL divergence of -m's next-token "
                 "distributions from the reference's, and how often their top tokens agree, on the scored positions");
  return [=]() {
    if (o->seq < 3) Fail("--seq must be >= 3 (got %d): positions seq/2 .. seq-2 are scored", o->seq);
    CheckThreadCount(o->threads);
    if (o->max_chunks < 0) Fail("--chunks must be >= 0");
    const Forward::MlaForm mla = ParseMlaForm(o->mla);
    auto model = Model::Load(o->model);
    const ModelConfig& c = model->config();
    const Tokenizer& tok = model->tokenizer();
    if (!tok.HasVocab()) Fail("%s has no vocabulary (tokenizer.ggml.model = none): it cannot read text", o->model.c_str());
    if (static_cast<uint32_t>(o->seq) > c.n_ctx_train)
      Fail("--seq %d is longer than the model's context of %u tokens", o->seq, c.n_ctx_train);
    CorpusStats st;
    std::vector<int32_t> tokens;
    for (Document& d : ReadDocuments(o->data, &st)) {
      std::string text = d.prompt + d.text;
      if (!text.empty() && text.back() == '\n') text.pop_back();
      const std::vector<int32_t> ids = tok.Encode(text, /*add_special=*/true);
      tokens.insert(tokens.end(), ids.begin(), ids.end());
    }
    const int L = o->seq;
    int64_t n_chunks = static_cast<int64_t>(tokens.size()) / L;
    if (n_chunks == 0)
      Fail("the data has %zu tokens, fewer than one chunk of --seq %d", tokens.size(), L);
    if (o->max_chunks > 0) n_chunks = std::min<int64_t>(n_chunks, o->max_chunks);
    ThreadPool pool(o->threads);
    model->RepackForInference(pool);
    Forward fwd(*model, pool, L, std::min(L, 512));
    fwd.SetMlaForm(mla);
    std::unique_ptr<Model> base;
    std::unique_ptr<Forward> base_fwd;
    if (!o->kl_from.empty()) {
      base = Model::Load(o->kl_from);
      if (base->config().n_vocab != c.n_vocab)
        Fail("--kl-from %s has %u tokens in its vocabulary, %s has %u: they do not predict the same tokens",
             o->kl_from.c_str(), base->config().n_vocab, o->model.c_str(), c.n_vocab);
      base->RepackForInference(pool);
      base_fwd = std::make_unique<Forward>(*base, pool, L, std::min(L, 512));
    }
    std::vector<float> base_logits;
    std::vector<double> kls;
    int64_t top1_same = 0;
    double base_nll = 0;
    const int V = static_cast<int>(c.n_vocab), first = L / 2;
    double nll = 0;
    int64_t count = 0;
    std::vector<float> logits;
    std::vector<int32_t> chunk(L);
    for (int64_t ci = 0; ci < n_chunks; ++ci) {
      std::copy_n(tokens.begin() + ci * L, L, chunk.begin());
      if (tok.add_bos() && tok.bos() >= 0) chunk[0] = tok.bos();
      fwd.Reset();
      fwd.Eval(chunk.data(), L, /*all_logits=*/true, &logits);
      if (base_fwd) {
        base_fwd->Reset();
        base_fwd->Eval(chunk.data(), L, /*all_logits=*/true, &base_logits);
      }
      // log-sum-exp of a row of logits (max first), and its argmax.
      auto lse = [V](const float* row, int* arg) {
        int a = 0;
        for (int v = 1; v < V; ++v) a = row[v] > row[a] ? v : a;
        double sum = 0;
        for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(row[v]) - row[a]);
        *arg = a;
        return row[a] + std::log(sum);
      };
      for (int j = first; j < L - 1; ++j) {
        const float* row = &logits[static_cast<size_t>(j) * V];
        int arg;
        const double z = lse(row, &arg);
        const int32_t next = tokens[ci * L + j + 1];
        nll += -(row[next] - z);
        ++count;
        if (base_fwd) {
          const float* brow = &base_logits[static_cast<size_t>(j) * V];
          int barg;
          const double bz = lse(brow, &barg);
          base_nll += -(brow[next] - bz);
          top1_same += arg == barg;
          // KL(base || model) = sum_v p_base(v) (log p_base(v) - log p_model(v)), in double.
          double kl = 0;
          for (int v = 0; v < V; ++v) {
            const double lb = brow[v] - bz, lm = row[v] - z;
            kl += std::exp(lb) * (lb - lm);
          }
          kls.push_back(std::max(0.0, kl));
        }
      }
    }
    const double loss = nll / count;
    // The unigram baseline on the same scored positions: -log p(token) with add-one smoothing.
    double uni = std::nan("");
    if (!o->unigram_from.empty()) {
      CorpusStats ust;
      const TokenStream s = TokenizeDocuments(ReadDocuments(o->unigram_from, &ust), tok, &pool, &ust);
      std::vector<double> freq(V, 1.0);
      for (int32_t t : s.tokens) freq[t] += 1.0;
      const double total = static_cast<double>(s.tokens.size()) + V;
      double u = 0;
      for (int64_t ci = 0; ci < n_chunks; ++ci)
        for (int j = first; j < L - 1; ++j) u += -std::log(freq[tokens[ci * L + j + 1]] / total);
      uni = u / count;
    }
    double kl_mean = 0, kl_median = 0, kl_p99 = 0;
    if (!kls.empty()) {
      for (double k : kls) kl_mean += k;
      kl_mean /= static_cast<double>(kls.size());
      std::sort(kls.begin(), kls.end());
      kl_median = kls[kls.size() / 2];
      kl_p99 = kls[std::min(kls.size() - 1, static_cast<size_t>(0.99 * static_cast<double>(kls.size())))];
    }
    if (o->json) {
      nlohmann::json j = {{"tokens", count}, {"loss", loss}, {"perplexity", std::exp(loss)}, {"chunks", n_chunks},
                          {"seq", L}};
      if (!std::isnan(uni)) {
        j["unigram_loss"] = uni;
        j["unigram_perplexity"] = std::exp(uni);
      }
      if (base_fwd) {
        j["base_loss"] = base_nll / count;
        j["base_perplexity"] = std::exp(base_nll / count);
        j["kl_mean"] = kl_mean;
        j["kl_median"] = kl_median;
        j["kl_p99"] = kl_p99;
        j["top1_agreement"] = static_cast<double>(top1_same) / count;
      }
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("loss %.4f, perplexity %.4f over %lld tokens (%lld chunks of %d, positions %d..%d scored)\n", loss,
                  std::exp(loss), static_cast<long long>(count), static_cast<long long>(n_chunks), L, first, L - 2);
      if (!std::isnan(uni))
        std::printf("unigram baseline: loss %.4f, perplexity %.4f on the same tokens\n", uni, std::exp(uni));
      if (base_fwd)
        std::printf("against %s (loss %.4f, perplexity %.4f): KL mean %.6f, median %.6f, p99 %.6f; "
                    "same top token at %.2f%% of positions\n",
                    o->kl_from.c_str(), base_nll / count, std::exp(base_nll / count), kl_mean, kl_median,
                    kl_p99, 100.0 * top1_same / count);
    }
    return 0;
  };
}

}  // namespace moe::cli
