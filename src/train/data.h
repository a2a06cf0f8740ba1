// Training data: plain text files, folders of them, or JSONL lines with a "text" field (or a
// "prompt" and a "completion": the prompt is context, only the completion is learned); tokenized
// once with the model's tokenizer, documents joined into one stream (each opened as the
// tokenizer opens a text, BOS when it adds one, and closed with EOS when the vocabulary has one),
// and packed into sequences of seq_len + 1 tokens (inputs and their next tokens, consecutive
// sequences overlapping by one token).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace moe {

class ThreadPool;

struct CorpusStats {
  int64_t files = 0;
  int64_t documents = 0;
  int64_t bytes = 0;
  int64_t tokens = 0;
};

struct Document {
  std::string prompt;  // JSONL "prompt": context only, never a target (empty for plain text)
  std::string text;    // the text, or the JSONL "completion"
};

// The documents of `paths`: a file ending in .jsonl is one document per line ({"text": ...} or
// {"prompt": ..., "completion": ...}); any other file is one document; a folder is every file
// below it (sorted by path). Throws moe::Error (one line) for a missing path, an unreadable file,
// a malformed JSONL line, or when there is no text at all.
std::vector<Document> ReadDocuments(const std::vector<std::string>& paths, CorpusStats* stats);

struct TokenStream {
  std::vector<int32_t> tokens;
  std::vector<uint8_t> target;     // [tokens]: 1 = the token is learned where it is predicted;
                                   // empty = every token (no document has a prompt)
  std::vector<int64_t> doc_starts;  // with prompts: where each document starts (ascending)
};

// Tokenizes the documents (in parallel; the stream is in document order) into one stream.
TokenStream TokenizeDocuments(const std::vector<Document>& docs, const Tokenizer& tok, ThreadPool* pool,
                              CorpusStats* stats);

// Sequences of seq_len + 1 tokens: sequence i is stream[i*seq_len .. i*seq_len + seq_len]. With
// prompts, a completion token is a target only when its document starts inside the same
// sequence, so that every learned token sees its whole prompt.
struct Sequences {
  int seq_len = 0;
  std::vector<int32_t> data;    // [n][seq_len + 1]
  std::vector<uint8_t> target;  // [n][seq_len + 1] (empty: every token is a target)
  int64_t size() const { return seq_len ? static_cast<int64_t>(data.size()) / (seq_len + 1) : 0; }
  const int32_t* at(int64_t i) const { return data.data() + i * (seq_len + 1); }
  const uint8_t* target_at(int64_t i) const { return target.empty() ? nullptr : target.data() + i * (seq_len + 1); }
  // Targets of sequence i (positions 1..seq_len that are learned).
  int64_t Targets(int64_t i) const;
};
Sequences Pack(const TokenStream& stream, int seq_len);
// The last `n` sequences move from `from` into the returned set (a held-out split).
Sequences SplitTail(Sequences* from, int64_t n);

// A permutation of [0, n) for epoch `epoch`, a fixed function of (seed, epoch) (Fisher-Yates on
// SplitMix64), so that the data order of a resumed run is the same.
std::vector<int64_t> EpochOrder(int64_t n, uint64_t seed, int64_t epoch);

}  // namespace moe
