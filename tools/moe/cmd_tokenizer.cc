// moe tokenizer train: a byte-fallback BPE vocabulary (SentencePiece) trained on text, written as
// a GGUF file of tokenizer keys that `moe init --tokenizer` builds a model on.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "util/threadpool.h"
#include "formats/gguf.h"
#include "tokenizer/spm_trainer.h"
#include "train/data.h"
#include "util/error.h"

namespace moe::cli {

Runner AddTokenizer(CLI::App& app) {
  struct Options {
    std::vector<std::string> data;
    std::string out;
    SpmTrainOptions spm;
  };
  auto o = std::make_shared<Options>();
  app.require_subcommand(1);
  CLI::App* train = app.add_subcommand("train", "train a byte-fallback BPE vocabulary (SentencePiece) on text");
  train->add_option("--data", o->data, "text files, folders, .jsonl with a \"text\" field")->required();
  train->add_option("--vocab", o->spm.vocab_size, "vocabulary size (tokens, the 259 special and byte tokens included)")
      ->default_val(4096);
  train->add_option("-o,--output", o->out, "output GGUF file (tokenizer keys only)")->required();
  train->add_option("--threads,-t", o->spm.threads, "threads (default: all CPUs)")->default_val(0);
  train->add_option("--coverage", o->spm.character_coverage, "share of characters that get their own token")
      ->default_val(1.0);
  train->add_option("--max-lines", o->spm.max_sentences, "lines sampled for training (0 = all)")->default_val(2000000);
  return [=]() {
    if (o->spm.vocab_size < 260 || o->spm.vocab_size > 1000000)
      Fail("--vocab %d must be in 260..1000000 (259 tokens are special and byte tokens)", o->spm.vocab_size);
    if (!(o->spm.character_coverage > 0 && o->spm.character_coverage <= 1)) Fail("--coverage must be in (0, 1]");
    CheckThreadCount(o->spm.threads);
    CorpusStats st;
    std::vector<std::string> texts;
    for (Document& d : ReadDocuments(o->data, &st)) {
      if (!d.prompt.empty()) texts.push_back(std::move(d.prompt));
      texts.push_back(std::move(d.text));
    }
    const std::string model = TrainSpmModel(texts, o->spm);
    GgufWriter w;
    w.SetString("general.name", "moe.cpp tokenizer");
    WriteSpmTokenizer(model, w);
    w.Write(o->out);
    std::fprintf(stderr, "tokenizer: %d tokens trained on %lld documents (%lld bytes); wrote %s\n",
                 o->spm.vocab_size, static_cast<long long>(st.documents), static_cast<long long>(st.bytes),
                 o->out.c_str());
    return 0;
  };
}

}  // namespace moe::cli
