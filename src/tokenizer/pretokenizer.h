// Pre-tokenizers of byte-level BPE vocabularies: split text into the words BPE merges within.
// Each `tokenizer.ggml.pre` family is a sequence of regex-defined split rules applied in turn
// to every piece the previous rule produced (matches and the text between matches both become
// pieces), as llama.cpp's unicode_regex_split does. The rules are hand-written matchers, not
// std::regex (which has no \p{L}); where llama.cpp evaluates a rule with std::regex on its
// "collapsed" text (one byte per code point: ASCII kept, non-ASCII whitespace -> \v, other
// code points -> a byte per general category) these matchers reproduce that, including its ASCII-
// only \s and its "A-Za-z" as the ASCII part of \p{L}.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

enum class PreTokenizerType {
  kDefault,        // "default" / missing: punctuation runs, GPT-2 regex, \p{N}+, [0-9]{3}
  kGpt2,           // "gpt-2", "olmo", "mpt", ...: the GPT-2 regex
  kLlama3,         // "llama-bpe", "llama3", "dbrx", "smaug-bpe", "glm4", ...: \p{N}{1,3}
  kQwen2,          // "qwen2", "stablelm2", "hunyuan", ...: llama3 regex with single digits
  kQwen35,         // "qwen35": qwen2 regex with [\p{L}\p{M}]+ letter runs
  kDeepseekLlm,    // "deepseek-llm"
  kDeepseekCoder,  // "deepseek-coder"
  kDeepseek3,      // "deepseek-v3", "hunyuan-dense", "joyai-llm"
  kStarcoder,      // "starcoder", "refact", "command-r", "smollm", ...: \p{N} then GPT-2 regex
};

const char* PreTokenizerTypeName(PreTokenizerType t);

// Splits `text` (any bytes; invalid UTF-8 bytes become U+FFFD first, as in llama.cpp) into
// words. With byte_encode, each word's UTF-8 bytes are mapped to GPT-2's printable alphabet.
std::vector<std::string> PreTokenize(PreTokenizerType type, std::string_view text,
                                     bool byte_encode);

}  // namespace moe
