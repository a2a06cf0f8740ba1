// Unicode helpers for the tokenizers: UTF-8 decoding with llama.cpp's error handling, general
// categories (tables generated into unicode_tables.cc by scripts/gen_unicode_tables.py), the
// White_Space set and GPT-2's byte <-> printable-code-point mapping.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

// Coarse general category, as llama.cpp groups it (one per code point).
enum class UnicodeCategory : uint8_t {
  kUnassigned = 0,  // Cn
  kNumber = 1,      // N*
  kLetter = 2,      // L*
  kSeparator = 3,   // Z*
  kMark = 4,        // M*
  kPunctuation = 5, // P*
  kSymbol = 6,      // S*
  kControl = 7,     // Cc Cf Co Cs
};

UnicodeCategory CategoryOf(uint32_t cp);
// llama.cpp's whitespace set (Unicode White_Space): \t..\r, space, U+0085, U+00A0, U+1680,
// U+2000..U+200A, U+2028, U+2029, U+202F, U+205F, U+3000.
bool IsUnicodeWhitespace(uint32_t cp);
const char* UnicodeTablesVersion();

// Length of the UTF-8 sequence a lead byte announces (1 for continuation/invalid bytes), as
// llama.cpp's unicode_len_utf8: the SPM tokenizer splits with it without validating.
inline size_t Utf8SeqLen(uint8_t lead) {
  static constexpr uint8_t kLen[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
  return kLen[lead >> 4];
}

// Decodes UTF-8 like llama.cpp's unicode_cpts_from_utf8: a byte that does not start a complete
// sequence becomes U+FFFD and decoding resumes at the next byte. Like llama.cpp it checks only the
// continuation-bit pattern (overlong forms and surrogates decode as written); results above
// U+10FFFF (lead bytes F5..F7), which llama.cpp cannot re-encode and aborts on, become U+FFFD.
std::vector<uint32_t> DecodeUtf8(std::string_view s);
void AppendUtf8(uint32_t cp, std::string* out);
// True if `s` is well-formed UTF-8 (no overlongs, surrogates or values above U+10FFFF).
bool IsValidUtf8(std::string_view s);

// GPT-2 byte-level alphabet: byte b <-> a printable code point (b itself for '!'..'~',
// U+00A1..U+00AC and U+00AE..U+00FF; 256 + n for the n-th remaining byte).
uint32_t ByteToGpt2CodePoint(uint8_t b);
// Returns -1 when cp is not in the alphabet.
int Gpt2CodePointToByte(uint32_t cp);

namespace unicode_internal {
extern const uint32_t kCategoryRanges[];  // [kNumCategoryRanges] (start << 3) | category
extern const size_t kNumCategoryRanges;
extern const char kUnicodeVersion[];
}  // namespace unicode_internal

}  // namespace moe
