// moe eval: held-out cross-entropy and perplexity of a model file on text, counted as llama.cpp's
// perplexity tool counts them (tools/perplexity in llama.cpp): each document tokenized whole (BOS
// first when the vocabulary adds one, one trailing newline dropped as llama.cpp drops it from
// its -f file), the documents' tokens concatenated and cut into chunks of --seq tokens (the tail
// dropped), each chunk evaluated on its own with its first token replaced by BOS (when the
// vocabulary adds one), and the next-token log-probabilities of positions seq/2 .. seq-2 scored.
// Runs the inference forward, so every weight type and servable router is evaluated as moe run
// computes it.
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
  };
  auto o = std::make_shared<Options>();
  app.add_option("-m,--model", o->model, "GGUF model file")->required();
  app.add_option("--data", o->data, "text files, folders, .jsonl")->required();
  app.add_option("--seq", o->seq, "chunk length in tokens (llama.cpp's -c)")->default_val(512);
  app.add_option("-t,--threads", o->threads, "threads (default: all CPUs)")->default_val(0);
  app.add_option("--chunks", o->max_chunks, "evaluate at most this many chunks (0 = all)")->default_val(0);
  app.add_flag("--json", o->json, "print one JSON object: tokens, loss, perplexity");
  app.add_option("--unigram-from", o->unigram_from,
                 "also score a unigram baseline estimated on this text (token frequencies, add-one smoothing)");
  return [=]() {
    if (o->seq < 3) Fail("--seq must be >= 3 (got %d): positions seq/2 .. seq-2 are scored", o->seq);
    if (o->threads < 0 || o->max_chunks < 0) Fail("--threads and --chunks must be >= 0");
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
    Forward fwd(*model, pool, L, std::min(L, 512));
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
      for (int j = first; j < L - 1; ++j) {
        const float* row = &logits[static_cast<size_t>(j) * V];
        float mx = row[0];
        for (int v = 1; v < V; ++v) mx = std::max(mx, row[v]);
        double sum = 0;
        for (int v = 0; v < V; ++v) sum += std::exp(row[v] - mx);
        nll += -(row[tokens[ci * L + j + 1]] - mx - std::log(sum));
        ++count;
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
    if (o->json) {
      nlohmann::json j = {{"tokens", count}, {"loss", loss}, {"perplexity", std::exp(loss)}, {"chunks", n_chunks},
                          {"seq", L}};
      if (!std::isnan(uni)) {
        j["unigram_loss"] = uni;
        j["unigram_perplexity"] = std::exp(uni);
      }
      std::printf("%s\n", j.dump().c_str());
    } else {
      std::printf("loss %.4f, perplexity %.4f over %lld tokens (%lld chunks of %d, positions %d..%d scored)\n", loss,
                  std::exp(loss), static_cast<long long>(count), static_cast<long long>(n_chunks), L, first, L - 2);
      if (!std::isnan(uni))
        std::printf("unigram baseline: loss %.4f, perplexity %.4f on the same tokens\n", uni, std::exp(uni));
    }
    return 0;
  };
}

}  // namespace moe::cli
