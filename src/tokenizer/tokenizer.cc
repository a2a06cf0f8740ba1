#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <cctype>
#include <cstring>
#include <queue>

#include "tokenizer/unicode.h"
#include "util/error.h"

namespace moe {
namespace {

constexpr char kSpmSpace[] = "\xE2\x96\x81";  // U+2581 LOWER ONE EIGHTH BLOCK

// tokenizer.ggml.pre values -> splitter and llama.cpp's per-family flags.
struct PreInfo {
  const char* name;
  PreTokenizerType type;
  bool clean_spaces;
  bool ignore_merges;  // a word that is itself a token skips BPE
  bool add_bos;        // default for add_bos_token
  bool bos_null;       // default BOS id is "none" (glm4)
};

constexpr PreInfo kPreInfos[] = {
    {"default", PreTokenizerType::kDefault, true, false, false, false},
    {"llama3", PreTokenizerType::kLlama3, true, true, true, false},
    {"llama-v3", PreTokenizerType::kLlama3, true, true, true, false},
    {"llama-bpe", PreTokenizerType::kLlama3, true, true, true, false},
    {"falcon3", PreTokenizerType::kLlama3, true, true, true, false},
    {"falcon-h1", PreTokenizerType::kLlama3, true, true, true, false},
    {"pixtral", PreTokenizerType::kLlama3, true, true, true, false},
    {"midm-2.0", PreTokenizerType::kLlama3, true, true, true, false},
    {"lfm2", PreTokenizerType::kLlama3, true, true, true, false},
    {"jina-v5-nano", PreTokenizerType::kLlama3, true, true, true, false},
    {"dbrx", PreTokenizerType::kLlama3, true, false, false, false},
    {"smaug-bpe", PreTokenizerType::kLlama3, true, false, false, false},
    {"glm4", PreTokenizerType::kLlama3, true, false, false, true},
    {"chatglm-bpe", PreTokenizerType::kLlama3, true, false, false, true},
    {"deepseek-llm", PreTokenizerType::kDeepseekLlm, false, false, false, false},
    {"deepseek-coder", PreTokenizerType::kDeepseekCoder, false, false, false, false},
    {"deepseek-v3", PreTokenizerType::kDeepseek3, false, false, false, false},
    {"hunyuan-dense", PreTokenizerType::kDeepseek3, false, false, false, false},
    {"joyai-llm", PreTokenizerType::kDeepseek3, false, false, false, false},
    {"gpt-2", PreTokenizerType::kGpt2, true, false, false, false},
    {"phi-2", PreTokenizerType::kGpt2, true, false, false, false},
    {"mpt", PreTokenizerType::kGpt2, true, false, false, false},
    {"olmo", PreTokenizerType::kGpt2, true, false, false, false},
    {"jais", PreTokenizerType::kGpt2, true, false, false, false},
    {"exaone4", PreTokenizerType::kGpt2, true, false, false, false},
    {"gigachat", PreTokenizerType::kGpt2, true, false, false, false},
    {"a.x-4.0", PreTokenizerType::kGpt2, true, false, false, false},
    {"mellum", PreTokenizerType::kGpt2, true, false, false, false},
    {"trillion", PreTokenizerType::kGpt2, false, false, false, false},
    {"granite-docling", PreTokenizerType::kGpt2, false, false, false, false},
    {"qwen2", PreTokenizerType::kQwen2, false, false, false, false},
    {"deepseek-r1-qwen", PreTokenizerType::kQwen2, false, false, false, false},
    {"kormo", PreTokenizerType::kQwen2, false, false, false, false},
    {"f2llmv2", PreTokenizerType::kQwen2, false, false, false, false},
    {"hunyuan", PreTokenizerType::kQwen2, false, false, false, false},
    {"solar-open", PreTokenizerType::kQwen2, false, false, false, false},
    {"stablelm2", PreTokenizerType::kQwen2, true, false, false, false},
    {"megrez", PreTokenizerType::kQwen2, true, false, false, false},
    {"qwen35", PreTokenizerType::kQwen35, false, false, false, false},
    {"starcoder", PreTokenizerType::kStarcoder, true, false, false, false},
    {"refact", PreTokenizerType::kStarcoder, true, false, false, false},
    {"codeshell", PreTokenizerType::kStarcoder, true, false, false, false},
    {"exaone", PreTokenizerType::kStarcoder, true, false, false, false},
    {"minerva-7b", PreTokenizerType::kStarcoder, true, false, false, false},
    {"mellum2", PreTokenizerType::kStarcoder, true, false, false, false},
    {"command-r", PreTokenizerType::kStarcoder, false, false, false, false},
    {"smollm", PreTokenizerType::kStarcoder, false, false, false, false},
};

// llama.cpp recognizes these texts as end-of-generation tokens whatever their ids.
constexpr const char* kEogTexts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>", "[e~[",
};
// Texts that stand for the EOT / EOM / FIM tokens when their ids are not given.
constexpr const char* kEotTexts[] = {
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|end_of_text|>",
    "<EOT>", "_<EOT>", "[EOT]", "<\xEF\xBD\x9C" "end\xE2\x96\x81of\xE2\x96\x81sentence\xEF\xBD\x9C>",
    "<end_of_utterance>",
};
constexpr const char* kEomTexts[] = {"<|eom_id|>"};
constexpr const char* kFimPreTexts[] = {
    "<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>",
    "<\xEF\xBD\x9C" "fim\xE2\x96\x81" "begin\xEF\xBD\x9C>", "<PRE>", "\xE2\x96\x81<PRE>",
    "<|code_prefix|>", "<|prefix|>"};
constexpr const char* kFimSufTexts[] = {
    "<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
    "<\xEF\xBD\x9C" "fim\xE2\x96\x81hole\xEF\xBD\x9C>", "<SUF>", "\xE2\x96\x81<SUF>",
    "<|code_suffix|>", "<|suffix|>"};
constexpr const char* kFimMidTexts[] = {
    "<|fim_middle|>", "<fim-middle>", "<fim_middle>",
    "<\xEF\xBD\x9C" "fim\xE2\x96\x81" "end\xEF\xBD\x9C>", "<MID>", "\xE2\x96\x81<MID>",
    "<|code_middle|>", "<|middle|>"};
constexpr const char* kFimPadTexts[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"};
constexpr const char* kFimRepTexts[] = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>",
                                        "<reponame>"};
constexpr const char* kFimSepTexts[] = {"<|file_sep|>"};

template <size_t N>
bool OneOf(const char* const (&list)[N], const std::string& s) {
  for (const char* x : list) {
    if (s == x) return true;
  }
  return false;
}

bool CIsSpace(char c) { return c == ' ' || (c >= '\t' && c <= '\r'); }

std::string MergeKey(std::string_view left, std::string_view right) {
  std::string key;
  const uint32_t n = static_cast<uint32_t>(left.size());
  key.reserve(4 + left.size() + right.size());
  key.append(reinterpret_cast<const char*>(&n), 4);  // length prefix: tokens may hold any byte
  key.append(left);
  key.append(right);
  return key;
}

void ReplaceAll(std::string* s, std::string_view from, std::string_view to) {
  std::string out;
  size_t pos = 0;
  while (true) {
    const size_t hit = s->find(from, pos);
    if (hit == std::string::npos) break;
    out.append(*s, pos, hit - pos);
    out.append(to);
    pos = hit + from.size();
  }
  if (pos == 0) return;
  out.append(*s, pos, std::string::npos);
  *s = std::move(out);
}

// Byte-level BPE token text -> bytes (llama.cpp's llama_decode_text, including its marker for
// code points outside the 256-symbol alphabet).
std::string DecodeByteLevel(const std::string& text) {
  std::string out;
  for (uint32_t cp : DecodeUtf8(text)) {
    const int b = Gpt2CodePointToByte(cp);
    if (b >= 0) {
      out.push_back(static_cast<char>(b));
      continue;
    }
    std::string utf8;
    AppendUtf8(cp, &utf8);
    out += "[UNK_BYTE_0x";
    for (unsigned char c : utf8) out += StrFormat("%02x", c);
    out += text + "]";
  }
  return out;
}

// llama.cpp's clean_up_tokenization_spaces passes, in place, with its exact indexing.
void CleanSpaces(std::string* s) {
  std::string& t = *s;
  int32_t total = static_cast<int32_t>(t.size());
  // " ?", " !", " .", " ," lose the space.
  const int32_t total1 = total;
  total = total ? 1 : 0;
  for (int32_t i = 1; i < total1; ++i) {
    const char x = t[i];
    if (t[i - 1] == ' ' && (x == '?' || x == '!' || x == '.' || x == ',')) total--;
    t[total++] = x;
  }
  // " ' " -> "'".
  const int32_t total2 = total;
  total = total ? 1 : 0;
  for (int32_t i = 1; i < total2; ++i) {
    const char x = t[i];
    if (x == '\'' && i + 1 < total2 && t[i - 1] == ' ' && t[i + 1] == ' ') {
      total--;
      t[++i] = '\0';
    }
    t[total++] = x;
  }
  // " 's", " 'm", " 're", " 've" lose the space.
  const int32_t total3 = total;
  total = total ? 1 : 0;
  for (int32_t i = 1; i < total3; ++i) {
    const char x = t[i];
    if (t[i - 1] == ' ' && x == '\'' && i + 1 < total3) {
      const char x1 = t[i + 1];
      if (x1 == 's' || x1 == 'm') {
        total--;
      } else if (x1 != 't' && x1 != 'd' && i + 2 < total3) {
        const char x2 = t[i + 2];
        if ((x1 == 'r' && x2 == 'e') || (x1 == 'v' && x2 == 'e')) total--;
      }
    }
    t[total++] = x;
  }
  t.resize(total);
}

}  // namespace

std::unique_ptr<Tokenizer> Tokenizer::FromGguf(const GgufFile& f, uint32_t n_vocab) {
  std::unique_ptr<Tokenizer> tok(new Tokenizer());
  Tokenizer& t = *tok;
  if (!f.Has("tokenizer.ggml.model")) {
    f.Throw("required key 'tokenizer.ggml.model' is missing (use \"none\" for an ids-only model)");
  }
  t.model_ = f.GetString("tokenizer.ggml.model");
  t.pre_ = f.GetStringOpt("tokenizer.ggml.pre").value_or("");

  if (t.model_ == "none" || t.model_ == "no_vocab") {
    t.type_ = Type::kNone;
    t.model_ = "none";
    t.n_vocab_ = n_vocab;
    if (t.n_vocab_ == 0) {
      const auto arch = f.GetStringOpt("general.architecture");
      if (arch) t.n_vocab_ = f.GetU32Opt(*arch + ".vocab_size").value_or(0);
    }
    if (t.n_vocab_ == 0) {
      f.Throw("tokenizer.ggml.model = none needs the vocabulary size: set <arch>.vocab_size");
    }
    return tok;
  }

  if (t.model_ == "llama") {
    t.type_ = Type::kSpm;
    t.bos_ = 1;
    t.eos_ = 2;
    t.unk_ = 0;
    t.add_space_prefix_ = true;
    t.add_bos_ = true;
    t.clean_spaces_ = false;
  } else if (t.model_ == "gpt2") {
    t.type_ = Type::kBpe;
    t.bos_ = 11;
    t.eos_ = 11;
    t.unk_ = -1;
    const std::string pre = t.pre_.empty() ? "default" : t.pre_;
    const PreInfo* info = nullptr;
    for (const PreInfo& p : kPreInfos) {
      if (pre == p.name) info = &p;
    }
    if (!info) {
      std::string names;
      for (const PreInfo& p : kPreInfos) names += std::string(names.empty() ? "" : ", ") + p.name;
      f.Throw("tokenizer.ggml.pre = '" + pre + "' is not supported by moe.cpp (supported: " +
              names + ")");
    }
    t.pre_type_ = info->type;
    t.clean_spaces_ = info->clean_spaces;
    t.ignore_merges_ = info->ignore_merges;
    t.add_bos_ = info->add_bos;
    if (info->bos_null) t.bos_ = -1;
  } else {
    f.Throw("tokenizer.ggml.model = '" + t.model_ +
            "' is not supported (moe.cpp reads gpt2, llama and none vocabularies)");
  }
  t.add_space_prefix_ =
      f.GetBoolOpt("tokenizer.ggml.add_space_prefix").value_or(t.add_space_prefix_);

  t.LoadVocab(f);
  if (n_vocab != 0 && t.n_vocab_ != n_vocab) {
    f.Throw(StrFormat("tokenizer.ggml.tokens has %u entries but the model has %u token "
                      "embeddings: the vocabulary does not belong to these weights",
                      t.n_vocab_, n_vocab));
  }

  if (t.type_ == Type::kBpe) {
    const GgufValue* merges = f.Find("tokenizer.ggml.merges");
    if (!merges) f.Throw("tokenizer.ggml.model = gpt2 needs 'tokenizer.ggml.merges' (missing)");
    if (merges->type != GgufType::kArray || merges->elem_type != GgufType::kString) {
      f.Throw("key 'tokenizer.ggml.merges' must be an array of strings");
    }
    t.bpe_ranks_.reserve(merges->strs.size() * 2);
    for (size_t i = 0; i < merges->strs.size(); ++i) {
      const std::string& m = merges->strs[i];
      // Split at the first space after the first byte, as llama.cpp does; a merge without a
      // space becomes ("", "") and can never apply.
      const size_t sp = m.size() > 1 ? m.find(' ', 1) : std::string::npos;
      std::string key = sp == std::string::npos
                            ? MergeKey("", "")
                            : MergeKey(std::string_view(m).substr(0, sp),
                                       std::string_view(m).substr(sp + 1));
      t.bpe_ranks_.emplace(std::move(key), static_cast<int32_t>(i));  // first rank wins
    }
  }
  t.SetupSpecialTokens(f);
  return tok;
}

void Tokenizer::LoadVocab(const GgufFile& f) {
  const GgufValue* tokens = f.Find("tokenizer.ggml.tokens");
  if (!tokens) {
    f.Throw("tokenizer.ggml.model = " + model_ + " needs 'tokenizer.ggml.tokens' (missing)");
  }
  if (tokens->type != GgufType::kArray || tokens->elem_type != GgufType::kString) {
    f.Throw("key 'tokenizer.ggml.tokens' must be an array of strings");
  }
  const size_t n = tokens->strs.size();
  if (n == 0 || n > 0x7FFFFFFF) f.Throw("tokenizer.ggml.tokens is empty");
  n_vocab_ = static_cast<uint32_t>(n);

  scores_.assign(n, 0.0f);
  if (const GgufValue* s = f.Find("tokenizer.ggml.scores")) {
    if (s->type != GgufType::kArray ||
        (s->elem_type != GgufType::kF32 && s->elem_type != GgufType::kI32)) {
      f.Throw("key 'tokenizer.ggml.scores' must be an array of f32 (or i32)");
    }
    const bool is_f = s->elem_type == GgufType::kF32;
    const size_t m = is_f ? s->arr_f.size() : s->arr_i.size();
    if (m < n) {
      f.Throw(StrFormat("tokenizer.ggml.scores has %zu entries, fewer than the %zu tokens", m, n));
    }
    for (size_t i = 0; i < n; ++i) {
      scores_[i] = is_f ? static_cast<float>(s->arr_f[i]) : static_cast<float>(s->arr_i[i]);
    }
  }
  types_.assign(n, static_cast<int32_t>(TokenType::kNormal));
  if (f.Has("tokenizer.ggml.token_type")) {
    const std::vector<int32_t> tt = f.GetI32Array("tokenizer.ggml.token_type");
    if (tt.size() < n) {
      f.Throw(StrFormat("tokenizer.ggml.token_type has %zu entries, fewer than the %zu tokens",
                        tt.size(), n));
    }
    std::copy(tt.begin(), tt.begin() + n, types_.begin());
  }

  text_.resize(n);
  attr_.resize(n);
  token_to_id_.reserve(n * 2);
  for (size_t i = 0; i < n; ++i) {
    std::string word = tokens->strs[i];
    if (word.empty()) word = "[EMPTY_" + std::to_string(i) + "]";  // as llama.cpp renames them
    auto [it, inserted] = token_to_id_.emplace(word, static_cast<int32_t>(i));
    if (!inserted) {
      f.Throw(StrFormat("tokenizer.ggml.tokens holds '%s' twice (ids %d and %zu): token texts "
                        "must be unique", word.c_str(), it->second, i));
    }
    text_[i] = std::move(word);
    switch (static_cast<TokenType>(types_[i])) {
      case TokenType::kNormal: attr_[i] = kAttrNormal; break;
      case TokenType::kUnknown: attr_[i] = kAttrUnknown; break;
      case TokenType::kControl: attr_[i] = kAttrControl; break;
      case TokenType::kUserDefined: attr_[i] = kAttrUserDefined; break;
      case TokenType::kUnused: attr_[i] = kAttrUnused; break;
      case TokenType::kByte: attr_[i] = kAttrByte; break;
      default: attr_[i] = 0; break;
    }
  }
}

void Tokenizer::SetupSpecialTokens(const GgufFile& f) {
  const int32_t n = static_cast<int32_t>(n_vocab_);
  int32_t sep = -1, mask = -1, fim_pre = -1, fim_suf = -1, fim_mid = -1, fim_pad = -1,
          fim_rep = -1, fim_sep = -1;
  const std::pair<const char*, int32_t*> keys[] = {
      {"tokenizer.ggml.bos_token_id", &bos_},
      {"tokenizer.ggml.eos_token_id", &eos_},
      {"tokenizer.ggml.eot_token_id", &eot_},
      {"tokenizer.ggml.eom_token_id", &eom_},
      {"tokenizer.ggml.unknown_token_id", &unk_},
      {"tokenizer.ggml.seperator_token_id", &sep},
      {"tokenizer.ggml.padding_token_id", &pad_},
      {"tokenizer.ggml.mask_token_id", &mask},
      {"tokenizer.ggml.fim_pre_token_id", &fim_pre},
      {"tokenizer.ggml.fim_suf_token_id", &fim_suf},
      {"tokenizer.ggml.fim_mid_token_id", &fim_mid},
      {"tokenizer.ggml.fim_pad_token_id", &fim_pad},
      {"tokenizer.ggml.fim_rep_token_id", &fim_rep},
      {"tokenizer.ggml.fim_sep_token_id", &fim_sep},
      {"tokenizer.ggml.prefix_token_id", &fim_pre},  // deprecated spellings
      {"tokenizer.ggml.suffix_token_id", &fim_suf},
      {"tokenizer.ggml.middle_token_id", &fim_mid},
  };
  for (const auto& [key, id] : keys) {
    if (*id >= n) *id = -1;  // a default outside the vocabulary is dropped
    // An out-of-range id in the file is ignored (llama.cpp warns and keeps the default).
    if (const auto v = f.GetU32Opt(key); v && *v < n_vocab_) *id = static_cast<int32_t>(*v);
  }
  add_bos_ = f.GetBoolOpt("tokenizer.ggml.add_bos_token").value_or(add_bos_);
  add_eos_ = f.GetBoolOpt("tokenizer.ggml.add_eos_token").value_or(add_eos_);

  // Find unset EOT/EOM/FIM tokens by their text and make them control tokens. llama.cpp takes
  // the first match in hash-map order; with several candidates we take the lowest id.
  auto detect = [&](int32_t* id, const auto& texts) {
    if (*id != -1) return;
    for (int32_t i = 0; i < n; ++i) {
      if (OneOf(texts, text_[i])) {
        *id = i;
        attr_[i] |= kAttrControl;
        return;
      }
    }
  };
  detect(&eot_, kEotTexts);
  detect(&eom_, kEomTexts);
  detect(&fim_pre, kFimPreTexts);
  detect(&fim_suf, kFimSufTexts);
  detect(&fim_mid, kFimMidTexts);
  detect(&fim_pad, kFimPadTexts);
  detect(&fim_rep, kFimRepTexts);
  detect(&fim_sep, kFimSepTexts);

  for (int32_t i = 0; i < n; ++i) {
    if ((attr_[i] & kAttrControl) && text_[i].find("unused") != std::string::npos) {
      attr_[i] |= kAttrUnused;
    }
  }

  std::vector<bool> eog(n, false);
  for (int32_t id : {fim_pad, fim_rep, fim_sep}) {
    if (id >= 0) eog[id] = true;
  }
  for (int32_t i = 0; i < n; ++i) {
    if (OneOf(kEogTexts, text_[i])) {
      eog[i] = true;
      attr_[i] |= kAttrControl;
    }
  }
  // gpt-oss: these are always rendered.
  for (const char* s : {"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"}) {
    if (const int32_t id = Lookup(s); id >= 0) attr_[id] = kAttrUserDefined;
  }
  for (int32_t id : {eos_, eot_, eom_}) {
    if (id >= 0) eog[id] = true;
  }
  {
    // gpt-oss / solar-open: "<|end|>" ends a message, not the generation.
    auto in_eog = [&](const char* s) {
      const int32_t id = Lookup(s);
      return id >= 0 && eog[id];
    };
    const bool has_return = in_eog("<|return|>");
    const bool has_call = in_eog("<|call|>") || in_eog("<|calls|>");
    const bool has_flush = in_eog("<|flush|>");
    if (in_eog("<|end|>") && ((has_return && has_call) || (has_call && has_flush))) {
      const int32_t id = Lookup("<|end|>");
      eog[id] = false;
      attr_[id] = kAttrUserDefined;
    }
    // gemma4 / paddleocr: "</s>" is not an end token when "<|tool_response>" is.
    if (in_eog("<|tool_response>") && in_eog("</s>")) {
      const int32_t id = Lookup("</s>");
      eog[id] = false;
      attr_[id] = kAttrNormal;
    }
  }
  eog_.clear();
  for (int32_t i = 0; i < n; ++i) {
    if (eog[i]) eog_.push_back(i);
  }

  special_tokens_.clear();
  for (int32_t i = 0; i < n; ++i) {
    if (attr_[i] & (kAttrControl | kAttrUserDefined | kAttrUnknown)) special_tokens_.push_back(i);
  }
  std::stable_sort(special_tokens_.begin(), special_tokens_.end(), [&](int32_t a, int32_t b) {
    return text_[a].size() > text_[b].size();
  });

  // Per-model strip attributes llama.cpp derives from the model name and pre-tokenizer.
  std::string name = f.GetStringOpt("general.name").value_or("");
  std::transform(name.begin(), name.end(), name.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  const std::string arch = f.GetStringOpt("general.architecture").value_or("");
  auto set_attr = [&](const char* s, uint32_t bit, bool on) {
    const int32_t id = Lookup(s);
    if (id < 0) return;
    attr_[id] = on ? (attr_[id] | bit) : (attr_[id] & ~bit);
  };
  const bool jina = pre_.find("jina-v2-de") != std::string::npos ||
                    pre_.find("jina-v2-es") != std::string::npos ||
                    pre_.find("jina-v2-code") != std::string::npos ||
                    arch.find("nomic-bert-moe") != std::string::npos ||
                    arch.find("jina-bert-v3") != std::string::npos;
  if (jina) {
    set_attr("<mask>", kAttrLstrip, true);
  } else if (name.find("phi-3") != std::string::npos || name.find("phi3") != std::string::npos) {
    for (int32_t id : special_tokens_) attr_[id] |= kAttrRstrip;
    set_attr("</s>", kAttrRstrip, true);
    for (const char* s : {"<unk>", "<s>", "<|endoftext|>"}) set_attr(s, kAttrRstrip, false);
  } else if (name.find("modern-bert") != std::string::npos) {
    set_attr("[MASK]", kAttrLstrip, true);
  }
}

int32_t Tokenizer::Lookup(std::string_view text) const {
  const auto it = token_to_id_.find(std::string(text));
  return it == token_to_id_.end() ? -1 : it->second;
}

std::optional<int32_t> Tokenizer::TextToToken(std::string_view text) const {
  if (type_ == Type::kNone) return std::nullopt;
  const int32_t id = Lookup(text);
  if (id < 0) return std::nullopt;
  return id;
}

const std::string& Tokenizer::TokenText(int32_t id) const {
  if (type_ == Type::kNone || id < 0 || id >= static_cast<int32_t>(n_vocab_)) {
    Fail("token id %d has no text (vocabulary of %u tokens, model %s)", id, n_vocab_,
         model_.c_str());
  }
  return text_[id];
}

TokenType Tokenizer::token_type(int32_t id) const {
  TokenText(id);  // range check
  return static_cast<TokenType>(types_[id]);
}

float Tokenizer::score(int32_t id) const {
  TokenText(id);
  return scores_[id];
}

bool Tokenizer::IsEog(int32_t id) const {
  return std::binary_search(eog_.begin(), eog_.end(), id);
}

std::vector<Tokenizer::Fragment> Tokenizer::Partition(std::string_view text,
                                                      bool parse_special) const {
  std::vector<Fragment> frags{{-1, 0, text.size()}};
  for (int32_t id : special_tokens_) {
    if (!parse_special && (attr_[id] & (kAttrControl | kAttrUnknown))) continue;
    const std::string& tt = text_[id];
    std::vector<Fragment> next;
    next.reserve(frags.size() + 2);
    for (const Fragment& fr : frags) {
      if (fr.token >= 0) {
        next.push_back(fr);
        continue;
      }
      size_t pos = fr.begin;
      const size_t end = fr.begin + fr.len;
      while (pos < end) {
        const size_t hit = text.substr(0, end).find(tt, pos);
        if (hit == std::string_view::npos) break;
        size_t left_len = hit - pos;
        if (attr_[id] & kAttrLstrip) {
          while (left_len > 0 && CIsSpace(text[pos + left_len - 1])) left_len--;
        }
        if (left_len > 0) next.push_back({-1, pos, left_len});
        next.push_back({id, hit, tt.size()});
        pos = hit + tt.size();
        if (attr_[id] & kAttrRstrip) {
          while (pos < end && CIsSpace(text[pos])) pos++;
        }
      }
      if (pos < end) next.push_back({-1, pos, end - pos});
    }
    frags = std::move(next);
  }
  return frags;
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_special) const {
  return Encode(text, add_special, /*parse_special=*/false);
}

std::vector<int32_t> Tokenizer::Encode(std::string_view text, bool add_special,
                                       bool parse_special) const {
  if (type_ == Type::kNone) {
    Fail("this model has no vocabulary (tokenizer.ggml.model = none): pass token ids with "
         "--prompt-ids");
  }
  std::vector<int32_t> out;
  const std::vector<Fragment> frags =
      text.empty() ? std::vector<Fragment>{} : Partition(text, parse_special);
  if (add_special && add_bos_) {
    if (bos_ < 0) Fail("the vocabulary asks for a BOS token (add_bos_token) but has none");
    out.push_back(bos_);
  }
  bool prev_special = true;  // SPM: a space is prefixed to text at the start / after a special
  for (const Fragment& fr : frags) {
    if (fr.token >= 0) {
      out.push_back(fr.token);
      prev_special = true;
      continue;
    }
    const std::string_view piece = text.substr(fr.begin, fr.len);
    if (type_ == Type::kSpm) {
      std::string s = (add_space_prefix_ && prev_special) ? " " : "";
      s.append(piece);
      ReplaceAll(&s, " ", kSpmSpace);
      EncodeSpm(s, &out);
    } else {
      EncodeBpe(piece, &out);
    }
    prev_special = false;
  }
  if (add_special && add_eos_) {
    if (eos_ < 0) Fail("the vocabulary asks for an EOS token (add_eos_token) but has none");
    out.push_back(eos_);
  }
  return out;
}

int32_t Tokenizer::BpeRank(std::string_view left, std::string_view right) const {
  const auto it = bpe_ranks_.find(MergeKey(left, right));
  return it == bpe_ranks_.end() ? -1 : it->second;
}

void Tokenizer::EncodeBpe(std::string_view text, std::vector<int32_t>* out) const {
  struct Symbol {
    size_t begin, n;  // bytes of the word
    int prev, next;
  };
  struct Bigram {
    int left, right;
    int32_t rank;
    std::string text;
  };
  // Lowest rank first; among equal ranks the leftmost (llama.cpp's order).
  auto worse = [](const Bigram& a, const Bigram& b) {
    return a.rank > b.rank || (a.rank == b.rank && a.left > b.left);
  };
  for (const std::string& word : PreTokenize(pre_type_, text, /*byte_encode=*/true)) {
    if (ignore_merges_) {
      if (const int32_t id = Lookup(word); id >= 0) {
        out->push_back(id);
        continue;
      }
    }
    std::vector<Symbol> syms;
    for (size_t off = 0; off < word.size();) {
      const size_t len = std::min(word.size() - off, Utf8SeqLen(word[off]));
      syms.push_back({off, len, static_cast<int>(syms.size()) - 1, -1});
      off += len;
    }
    for (size_t i = 0; i + 1 < syms.size(); ++i) syms[i].next = static_cast<int>(i + 1);
    auto view = [&](const Symbol& s) { return std::string_view(word).substr(s.begin, s.n); };
    std::priority_queue<Bigram, std::vector<Bigram>, decltype(worse)> queue(worse);
    auto add_bigram = [&](int l, int r) {
      if (l < 0 || r < 0) return;
      const int32_t rank = BpeRank(view(syms[l]), view(syms[r]));
      if (rank < 0) return;
      std::string joined(view(syms[l]));
      joined.append(view(syms[r]));
      queue.push({l, r, rank, std::move(joined)});
    };
    for (size_t i = 1; i < syms.size(); ++i) add_bigram(static_cast<int>(i - 1), static_cast<int>(i));
    while (!queue.empty()) {
      const Bigram bg = queue.top();
      queue.pop();
      Symbol& l = syms[bg.left];
      Symbol& r = syms[bg.right];
      if (l.n == 0 || r.n == 0) continue;
      // Stale entry: one side has grown since it was queued.
      if (l.n + r.n != bg.text.size() || word.compare(l.begin, l.n + r.n, bg.text) != 0 ||
          l.next != bg.right) {
        continue;
      }
      l.n += r.n;
      r.n = 0;
      l.next = r.next;
      if (r.next >= 0) syms[r.next].prev = bg.left;
      add_bigram(l.prev, bg.left);
      add_bigram(bg.left, l.next);
    }
    for (const Symbol& s : syms) {
      if (s.n == 0) continue;
      const std::string_view piece = view(s);
      if (const int32_t id = Lookup(piece); id >= 0) {
        out->push_back(id);
        continue;
      }
      // Not in the vocabulary: fall back to single-byte tokens where they exist.
      for (char ch : piece) {
        if (const int32_t id = Lookup(std::string_view(&ch, 1)); id >= 0) out->push_back(id);
      }
    }
  }
}

int32_t Tokenizer::SpmByteToken(uint8_t byte) const {
  int32_t id = Lookup(StrFormat("<0x%02X>", byte));
  if (id < 0) id = Lookup(std::string(1, static_cast<char>(byte)));
  if (id < 0) {
    Fail("the SentencePiece vocabulary has no byte token <0x%02X> for a character it cannot "
         "spell: the vocabulary needs the 256 <0xXX> byte-fallback tokens", byte);
  }
  return id;
}

void Tokenizer::EncodeSpm(std::string_view text, std::vector<int32_t>* out) const {
  struct Symbol {
    size_t begin, n;
    int prev, next;
  };
  struct Bigram {
    int left, right;
    float score;
    size_t size;
  };
  // Highest score first; among equal scores the leftmost.
  auto worse = [](const Bigram& a, const Bigram& b) {
    return a.score < b.score || (a.score == b.score && a.left > b.left);
  };
  std::vector<Symbol> syms;
  for (size_t off = 0; off < text.size();) {
    const size_t len = std::min(text.size() - off, Utf8SeqLen(text[off]));
    syms.push_back({off, len, static_cast<int>(syms.size()) - 1, -1});
    off += len;
  }
  for (size_t i = 0; i + 1 < syms.size(); ++i) syms[i].next = static_cast<int>(i + 1);
  std::priority_queue<Bigram, std::vector<Bigram>, decltype(worse)> queue(worse);
  auto add_bigram = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    const size_t size = syms[l].n + syms[r].n;  // adjacent symbols are contiguous bytes
    const int32_t id = Lookup(text.substr(syms[l].begin, size));
    if (id < 0) return;
    queue.push({l, r, scores_[id], size});
  };
  for (size_t i = 1; i < syms.size(); ++i) add_bigram(static_cast<int>(i - 1), static_cast<int>(i));
  while (!queue.empty()) {
    const Bigram bg = queue.top();
    queue.pop();
    Symbol& l = syms[bg.left];
    Symbol& r = syms[bg.right];
    if (l.n == 0 || r.n == 0 || l.n + r.n != bg.size) continue;
    l.n += r.n;
    r.n = 0;
    l.next = r.next;
    if (r.next >= 0) syms[r.next].prev = bg.left;
    add_bigram(l.prev, bg.left);
    add_bigram(bg.left, l.next);
  }
  if (syms.empty()) return;
  for (int i = 0; i != -1; i = syms[i].next) {
    const std::string_view piece = text.substr(syms[i].begin, syms[i].n);
    if (const int32_t id = Lookup(piece); id >= 0) {
      out->push_back(id);
      continue;
    }
    // Every merged symbol is a token, so only single characters get here: spell them in bytes.
    for (char ch : piece) out->push_back(SpmByteToken(static_cast<uint8_t>(ch)));
  }
}

std::string Tokenizer::TokenToPiece(int32_t id, bool special) const {
  if (type_ == Type::kNone) return "";
  if (id < 0 || id >= static_cast<int32_t>(n_vocab_)) {
    Fail("token id %d is out of range (vocabulary of %u tokens)", id, n_vocab_);
  }
  const uint32_t attr = attr_[id];
  if (!special && (attr & (kAttrUnknown | kAttrControl))) return "";
  const std::string& text = text_[id];
  if (attr & (kAttrUnknown | kAttrControl | kAttrUserDefined)) return text;
  if (attr & kAttrNormal) {
    if (type_ == Type::kBpe) return DecodeByteLevel(text);
    std::string s = text;
    ReplaceAll(&s, kSpmSpace, " ");
    return s;
  }
  if (attr & kAttrByte) {
    // "<0xAB>" -> 0xAB (llama.cpp parses characters 3..4 as hex, 0 if they are not)
    const std::string hex = text.size() > 3 ? text.substr(3, 2) : "";
    return std::string(1, static_cast<char>(std::strtol(hex.c_str(), nullptr, 16)));
  }
  return "";
}

std::string Tokenizer::Decode(const std::vector<int32_t>& ids, const DecodeOptions& opt) const {
  if (type_ == Type::kNone) return "";
  std::string out;
  bool remove_space = add_space_prefix_;  // only the first token's piece loses its space
  for (int32_t id : ids) {
    std::string piece = TokenToPiece(id, opt.special);
    if (remove_space && !piece.empty() && piece[0] == ' ') piece.erase(0, 1);
    remove_space = false;
    out += piece;
  }
  if (opt.clean_spaces) CleanSpaces(&out);
  return out;
}

void CopyTokenizerKeys(const GgufFile& src, GgufWriter& dst) {
  for (const auto& [key, value] : src.kvs()) {
    if (key.rfind("tokenizer.", 0) == 0) dst.SetValue(key, value);
  }
}

}  // namespace moe
