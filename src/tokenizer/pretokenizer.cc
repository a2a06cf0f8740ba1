#include "tokenizer/pretokenizer.h"

#include <algorithm>
#include <utility>

#include "tokenizer/unicode.h"

namespace moe {
namespace {

using Cat = UnicodeCategory;

// The text once decoded, with the per-code-point facts every rule needs.
struct Text {
  std::vector<uint32_t> cp;   // [n] code points
  std::vector<uint32_t> w;    // [n] cp, but non-ASCII whitespace -> 0x0B (what llama.cpp's
                              //     std::regex rules see: their \s is ASCII-only)
  std::vector<Cat> cat;       // [n] general category of cp
  std::vector<uint8_t> ws;    // [n] 1 if cp is Unicode whitespace
  explicit Text(std::string_view s) : cp(DecodeUtf8(s)) {
    const size_t n = cp.size();
    w.resize(n);
    cat.resize(n);
    ws.resize(n);
    for (size_t i = 0; i < n; ++i) {
      cat[i] = CategoryOf(cp[i]);
      ws[i] = IsUnicodeWhitespace(cp[i]);
      w[i] = (cp[i] >= 0x80 && ws[i]) ? 0x0B : cp[i];
    }
  }
};

using Lengths = std::vector<size_t>;  // piece lengths in code points, in order

bool IsAsciiAlpha(uint32_t c) { return (c | 0x20) >= 'a' && (c | 0x20) <= 'z'; }
bool IsAsciiDigit(uint32_t c) { return c >= '0' && c <= '9'; }
uint32_t AsciiLower(uint32_t c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

// ---- rules hand-written in llama.cpp (unicode_regex_split_custom_*), reproduced exactly ----

// Piece-bounded views of the decoded text for the hand-written rules.
struct Span {
  const Text& t;
  size_t b, e;
  bool In(size_t p) const { return p >= b && p < e; }
  bool L(size_t p) const { return In(p) && t.cat[p] == Cat::kLetter; }
  bool N(size_t p) const { return In(p) && t.cat[p] == Cat::kNumber; }
  bool Ws(size_t p) const { return In(p) && t.ws[p]; }
  // [^\s\p{L}\p{N}]: any code point of the piece that is none of those.
  bool Other(size_t p) const { return In(p) && !t.ws[p] && !L(p) && !N(p); }
  uint32_t Cp(size_t p) const { return In(p) ? t.cp[p] : 0xFFFFFFFFu; }
};

// 's|'t|'re|'ve|'m|'ll|'d (case-insensitive when `icase`); returns the match length or 0.
size_t MatchContraction(const Span& s, size_t pos, bool icase) {
  if (s.Cp(pos) != '\'' || pos + 1 >= s.e) return 0;
  auto low = [&](size_t p) { return icase ? AsciiLower(s.Cp(p)) : s.Cp(p); };
  const uint32_t c1 = low(pos + 1);
  if (c1 == 's' || c1 == 't' || c1 == 'm' || c1 == 'd') return 2;
  if (pos + 2 >= s.e) return 0;
  const uint32_t c2 = low(pos + 2);
  if ((c1 == 'r' && c2 == 'e') || (c1 == 'v' && c2 == 'e') || (c1 == 'l' && c2 == 'l')) return 3;
  return 0;
}

// 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
void SplitGpt2(const Text& t, size_t b, size_t e, Lengths* out) {
  const Span s{t, b, e};
  size_t prev = b;
  auto emit = [&](size_t end) {
    if (end > prev) out->push_back(end - prev);
    prev = end;
  };
  for (size_t pos = b; pos < e;) {
    if (size_t m = MatchContraction(s, pos, /*icase=*/false)) {
      pos += m;
      emit(pos);
      continue;
    }
    const size_t q = (t.cp[pos] == ' ') ? pos + 1 : pos;  // after the optional space
    if (s.L(q) || s.N(q) || s.Other(q)) {
      bool (Span::*cls)(size_t) const =
          s.L(q) ? &Span::L : s.N(q) ? &Span::N : &Span::Other;
      pos = q;
      while ((s.*cls)(pos)) pos++;
      emit(pos);
      continue;
    }
    size_t k = 0;
    while (s.Ws(pos + k)) k++;
    if (k > 1 && pos + k < e) {  // \s+(?!\S): leave the last space to the next word
      pos += k - 1;
    } else if (k > 0) {
      pos += k;
    } else {
      pos++;
    }
    emit(pos);
  }
}

// (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|
// \s*[\r\n]+|\s+(?!\S)|\s+        (qwen2: \p{N} instead of \p{N}{1,3}; qwen35: also
// [\p{L}\p{M}]+ for \p{L}+ and [^\s\p{L}\p{M}\p{N}] for [^\s\p{L}\p{N}])
void SplitLlama3(const Text& t, size_t b, size_t e, size_t max_digits, bool marks,
                 Lengths* out) {
  const Span s{t, b, e};
  auto letter = [&](size_t p) {
    return s.L(p) || (marks && s.In(p) && t.cat[p] == Cat::kMark);
  };
  auto other = [&](size_t p) { return s.Other(p) && !letter(p); };
  size_t prev = b;
  auto emit = [&](size_t end) {
    if (end > prev) out->push_back(end - prev);
    prev = end;
  };
  auto is_rn = [&](size_t p) { return s.Cp(p) == '\r' || s.Cp(p) == '\n'; };
  for (size_t pos = b; pos < e;) {
    const uint32_t c = t.cp[pos];
    if (size_t m = MatchContraction(s, pos, /*icase=*/true)) {
      pos += m;
      emit(pos);
      continue;
    }
    if (!(c == '\r' || c == '\n' || s.N(pos)) && (letter(pos) || letter(pos + 1))) {
      pos++;
      while (letter(pos)) pos++;
      emit(pos);
      continue;
    }
    if (s.N(pos)) {
      size_t ini = pos;
      while (s.N(pos)) {
        if (++pos - ini >= max_digits) {
          emit(pos);
          ini = pos;
        }
      }
      emit(pos);
      continue;
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`. As in llama.cpp, a space that ends the piece also takes
    // this branch (and becomes a one-space word).
    const size_t q = (c == ' ') ? pos + 1 : pos;
    if (q >= e || other(q)) {
      pos = q;
      while (other(pos)) pos++;
      while (is_rn(pos)) pos++;
      emit(pos);
      continue;
    }
    size_t k = 0, last_rn = 0;
    while (s.Ws(pos + k)) {
      if (is_rn(pos + k)) last_rn = pos + k + 1;
      k++;
    }
    if (last_rn > 0) {  // \s*[\r\n]+
      pos = last_rn;
    } else if (k > 1 && pos + k < e) {  // \s+(?!\S)
      pos += k - 1;
    } else if (k > 0) {
      pos += k;
    } else {
      pos++;
    }
    emit(pos);
  }
}

// ---- rules llama.cpp evaluates with std::regex ----
// `Match(pos)` returns the length of the leftmost-first match starting at pos (0: none);
// SplitMatches walks the piece like std::regex_iterator, emitting matches and the gaps.

template <class Match>
void SplitMatches(size_t b, size_t e, const Match& match, Lengths* out) {
  size_t gap = b;
  for (size_t pos = b; pos < e;) {
    const size_t m = match(pos, e);
    if (m == 0) {
      pos++;
      continue;
    }
    if (pos > gap) out->push_back(pos - gap);
    out->push_back(m);
    pos += m;
    gap = pos;
  }
  if (e > gap) out->push_back(e - gap);
}

// Character classes over what std::regex sees (Text::w): ASCII as itself, non-ASCII by category.
struct Classes {
  const Text& t;
  bool Space(size_t i) const { return t.w[i] == ' ' || (t.w[i] >= 0x09 && t.w[i] <= 0x0D); }
  bool Letter(size_t i) const {
    return t.w[i] < 0x80 ? IsAsciiAlpha(t.w[i]) : t.cat[i] == Cat::kLetter;
  }
  bool Number(size_t i) const {
    return t.w[i] < 0x80 ? IsAsciiDigit(t.w[i]) : t.cat[i] == Cat::kNumber;
  }
  bool Mark(size_t i) const { return t.w[i] >= 0x80 && t.cat[i] == Cat::kMark; }
  // llama.cpp's ASCII stand-ins: \p{P} = !"#%&'()*,-./:;?@[\]_{}, \p{S} = $+<=>^`|~.
  bool Punct(size_t i) const {
    const uint32_t c = t.w[i];
    if (c >= 0x80) return t.cat[i] == Cat::kPunctuation;
    return (c >= 0x21 && c <= 0x23) || (c >= 0x25 && c <= 0x2A) || (c >= 0x2C && c <= 0x2F) ||
           c == 0x3A || c == 0x3B || c == 0x3F || c == 0x40 || (c >= 0x5B && c <= 0x5D) ||
           c == 0x5F || c == 0x7B || c == 0x7D;
  }
  bool Symbol(size_t i) const {
    const uint32_t c = t.w[i];
    if (c >= 0x80) return t.cat[i] == Cat::kSymbol;
    return c == 0x24 || c == 0x2B || (c >= 0x3C && c <= 0x3E) || c == 0x5E || c == 0x60 ||
           c == 0x7C || c == 0x7E;
  }
  bool AsciiPunct(size_t i) const {  // [!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~]
    const uint32_t c = t.w[i];
    return (c >= 0x21 && c <= 0x2F) || (c >= 0x3A && c <= 0x40) || (c >= 0x5B && c <= 0x60) ||
           (c >= 0x7B && c <= 0x7E);
  }
  template <class Pred>
  size_t Run(size_t pos, size_t e, const Pred& pred) const {
    size_t p = pos;
    while (p < e && pred(p)) p++;
    return p - pos;
  }
};

struct Range {
  uint32_t lo, hi;
};

template <size_t N>
bool InRanges(const Range (&r)[N], uint32_t c) {
  for (const Range& x : r) {
    if (c >= x.lo && c <= x.hi) return true;
  }
  return false;
}

// The literal classes of llama.cpp's deepseek regexes (code point ranges, inclusive).
// deepseek-llm: \s?[A-Za-zµÀ-ÖØ-öø-ƺ...𞤀-𞥃]+
constexpr Range kDeepseekLetters[] = {
    {0x41, 0x5A}, {0x61, 0x7A}, {0xB5, 0xB5}, {0xC0, 0xD6}, {0xD8, 0xF6}, {0xF8, 0x1BA},
    {0x1BC, 0x1BF}, {0x1C4, 0x293}, {0x295, 0x2AF}, {0x370, 0x373}, {0x376, 0x377},
    {0x37B, 0x37D}, {0x37F, 0x37F}, {0x386, 0x386}, {0x388, 0x38A}, {0x38C, 0x38C},
    {0x38E, 0x3A1}, {0x3A3, 0x3F5}, {0x3F7, 0x481}, {0x48A, 0x52F}, {0x531, 0x556},
    {0x10A0, 0x10C5}, {0x13A0, 0x13F5}, {0x13F8, 0x13FD}, {0x1C90, 0x1CBA}, {0x1CBD, 0x1CBF},
    {0x1D00, 0x1D2B}, {0x1D6B, 0x1D77}, {0x1D79, 0x1D9A}, {0x1E00, 0x1F15}, {0x1F18, 0x1F1D},
    {0x1F20, 0x1F45}, {0x1F48, 0x1F4D}, {0x1F50, 0x1F57}, {0x1F59, 0x1F59}, {0x1F5B, 0x1F5B},
    {0x1F5D, 0x1F5D}, {0x1F5F, 0x1F7D}, {0x1F80, 0x1FB4}, {0x1FB6, 0x1FBC}, {0x1FBE, 0x1FBE},
    {0x1FC2, 0x1FC4}, {0x1FC6, 0x1FCC}, {0x1FD0, 0x1FD3}, {0x1FD6, 0x1FDB}, {0x1FE0, 0x1FEC},
    {0x1FF2, 0x1FF4}, {0x1FF6, 0x1FFC}, {0x2102, 0x2102}, {0x2107, 0x2107}, {0x210A, 0x2113},
    {0x2115, 0x2115}, {0x2119, 0x211D}, {0x2124, 0x2124}, {0x2126, 0x2126}, {0x2128, 0x2128},
    {0x212A, 0x212D}, {0x212F, 0x2134}, {0x2139, 0x2139}, {0x213C, 0x213F}, {0x2145, 0x2149},
    {0x214E, 0x214E}, {0x2183, 0x2184}, {0x2C00, 0x2C7B}, {0x2C7E, 0x2CE4}, {0x2CEB, 0x2CEE},
    {0x2CF2, 0x2CF3}, {0xA640, 0xA66D}, {0xA680, 0xA69B}, {0xA722, 0xA76F}, {0xA771, 0xA787},
    {0xA78B, 0xA78E}, {0xAB70, 0xABBF}, {0xFB00, 0xFB06}, {0xFB13, 0xFB17}, {0xFF21, 0xFF3A},
    {0xFF41, 0xFF5A}, {0x10400, 0x1044F}, {0x104B0, 0x104D3}, {0x104D8, 0x104FB},
    {0x10C80, 0x10CB2}, {0x10CC0, 0x10CF2}, {0x118A0, 0x118DF}, {0x1E900, 0x1E943},
};
// deepseek-llm: \s?[!-/:-~！-／：-～‘-‟　-。]+  (U+3000 never matches: it is whitespace, which
// llama.cpp rewrites to \v before matching)
constexpr Range kDeepseekPunct[] = {{0x21, 0x2F}, {0x3A, 0x7E},     {0xFF01, 0xFF0F},
                                    {0xFF1A, 0xFF5E}, {0x2018, 0x201F}, {0x3000, 0x3002}};
// deepseek-llm / deepseek-coder: [一-龥ࠀ-一가-퟿]+
constexpr Range kDeepseekCjkHangul[] = {{0x4E00, 0x9FA5}, {0x0800, 0x4E00}, {0xAC00, 0xD7FF}};
// deepseek-v3: [一-龥぀-ゟ゠-ヿ]+
constexpr Range kDeepseek3Cjk[] = {{0x4E00, 0x9FA5}, {0x3040, 0x309F}, {0x30A0, 0x30FF}};

// Applies one rule to every current piece.
template <class PieceSplit>
Lengths ForEachPiece(const Lengths& pieces, const PieceSplit& split) {
  Lengths out;
  out.reserve(pieces.size() * 2);
  size_t b = 0;
  for (size_t len : pieces) {
    split(b, b + len, &out);
    b += len;
  }
  return out;
}

Lengths RunRules(PreTokenizerType type, const Text& t) {
  const Classes c{t};
  Lengths pieces{t.cp.size()};
  auto gpt2 = [&](size_t b, size_t e, Lengths* o) { SplitGpt2(t, b, e, o); };
  auto apply = [&](auto match) {
    pieces = ForEachPiece(pieces, [&](size_t b, size_t e, Lengths* o) {
      SplitMatches(b, e, match, o);
    });
  };
  auto number_run = [&](size_t pos, size_t e) {  // \p{N}+
    return c.Run(pos, e, [&](size_t i) { return c.Number(i); });
  };
  auto single_number = [&](size_t pos, size_t) -> size_t { return c.Number(pos) ? 1 : 0; };
  auto cr_or_lf = [&](size_t pos, size_t) -> size_t {  // [\r\n]
    return (t.w[pos] == '\r' || t.w[pos] == '\n') ? 1 : 0;
  };
  // \s?X+ over a literal code point class X (std::wregex rules).
  auto opt_space_run = [&](const auto& pred) {
    return [&c, &t, pred](size_t pos, size_t e) -> size_t {
      if (c.Space(pos) && pos + 1 < e && pred(pos + 1)) {
        return 1 + c.Run(pos + 1, e, pred);
      }
      return c.Run(pos, e, pred);
    };
  };
  switch (type) {
    case PreTokenizerType::kDefault:
      // [\p{P}\$\+<=>\^~\|]+ , GPT-2 , \p{N}+ , [0-9][0-9][0-9]
      apply([&](size_t pos, size_t e) {
        return c.Run(pos, e, [&](size_t i) {
          const uint32_t x = t.w[i];
          return c.Punct(i) || x == '$' || x == '+' || x == '<' || x == '=' || x == '>' ||
                 x == '^' || x == '~' || x == '|';
        });
      });
      pieces = ForEachPiece(pieces, gpt2);
      apply(number_run);
      apply([&](size_t pos, size_t e) -> size_t {
        return (pos + 3 <= e && IsAsciiDigit(t.w[pos]) && IsAsciiDigit(t.w[pos + 1]) &&
                IsAsciiDigit(t.w[pos + 2]))
                   ? 3
                   : 0;
      });
      break;
    case PreTokenizerType::kGpt2:
      pieces = ForEachPiece(pieces, gpt2);
      break;
    case PreTokenizerType::kStarcoder:
      apply(single_number);
      pieces = ForEachPiece(pieces, gpt2);
      break;
    case PreTokenizerType::kLlama3:
    case PreTokenizerType::kQwen2:
    case PreTokenizerType::kQwen35: {
      const size_t max_digits = type == PreTokenizerType::kLlama3 ? 3 : 1;
      const bool marks = type == PreTokenizerType::kQwen35;
      pieces = ForEachPiece(pieces, [&](size_t b, size_t e, Lengths* o) {
        SplitLlama3(t, b, e, max_digits, marks, o);
      });
      break;
    }
    case PreTokenizerType::kDeepseekLlm:
      apply(cr_or_lf);
      apply(opt_space_run([&t](size_t i) { return InRanges(kDeepseekLetters, t.w[i]); }));
      apply(opt_space_run([&t](size_t i) { return InRanges(kDeepseekPunct, t.w[i]); }));
      apply([&](size_t pos, size_t e) -> size_t {  // \s+$
        const size_t k = c.Run(pos, e, [&](size_t i) { return c.Space(i); });
        return (k > 0 && pos + k == e) ? k : 0;
      });
      apply([&](size_t pos, size_t e) {
        return c.Run(pos, e, [&](size_t i) { return InRanges(kDeepseekCjkHangul, t.w[i]); });
      });
      apply(number_run);
      break;
    case PreTokenizerType::kDeepseekCoder:
      apply(cr_or_lf);
      apply(opt_space_run([&c](size_t i) { return c.Letter(i); }));  // \s?\p{L}+
      apply(opt_space_run([&c](size_t i) { return c.Punct(i); }));   // \s?\p{P}+
      apply([&](size_t pos, size_t e) {
        return c.Run(pos, e, [&](size_t i) { return InRanges(kDeepseekCjkHangul, t.w[i]); });
      });
      apply(single_number);
      break;
    case PreTokenizerType::kDeepseek3:
      apply([&](size_t pos, size_t e) { return std::min<size_t>(number_run(pos, e), 3); });
      apply([&](size_t pos, size_t e) {
        return c.Run(pos, e, [&](size_t i) { return InRanges(kDeepseek3Cjk, t.w[i]); });
      });
      // [ASCII punct][A-Za-z]+ | [^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+ | ?[\p{P}\p{S}]+[\r\n]* |
      // \s*[\r\n]+ | \s+(?!\S) | \s+      -- alternatives tried in order, as ECMAScript does.
      apply([&](size_t pos, size_t e) -> size_t {
        auto lm = [&](size_t i) { return c.Letter(i) || c.Mark(i); };
        auto ps = [&](size_t i) { return c.Punct(i) || c.Symbol(i); };
        auto rn = [&](size_t i) { return t.w[i] == '\r' || t.w[i] == '\n'; };
        if (c.AsciiPunct(pos)) {
          const size_t k = c.Run(pos + 1, e, [&](size_t i) { return IsAsciiAlpha(t.w[i]); });
          if (k > 0) return 1 + k;
        }
        if (!rn(pos) && !c.Letter(pos) && !c.Punct(pos) && !c.Symbol(pos)) {
          const size_t k = c.Run(pos + 1, e, lm);
          if (k > 0) return 1 + k;
        }
        if (size_t k = c.Run(pos, e, lm)) return k;
        {
          const size_t s = (t.w[pos] == ' ') ? 1 : 0;
          // (Backtracking past the optional space cannot help: a space is not [\p{P}\p{S}].)
          const size_t k = c.Run(pos + s, e, ps);
          if (k > 0) return s + k + c.Run(pos + s + k, e, rn);
        }
        const size_t k = c.Run(pos, e, [&](size_t i) { return c.Space(i); });
        if (k == 0) return 0;
        for (size_t j = k; j > 0; --j) {  // \s*[\r\n]+: through the last \r or \n of the run
          if (rn(pos + j - 1)) return j;
        }
        if (pos + k == e) return k;   // \s+(?!\S) at the end of the piece
        return k > 1 ? k - 1 : k;     // \s+(?!\S), else \s+
      });
      break;
  }
  return pieces;
}

}  // namespace

const char* PreTokenizerTypeName(PreTokenizerType t) {
  switch (t) {
    case PreTokenizerType::kDefault: return "default";
    case PreTokenizerType::kGpt2: return "gpt-2";
    case PreTokenizerType::kLlama3: return "llama3";
    case PreTokenizerType::kQwen2: return "qwen2";
    case PreTokenizerType::kQwen35: return "qwen35";
    case PreTokenizerType::kDeepseekLlm: return "deepseek-llm";
    case PreTokenizerType::kDeepseekCoder: return "deepseek-coder";
    case PreTokenizerType::kDeepseek3: return "deepseek-v3";
    case PreTokenizerType::kStarcoder: return "starcoder";
  }
  return "?";
}

std::vector<std::string> PreTokenize(PreTokenizerType type, std::string_view text,
                                     bool byte_encode) {
  const Text t(text);
  const Lengths pieces = RunRules(type, t);
  std::vector<std::string> words;
  words.reserve(pieces.size());
  size_t b = 0;
  for (size_t len : pieces) {
    std::string word;
    if (byte_encode) {
      std::string utf8;
      for (size_t i = b; i < b + len; ++i) AppendUtf8(t.cp[i], &utf8);
      for (unsigned char ch : utf8) AppendUtf8(ByteToGpt2CodePoint(ch), &word);
    } else {
      for (size_t i = b; i < b + len; ++i) AppendUtf8(t.cp[i], &word);
    }
    words.push_back(std::move(word));
    b += len;
  }
  return words;
}

}  // namespace moe
