#include "tokenizer/spm_trainer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <string>
#include <unordered_map>

#include "formats/gguf.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe {

namespace {

// The documents' lines, one sentence at a time (empty lines skipped).
class LineIterator : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(const std::vector<std::string>& docs) : docs_(docs) { Advance(); }
  bool done() const override { return doc_ >= docs_.size(); }
  void Next() override { Advance(); }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return sentencepiece::util::Status(); }

 private:
  void Advance() {
    while (doc_ < docs_.size()) {
      const std::string& d = docs_[doc_];
      if (pos_ >= d.size()) {
        ++doc_;
        pos_ = 0;
        continue;
      }
      size_t end = d.find('\n', pos_);
      if (end == std::string::npos) end = d.size();
      line_.assign(d, pos_, end - pos_);
      if (!line_.empty() && line_.back() == '\r') line_.pop_back();
      pos_ = end + 1;
      if (!line_.empty()) return;
    }
    line_.clear();
  }
  const std::vector<std::string>& docs_;
  size_t doc_ = 0, pos_ = 0;
  std::string line_;
};

}  // namespace

std::string TrainSpmModel(const std::vector<std::string>& documents, const SpmTrainOptions& opt) {
  if (opt.vocab_size < 260) Fail("--vocab %d is too small: the byte-fallback vocabulary alone has 259 tokens", opt.vocab_size);
  const int threads = opt.threads > 0 ? opt.threads : AvailableCpus();
  std::unordered_map<std::string, std::string> args = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(opt.vocab_size)},
      {"byte_fallback", "true"},
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "false"},
      {"split_digits", "true"},
      {"character_coverage", std::to_string(opt.character_coverage)},
      {"max_sentence_length", "16384"},
      {"input_sentence_size", std::to_string(opt.max_sentences)},
      {"shuffle_input_sentence", "true"},
      {"num_threads", std::to_string(threads)},
      {"unk_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"pad_id", "-1"},
      {"minloglevel", "2"},
      {"model_prefix", ""},
  };
  LineIterator it(documents);
  if (it.done()) Fail("the data holds no text to train a tokenizer on");
  std::string model;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &it, &model);
  if (!status.ok()) Fail("SentencePiece could not train the vocabulary: %s", std::string(status.message()).c_str());
  return model;
}

void WriteSpmTokenizer(const std::string& serialized_model, GgufWriter& w) {
  sentencepiece::SentencePieceProcessor sp;
  const auto st = sp.LoadFromSerializedProto(serialized_model);
  if (!st.ok()) Fail("cannot read the SentencePiece model: %s", std::string(st.message()).c_str());
  const int n = sp.GetPieceSize();
  std::vector<std::string> tokens(n);
  std::vector<float> scores(n);
  std::vector<int32_t> types(n);
  for (int i = 0; i < n; ++i) {
    tokens[i] = sp.IdToPiece(i);
    scores[i] = sp.GetScore(i);
    TokenType t = TokenType::kNormal;
    if (sp.IsUnknown(i)) t = TokenType::kUnknown;
    else if (sp.IsControl(i)) t = TokenType::kControl;
    else if (sp.IsByte(i)) t = TokenType::kByte;
    else if (sp.IsUnused(i)) t = TokenType::kUnused;
    types[i] = static_cast<int32_t>(t);
  }
  w.SetString("tokenizer.ggml.model", "llama");
  w.SetString("tokenizer.ggml.pre", "default");
  w.SetStringArray("tokenizer.ggml.tokens", tokens);
  w.SetF32Array("tokenizer.ggml.scores", scores);
  w.SetI32Array("tokenizer.ggml.token_type", types);
  w.SetU32("tokenizer.ggml.unknown_token_id", static_cast<uint32_t>(sp.unk_id()));
  w.SetU32("tokenizer.ggml.bos_token_id", static_cast<uint32_t>(sp.bos_id()));
  w.SetU32("tokenizer.ggml.eos_token_id", static_cast<uint32_t>(sp.eos_id()));
  w.SetBool("tokenizer.ggml.add_bos_token", true);
  w.SetBool("tokenizer.ggml.add_eos_token", false);
  w.SetBool("tokenizer.ggml.add_space_prefix", false);
}

std::vector<int32_t> SpmEncode(const std::string& serialized_model, const std::string& text) {
  sentencepiece::SentencePieceProcessor sp;
  const auto st = sp.LoadFromSerializedProto(serialized_model);
  if (!st.ok()) Fail("cannot read the SentencePiece model: %s", std::string(st.message()).c_str());
  std::vector<int> ids;
  const auto es = sp.Encode(text, &ids);
  if (!es.ok()) Fail("SentencePiece cannot encode: %s", std::string(es.message()).c_str());
  return std::vector<int32_t>(ids.begin(), ids.end());
}

}  // namespace moe
