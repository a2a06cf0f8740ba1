#include "tokenizer/unicode.h"

#include <algorithm>
#include <array>

namespace moe {

UnicodeCategory CategoryOf(uint32_t cp) {
  using unicode_internal::kCategoryRanges;
  using unicode_internal::kNumCategoryRanges;
  if (cp >= 0x110000) return UnicodeCategory::kUnassigned;
  // Last range whose start is <= cp; ranges are sorted by start and the first starts at 0.
  const uint32_t key = (cp << 3) | 7u;
  const uint32_t* end = kCategoryRanges + kNumCategoryRanges;
  const uint32_t* it = std::upper_bound(kCategoryRanges, end, key) - 1;
  return static_cast<UnicodeCategory>(*it & 7u);
}

bool IsUnicodeWhitespace(uint32_t cp) {
  if (cp <= 0x20) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
  if (cp < 0x85) return false;
  switch (cp) {
    case 0x85: case 0xA0: case 0x1680: case 0x2028: case 0x2029: case 0x202F: case 0x205F:
    case 0x3000:
      return true;
    default:
      return cp >= 0x2000 && cp <= 0x200A;
  }
}

const char* UnicodeTablesVersion() { return unicode_internal::kUnicodeVersion; }

std::vector<uint32_t> DecodeUtf8(std::string_view s) {
  std::vector<uint32_t> out;
  out.reserve(s.size());
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const size_t n = s.size();
  auto cont = [&](size_t i) { return i < n && (p[i] & 0xC0) == 0x80; };
  size_t i = 0;
  while (i < n) {
    const uint8_t b = p[i];
    uint32_t cp = 0xFFFD;
    size_t len = 1;
    if (b < 0x80) {
      cp = b;
    } else if ((b & 0xE0) == 0xC0) {
      if (cont(i + 1)) { cp = ((b & 0x1Fu) << 6) | (p[i + 1] & 0x3Fu); len = 2; }
    } else if ((b & 0xF0) == 0xE0) {
      if (cont(i + 1) && cont(i + 2)) {
        cp = ((b & 0x0Fu) << 12) | ((p[i + 1] & 0x3Fu) << 6) | (p[i + 2] & 0x3Fu);
        len = 3;
      }
    } else if ((b & 0xF8) == 0xF0) {
      if (cont(i + 1) && cont(i + 2) && cont(i + 3)) {
        cp = ((b & 0x07u) << 18) | ((p[i + 1] & 0x3Fu) << 12) | ((p[i + 2] & 0x3Fu) << 6) |
             (p[i + 3] & 0x3Fu);
        len = 4;
        if (cp > 0x10FFFF) cp = 0xFFFD;
      }
    }
    out.push_back(cp);
    i += len;
  }
  return out;
}

void AppendUtf8(uint32_t cp, std::string* out) {
  if (cp <= 0x7F) {
    out->push_back(static_cast<char>(cp));
  } else if (cp <= 0x7FF) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp <= 0xFFFF) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | ((cp >> 18) & 0x07)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool IsValidUtf8(std::string_view s) {
  const auto* p = reinterpret_cast<const uint8_t*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const uint8_t b = p[i];
    size_t len;
    uint32_t cp, min;
    if (b < 0x80) { i++; continue; }
    if ((b & 0xE0) == 0xC0) { len = 2; cp = b & 0x1F; min = 0x80; }
    else if ((b & 0xF0) == 0xE0) { len = 3; cp = b & 0x0F; min = 0x800; }
    else if ((b & 0xF8) == 0xF0) { len = 4; cp = b & 0x07; min = 0x10000; }
    else return false;
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += len;
  }
  return true;
}

namespace {

bool IsGpt2Printable(int b) {
  return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

struct Gpt2Alphabet {
  std::array<uint32_t, 256> to_cp{};
  Gpt2Alphabet() {
    uint32_t n = 0;
    for (int b = 0; b < 256; ++b) to_cp[b] = IsGpt2Printable(b) ? b : 256 + n++;
  }
};

const Gpt2Alphabet& Alphabet() {
  static const Gpt2Alphabet a;
  return a;
}

}  // namespace

uint32_t ByteToGpt2CodePoint(uint8_t b) { return Alphabet().to_cp[b]; }

int Gpt2CodePointToByte(uint32_t cp) {
  if (cp < 256) return IsGpt2Printable(static_cast<int>(cp)) ? static_cast<int>(cp) : -1;
  // The 68 remapped bytes take 256..323 in increasing byte order.
  if (cp >= 256 + 68) return -1;
  const auto& to_cp = Alphabet().to_cp;
  for (int b = 0; b < 256; ++b) {
    if (to_cp[b] == cp) return b;
  }
  return -1;
}

}  // namespace moe
