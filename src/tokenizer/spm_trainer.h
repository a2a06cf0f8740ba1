// Trains a byte-fallback BPE vocabulary with SentencePiece (libsentencepiece) and writes it as the
// tokenizer.ggml.* keys of a GGUF file (tokenizer.ggml.model = "llama"), the way llama.cpp's
// converter writes a SentencePiece model: pieces in id order, scores (BPE: -merge rank), types
// (unknown, control, byte, normal), <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..258.
//
// The trainer runs with the options under which SentencePiece's own encoder and llama.cpp's SPM
// tokenizer (and moe.cpp's, tokenizer.h) agree: no normalization (identity rule), whitespace kept
// as it is, byte fallback for every character outside the vocabulary. Text is fed line by line
// (newlines are encoded as the byte token <0x0A>; no piece spans a line break), without a dummy
// space prefix (add_space_prefix = false): a word that starts a line is then tokenized the same
// way in training as in a whole document, where no space precedes it, and encoding a text in
// pieces split after its newlines gives the same tokens as encoding it whole.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moe {

class GgufWriter;

struct SpmTrainOptions {
  int vocab_size = 4096;            // pieces in all, the 259 special and byte tokens included
  int threads = 0;                  // 0 = all CPUs
  double character_coverage = 1.0;  // share of characters that get their own piece
  int64_t max_sentences = 2000000;  // lines sampled for training (0 = all)
  uint64_t seed = 0;
};

// Trains on the documents (split into lines) and returns the serialized SentencePiece model.
// Throws moe::Error with SentencePiece's reason on failure (e.g. a vocabulary too small for the
// characters of the text, or too large for it).
std::string TrainSpmModel(const std::vector<std::string>& documents, const SpmTrainOptions& opt);

// Adds the tokenizer.ggml.* keys of a serialized SentencePiece model to w.
void WriteSpmTokenizer(const std::string& serialized_model, GgufWriter& w);

// Encodes text with SentencePiece itself (the trained model): an independent reference for tests.
std::vector<int32_t> SpmEncode(const std::string& serialized_model, const std::string& text);

}  // namespace moe
