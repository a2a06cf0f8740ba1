// Tokenizers read from a GGUF file's tokenizer.ggml.* keys, token-for-token compatible with
// llama.cpp (llama_vocab::impl in src/llama-vocab.cpp of the version node-llama-cpp 3.21.1 bundles):
//   "gpt2"  byte-level BPE: pre-tokenizer chosen by tokenizer.ggml.pre (pretokenizer.h), tokens in
//           GPT-2's byte-to-unicode alphabet, merges "left right" ranked by index;
//   "llama" SentencePiece-style: bigram merges by score over UTF-8 characters, spaces as U+2581,
//           <0xXX> byte fallback, a space prefixed to the text (add_space_prefix, default true);
//   "none"  / "no_vocab": ids only.
// Special tokens (control, user-defined) in the text are split out before BPE/SPM as llama.cpp's
// tokenizer_st_partition does: user-defined always, control/unknown only with parse_special.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "formats/gguf.h"
#include "tokenizer/pretokenizer.h"

namespace moe {

// tokenizer.ggml.token_type values.
enum class TokenType : int32_t {
  kUndefined = 0, kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5,
  kByte = 6,
};

struct DecodeOptions {
  bool special = false;       // render control/unknown tokens as their text (else nothing)
  bool clean_spaces = false;  // llama.cpp's clean-up pass (" ," -> ",", " 's" -> "'s", ...);
                              // pass tokenizer.clean_spaces() to reproduce llama_detokenize
};

class Tokenizer {
 public:
  // Reads tokenizer.ggml.* keys; throws moe::Error with a one-line message on bad/missing data.
  // n_vocab: rows of the model's embedding (0 = take the token list's length); the token list
  // must have exactly n_vocab entries. model "none"/"no_vocab": ids only, n_vocab from the
  // argument or <arch>.vocab_size.
  static std::unique_ptr<Tokenizer> FromGguf(const GgufFile& f, uint32_t n_vocab);

  // Text -> ids. add_special: BOS if add_bos() (EOS too if add_eos()). Special-token text
  // ("<|endoftext|>") is tokenized as plain text unless parse_special, as with llama.cpp's
  // llama_tokenize(..., parse_special=false) -- user-defined tokens are matched either way.
  std::vector<int32_t> Encode(std::string_view text, bool add_special) const;
  std::vector<int32_t> Encode(std::string_view text, bool add_special, bool parse_special) const;

  // Bytes this token contributes when decoding (byte-level BPE decoded to raw bytes; SPM U+2581
  // -> space, <0xAB> -> byte); control/unknown tokens give "" unless special.
  std::string TokenToPiece(int32_t id) const { return TokenToPiece(id, false); }
  std::string TokenToPiece(int32_t id, bool special) const;
  // Concatenated pieces, with llama.cpp's detokenizer rules: when add_space_prefix() the first
  // token loses one leading space. Decode(Encode(t, false)) == t for text without special tokens.
  std::string Decode(const std::vector<int32_t>& ids) const { return Decode(ids, {}); }
  std::string Decode(const std::vector<int32_t>& ids, const DecodeOptions& opt) const;

  bool HasVocab() const { return type_ != Type::kNone; }
  int32_t bos() const { return bos_; }  // -1 if none
  int32_t eos() const { return eos_; }
  int32_t eot() const { return eot_; }
  int32_t eom() const { return eom_; }
  int32_t unk() const { return unk_; }
  int32_t pad() const { return pad_; }
  bool IsEog(int32_t id) const;  // eos/eot/eom and llama.cpp's end-of-generation token texts
  const std::vector<int32_t>& eog_ids() const { return eog_; }  // sorted
  uint32_t n_vocab() const { return n_vocab_; }
  const std::string& model() const { return model_; }  // "gpt2", "llama", "none"
  const std::string& pre() const { return pre_; }      // tokenizer.ggml.pre ("" if absent)
  bool add_bos() const { return add_bos_; }
  bool add_eos() const { return add_eos_; }
  bool add_space_prefix() const { return add_space_prefix_; }
  bool clean_spaces() const { return clean_spaces_; }  // llama.cpp's per-vocabulary default

  // Vocabulary access (valid ids only; throws moe::Error otherwise).
  const std::string& TokenText(int32_t id) const;
  TokenType token_type(int32_t id) const;
  float score(int32_t id) const;
  std::optional<int32_t> TextToToken(std::string_view text) const;

 private:
  enum class Type { kNone, kBpe, kSpm };
  // llama.cpp's token attribute bits (llama_token_attr).
  enum Attr : uint32_t {
    kAttrUnknown = 1u << 0, kAttrUnused = 1u << 1, kAttrNormal = 1u << 2,
    kAttrControl = 1u << 3, kAttrUserDefined = 1u << 4, kAttrByte = 1u << 5,
    kAttrLstrip = 1u << 7, kAttrRstrip = 1u << 8,
  };
  struct Fragment {
    int32_t token;  // -1: raw text [begin, begin + len)
    size_t begin, len;
  };

  Tokenizer() = default;
  void LoadVocab(const GgufFile& f);
  void SetupSpecialTokens(const GgufFile& f);
  int32_t Lookup(std::string_view text) const;  // -1 if absent
  std::vector<Fragment> Partition(std::string_view text, bool parse_special) const;
  void EncodeBpe(std::string_view text, std::vector<int32_t>* out) const;
  void EncodeSpm(std::string_view text, std::vector<int32_t>* out) const;
  int32_t SpmByteToken(uint8_t byte) const;
  int32_t BpeRank(std::string_view left, std::string_view right) const;

  Type type_ = Type::kNone;
  std::string model_, pre_;
  PreTokenizerType pre_type_ = PreTokenizerType::kDefault;
  uint32_t n_vocab_ = 0;
  std::vector<std::string> text_;     // [n_vocab] token texts
  std::vector<float> scores_;         // [n_vocab]
  std::vector<int32_t> types_;        // [n_vocab] tokenizer.ggml.token_type (1 if absent)
  std::vector<uint32_t> attr_;        // [n_vocab] Attr bits, after llama.cpp's overrides
  std::unordered_map<std::string, int32_t> token_to_id_;
  std::unordered_map<std::string, int32_t> bpe_ranks_;  // key: MergeKey(left, right)
  std::vector<int32_t> special_tokens_;  // control/user-defined/unknown ids, longest text first
  std::vector<int32_t> eog_;
  int32_t bos_ = -1, eos_ = -1, eot_ = -1, eom_ = -1, unk_ = -1, pad_ = -1;
  bool add_bos_ = false, add_eos_ = false, add_space_prefix_ = false;
  bool clean_spaces_ = false, ignore_merges_ = false;
};

// Copies every "tokenizer." key of `src` into `dst` (GgufWriter::SetValue), so a converted or
// re-quantized file keeps the exact vocabulary.
void CopyTokenizerKeys(const GgufFile& src, GgufWriter& dst);

}  // namespace moe
