// moe quantize: rewrite a model in another weight type or one of llama.cpp's named mixes
// (model/quantize.h), one tensor in memory at a time, with a line per tensor.

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "model/imatrix.h"
#include "model/model.h"
#include "model/quantize.h"
#include "train/data.h"
#include "util/error.h"

namespace moe::cli {

Runner AddQuantize(CLI::App& app) {
  struct Options {
    std::string in, out, type;
    std::vector<std::string> tensor_types;
    bool pure = false, quiet = false;
    int threads = 0;
    std::string imatrix, imatrix_out;
    std::vector<std::string> imatrix_from;
    int imatrix_chunk = 512, imatrix_chunks = 0;
  };
  auto o = std::make_shared<Options>();
  app.add_option("input", o->in, "GGUF model to read (any weight types moe.cpp reads)")->required();
  app.add_option("output", o->out, "GGUF file to write")->required();
  app.add_option("--type", o->type,
                 "a llama.cpp mix (" + QuantMixNames() +
                     "; Q4_K, Q3_K, Q5_K mean the _M mixes) or one of its weight types: each "
                     "tensor's type chosen by llama.cpp's rules")
      ->required();
  app.add_flag("--pure", o->pure, "every matrix in the --type's base type (no bumps, no output/embedding rule)");
  app.add_option("--tensor-type", o->tensor_types,
                 "PATTERN=TYPE (repeatable): tensors whose name contains a match of the regular expression "
                 "get TYPE instead of the mix's choice (llama-quantize's --tensor-type)");
  app.add_option("--threads", o->threads, "quantization threads (0 = every CPU)")->default_val(0);
  app.add_option("--imatrix", o->imatrix,
                 "importance matrix file (llama.cpp's imatrix GGUF, e.g. from llama-imatrix or --imatrix-out)");
  app.add_option("--imatrix-from", o->imatrix_from,
                 "text files, folders or .jsonl to gather the importance matrix from, running the input model");
  app.add_option("--imatrix-out", o->imatrix_out, "also save the gathered importance matrix (llama.cpp's format)");
  app.add_option("--imatrix-chunk", o->imatrix_chunk, "tokens per chunk when gathering (llama-imatrix's -c)")
      ->default_val(512);
  app.add_option("--imatrix-chunks", o->imatrix_chunks, "gather from at most this many chunks (0 = all)")
      ->default_val(0);
  app.add_flag("-q,--quiet", o->quiet, "no line per tensor");
  return [=]() {
    QuantizeOptions q;
    q.mix = o->type;
    q.pure = o->pure;
    q.threads = o->threads;
    for (const std::string& tt : o->tensor_types) {
      const size_t eq = tt.rfind('=');
      DType t;
      if (eq == std::string::npos || eq == 0 || !ParseDType(tt.substr(eq + 1).c_str(), &t))
        Fail("--tensor-type '%s': use PATTERN=TYPE with a weight type (%s)", tt.c_str(), WeightTypeNames().c_str());
      q.overrides.emplace_back(tt.substr(0, eq), t);
    }
    if (!o->quiet) {
      q.progress = [](const std::string& line) {
        std::fprintf(stderr, "%s\n", line.c_str());
        std::fflush(stderr);
      };
    }
    if (!o->imatrix.empty() && !o->imatrix_from.empty())
      Fail("--imatrix and --imatrix-from both give an importance matrix: use one");
    if (!o->imatrix_out.empty() && o->imatrix_from.empty())
      Fail("--imatrix-out saves a gathered importance matrix: it needs --imatrix-from");
    if (o->imatrix_chunks < 0) Fail("--imatrix-chunks must be >= 0 (got %d)", o->imatrix_chunks);
    if (!o->imatrix_out.empty()) {
      const auto same = [](const std::string& a, const std::string& b) {
        std::error_code ec;
        return a == b || std::filesystem::equivalent(a, b, ec);
      };
      if (same(o->imatrix_out, o->in) || same(o->imatrix_out, o->out))
        Fail("--imatrix-out %s would replace the model file; write the matrix elsewhere", o->imatrix_out.c_str());
    }
    CheckQuantizeOptions(q);  // before an importance matrix is gathered
    Imatrix imatrix;
    if (!o->imatrix.empty()) {
      imatrix = Imatrix::Load(o->imatrix);
      q.imatrix = &imatrix;
      q.imatrix_label = o->imatrix;
    } else if (!o->imatrix_from.empty()) {
      auto model = Model::Load(o->in);
      const Tokenizer& tok = model->tokenizer();
      if (!tok.HasVocab()) Fail("%s has no vocabulary: it cannot read the --imatrix-from text", o->in.c_str());
      CorpusStats st;
      std::vector<int32_t> tokens;
      for (const Document& d : ReadDocuments(o->imatrix_from, &st)) {
        const std::vector<int32_t> ids = tok.Encode(d.prompt + d.text, /*add_special=*/true);
        tokens.insert(tokens.end(), ids.begin(), ids.end());
      }
      if (o->imatrix_chunks > 0) {
        tokens.resize(std::min(tokens.size(), static_cast<size_t>(o->imatrix_chunks) * o->imatrix_chunk));
      }
      const bool quiet = o->quiet;
      imatrix = GatherImatrix(*model, tokens, o->imatrix_chunk, o->threads, [quiet](int done, int total) {
        if (!quiet) std::fprintf(stderr, "imatrix: chunk %d/%d\n", done, total);
      });
      for (const std::string& path : o->imatrix_from) imatrix.datasets.push_back(path);
      if (!o->imatrix_out.empty()) imatrix.Save(o->imatrix_out);
      q.imatrix = &imatrix;
      q.imatrix_label = o->imatrix_out.empty() ? "(gathered from --imatrix-from)" : o->imatrix_out;
      std::fprintf(stderr, "imatrix: %zu matrices from %u chunks of %u tokens\n", imatrix.entries().size(),
                   imatrix.chunk_count, imatrix.chunk_size);
    }
    const QuantizeSummary s = QuantizeModel(o->in, o->out, q);
    int n_changed = 0;
    for (const TensorPlan& p : s.plan) n_changed += p.quantized;
    std::fprintf(stderr,
                 "%s -> %s (%s%s%s): %.2f MiB -> %.2f MiB, %.2f bits per weight, %d of %zu tensors converted\n",
                 o->in.c_str(), o->out.c_str(), FindQuantMix(o->type)->name, o->pure ? ", pure" : "", q.imatrix ? ", imatrix" : "",
                 s.bytes_in / 1048576.0, s.bytes_out / 1048576.0,
                 s.params ? 8.0 * static_cast<double>(s.bytes_out) / static_cast<double>(s.params) : 0.0,
                 n_changed, s.plan.size());
    return 0;
  };
}

}  // namespace moe::cli
