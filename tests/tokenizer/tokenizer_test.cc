// Tokenizer tests.
//  * Conformance: make_vocab.py trains byte-level BPE vocabularies (one per supported
//    tokenizer.ggml.pre family) and SentencePiece-style ones on a multilingual corpus;
//    tokenize_oracle.mjs tokenizes a set of texts with llama.cpp (node-llama-cpp); every id,
//    special-token id, end-of-generation set and detokenized string must match.
//  * Unit tests on hand-reasoned cases: Unicode tables, UTF-8 decoding, the GPT-2 alphabet,
//    the pre-tokenizers' splits, BPE rank order, SPM score order and byte fallback, errors.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "formats/gguf.h"
#include "tokenizer/pretokenizer.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"
#include "util/error.h"

namespace moe {
namespace {

using json = nlohmann::json;
using Ids = std::vector<int32_t>;

std::string RepoRoot() {
  std::string f = __FILE__;  // <root>/tests/tokenizer/tokenizer_test.cc
  for (int i = 0; i < 3; ++i) f = f.substr(0, f.find_last_of('/'));
  return f;
}

std::string TempDir() {
  static const std::string dir = [] {
    const char* base = std::getenv("MOE_TEST_TMP");
    std::string d;
    if (base && *base) {
      d = std::string(base) + "/tokenizer";
      std::system(("mkdir -p '" + d + "'").c_str());
    } else {
      char tmpl[] = "/tmp/moe_tokenizer_XXXXXX";
      const char* p = mkdtemp(tmpl);
      d = p ? p : "/tmp";
    }
    return d;
  }();
  return dir;
}

std::string ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// ---------------------------------------------------------------------------------------------
// The llama.cpp oracle, built once per process.

struct OracleData {
  std::string error;  // non-empty: why the oracle could not be produced
  json manifest, oracle;
  std::map<std::string, size_t> index;  // vocab name -> position in both arrays
};

const OracleData& Oracle() {
  static const OracleData data = [] {
    OracleData d;
    const std::string root = RepoRoot();
    const std::string nlc = root + "/third_party/npm/node_modules/node-llama-cpp/dist/index.js";
    struct stat st;
    if (stat(nlc.c_str(), &st) != 0) {
      d.error = "node-llama-cpp is missing (" + nlc + "): run scripts/setup.sh";
      return d;
    }
    const std::string dir = TempDir();
    const std::string log = dir + "/oracle.log";
    const std::string make = "python3 '" + root + "/tests/tokenizer/make_vocab.py' '" + dir +
                             "' > '" + log + "' 2>&1";
    if (std::system(make.c_str()) != 0) {
      d.error = "make_vocab.py failed: " + ReadFile(log);
      return d;
    }
    const char* node_env = std::getenv("MOE_NODE");
    const std::string node = node_env && *node_env ? node_env : "node";
    const std::string run = node + " '" + root + "/tests/tokenizer/tokenize_oracle.mjs' '" +
                            dir + "/manifest.json' '" + dir + "/oracle.json' >> '" + log +
                            "' 2>&1";
    if (std::system(run.c_str()) != 0) {
      d.error = "tokenize_oracle.mjs failed (is node-llama-cpp installed? run scripts/setup.sh): " +
                ReadFile(log);
      return d;
    }
    try {
      d.manifest = json::parse(ReadFile(dir + "/manifest.json"));
      d.oracle = json::parse(ReadFile(dir + "/oracle.json"));
    } catch (const std::exception& e) {
      d.error = std::string("cannot parse the oracle output: ") + e.what();
      return d;
    }
    for (size_t i = 0; i < d.manifest["vocabs"].size(); ++i) {
      d.index[d.manifest["vocabs"][i]["name"].get<std::string>()] = i;
    }
    return d;
  }();
  return data;
}

std::string Show(const std::string& s) {  // printable form for failure messages
  std::string out;
  for (unsigned char c : s) {
    if (c == '\n') out += "\\n";
    else if (c == '\t') out += "\\t";
    else if (c == '\r') out += "\\r";
    else if (c < 0x20 || c == 0x7F) out += StrFormat("\\x%02x", c);
    else out += static_cast<char>(c);
  }
  return out;
}

// Asserts that `tok` reproduces llama.cpp's results `ov` (one vocabulary of tokenize_oracle.mjs
// output) on `texts`.
void ExpectMatchesOracle(const Tokenizer& tok, const json& ov,
                         const std::vector<std::string>& texts) {
  ASSERT_EQ(tok.n_vocab(), ov["n_vocab"].get<uint32_t>());
  EXPECT_EQ(tok.bos(), ov["bos"].get<int32_t>());
  EXPECT_EQ(tok.eos(), ov["eos"].get<int32_t>());
  const int32_t their_eot = ov["eot"].get<int32_t>();
  if (tok.eot() != their_eot) {
    // With several EOT-looking texts and no eot_token_id, llama.cpp takes the first in hash-map
    // order and we the lowest id: both must then be end-of-generation tokens.
    EXPECT_TRUE(their_eot >= 0 && tok.eot() >= 0 && tok.IsEog(their_eot) && tok.IsEog(tok.eot()))
        << "eot: ours " << tok.eot() << ", llama.cpp " << their_eot;
  }
  EXPECT_EQ(tok.add_bos(), ov["add_bos"].get<bool>());
  EXPECT_EQ(tok.add_eos(), ov["add_eos"].get<bool>());
  const Ids their_eog = ov["eog"].get<Ids>();
  EXPECT_EQ(tok.eog_ids(), their_eog);
  for (int32_t id = 0; id < static_cast<int32_t>(tok.n_vocab()); ++id) {
    EXPECT_EQ(tok.IsEog(id), std::find(their_eog.begin(), their_eog.end(), id) != their_eog.end())
        << "token " << id;
  }
  const bool spm = tok.model() == "llama";
  const DecodeOptions plain{.special = false, .clean_spaces = tok.clean_spaces()};
  const DecodeOptions special{.special = true, .clean_spaces = tok.clean_spaces()};

  ASSERT_EQ(texts.size(), ov["texts"].size());
  size_t n_ids = 0;
  for (size_t i = 0; i < texts.size(); ++i) {
    const std::string& text = texts[i];
    const json& r = ov["texts"][i];
    SCOPED_TRACE("text #" + std::to_string(i) + " \"" + Show(text) + "\"");
    const Ids ids = tok.Encode(text, /*add_special=*/false);
    EXPECT_EQ(ids, r["ids"].get<Ids>());
    const Ids ids_special = tok.Encode(text, false, /*parse_special=*/true);
    EXPECT_EQ(ids_special, r["ids_special"].get<Ids>());
    n_ids += ids.size();

    // add_special only adds the vocabulary's BOS / EOS around the same ids.
    Ids with = ids;
    if (tok.add_bos()) with.insert(with.begin(), tok.bos());
    if (tok.add_eos()) with.push_back(tok.eos());
    EXPECT_EQ(tok.Encode(text, /*add_special=*/true), with);

    EXPECT_EQ(tok.Decode(r["ids"].get<Ids>(), plain), r["detok"].get<std::string>());
    EXPECT_EQ(tok.Decode(r["ids_special"].get<Ids>(), special),
              r["detok_special"].get<std::string>());
    // Without the clean-up pass decoding gives the text back, except where llama.cpp's SPM
    // rules add a space after a special token (every text fragment gets the space prefix) or
    // strip spaces around one.
    bool has_special = false;
    for (int32_t id : ids) {
      const TokenType t = tok.token_type(id);
      has_special |= t != TokenType::kNormal && t != TokenType::kByte;
    }
    if (!spm || !has_special) {
      EXPECT_EQ(tok.Decode(ids), text);
    }
  }
  EXPECT_GT(n_ids, texts.size()) << "the texts produced almost no tokens";

  // Single-token pieces. JavaScript strings carry no invalid UTF-8: where our piece is not
  // valid UTF-8 (a byte token, half a character) llama.cpp's arrives with U+FFFD.
  const Ids piece_ids = ov["piece_ids"].get<Ids>();
  ASSERT_EQ(piece_ids.size(), ov["pieces"].size());
  size_t n_compared = 0;
  for (size_t k = 0; k < piece_ids.size(); ++k) {
    const int32_t id = piece_ids[k];
    for (bool sp : {false, true}) {
      const std::string ours = tok.Decode({id}, sp ? special : plain);
      const std::string theirs = ov[sp ? "pieces_special" : "pieces"][k].get<std::string>();
      if (IsValidUtf8(ours)) {
        EXPECT_EQ(ours, theirs) << "token " << id << " '" << Show(tok.TokenText(id)) << "'";
        n_compared++;
      } else {
        EXPECT_NE(theirs.find("\xEF\xBF\xBD"), std::string::npos) << "token " << id;
      }
    }
  }
  EXPECT_GT(n_compared, piece_ids.size());
}

class OracleTest : public ::testing::TestWithParam<const char*> {};

TEST_P(OracleTest, MatchesLlamaCpp) {
  const OracleData& o = Oracle();
  ASSERT_TRUE(o.error.empty()) << o.error;
  const auto it = o.index.find(GetParam());
  ASSERT_NE(it, o.index.end()) << "make_vocab.py wrote no vocabulary " << GetParam();
  const json& mv = o.manifest["vocabs"][it->second];
  const json& ov = o.oracle["vocabs"][it->second];
  ASSERT_EQ(ov["name"], mv["name"]);
  auto file = GgufFile::Open(mv["path"].get<std::string>());
  auto tok = Tokenizer::FromGguf(*file, 0);
  ASSERT_TRUE(tok->HasVocab());
  EXPECT_EQ(tok->model(), mv["model"].get<std::string>());
  EXPECT_EQ(tok->eot(), ov["eot"].get<int32_t>());  // these files have one EOT candidate
  ExpectMatchesOracle(*tok, ov, o.manifest["texts"].get<std::vector<std::string>>());
}

INSTANTIATE_TEST_SUITE_P(Vocabs, OracleTest,
                         ::testing::Values("bpe_default", "bpe_llama3", "bpe_qwen2", "bpe_qwen35",
                                           "bpe_olmo", "bpe_deepseek_llm", "bpe_deepseek_v3",
                                           "bpe_deepseek_coder", "bpe_starcoder", "bpe_dbrx",
                                           "spm", "spm_noprefix"));

// ---------------------------------------------------------------------------------------------
// The real vocabularies llama.cpp tests itself with (models/ggml-vocab-*.gguf in the llama.cpp
// source node-llama-cpp bundles; not ggml-vocab-aquila.gguf, a GGUF v2 file the reader rejects),
// on llama.cpp's own test texts. Slower (vocabularies of up to
// 256k tokens): it runs as the ctest "tokenizer_real_vocabs" (tests.cmake), which sets
// MOE_TOKENIZER_REAL_VOCABS=1.

constexpr const char* kRealVocabs[] = {
    "baichuan", "command-r", "deepseek-coder", "deepseek-llm", "gpt-2", "gpt-neox",
    "llama-bpe", "llama-spm", "mpt", "phi-3", "qwen2", "qwen35", "refact", "starcoder"};
constexpr const char* kUnsupportedRealVocabs[] = {"bert-bge", "falcon", "gemma-4"};

bool RealVocabsEnabled() {
  const char* e = std::getenv("MOE_TOKENIZER_REAL_VOCABS");
  return e && std::string(e) == "1";
}

struct RealOracleData {
  std::string error, dir;
  std::vector<std::string> texts;
  json oracle;
  std::map<std::string, size_t> index;
};

const RealOracleData& RealOracle() {
  static const RealOracleData data = [] {
    RealOracleData d;
    const std::string root = RepoRoot();
    const std::string bundle =
        root + "/third_party/npm/node_modules/node-llama-cpp/llama/gitRelease.bundle";
    struct stat st;
    if (stat(bundle.c_str(), &st) != 0) {
      d.error = "node-llama-cpp's llama.cpp source bundle is missing (" + bundle +
                "): run scripts/setup.sh";
      return d;
    }
    d.dir = TempDir() + "/real";
    const std::string log = d.dir + "/oracle.log";
    const std::string git = "git --git-dir='" + d.dir + "/llama.git' ";
    if (std::system(("rm -rf '" + d.dir + "' && mkdir -p '" + d.dir + "' && git clone -q --bare '" +
                     bundle + "' '" + d.dir + "/llama.git' > '" + log + "' 2>&1")
                        .c_str()) != 0) {
      d.error = "cannot unpack " + bundle + " with git: " + ReadFile(log);
      return d;
    }
    std::vector<std::string> names(std::begin(kRealVocabs), std::end(kRealVocabs));
    names.insert(names.end(), std::begin(kUnsupportedRealVocabs),
                 std::end(kUnsupportedRealVocabs));
    for (const std::string& n : names) {
      const std::string cmd = git + "show HEAD:models/ggml-vocab-" + n + ".gguf > '" + d.dir +
                              "/" + n + ".gguf' 2>> '" + log + "'";
      if (std::system(cmd.c_str()) != 0) {
        d.error = "the llama.cpp bundle has no models/ggml-vocab-" + n + ".gguf: " + ReadFile(log);
        return d;
      }
    }
    // llama.cpp's tokenizer test texts (test-tokenizer-0 format) plus a few of our own.
    if (std::system((git + "show HEAD:models/ggml-vocab-llama-bpe.gguf.inp > '" + d.dir +
                     "/texts.inp' 2>> '" + log + "'").c_str()) != 0) {
      d.error = "cannot read models/ggml-vocab-llama-bpe.gguf.inp: " + ReadFile(log);
      return d;
    }
    const std::string inp = ReadFile(d.dir + "/texts.inp");
    const std::string sep = "\n__ggml_vocab_test__\n";
    for (size_t pos = 0; pos < inp.size();) {
      size_t hit = inp.find(sep, pos);
      if (hit == std::string::npos) hit = inp.size();
      d.texts.push_back(inp.substr(pos, hit - pos));
      pos = hit + sep.size();
    }
    for (const char* t : {"don't I'LL 1234567 caf\xC3\xA9 \xE4\xB8\xAD\xE6\x96\x87 \xF0\x9F\x99\x82",
                          "<|endoftext|><|im_start|>user\nhi<|im_end|>", "<s>[INST] x [/INST]",
                          "  <|assistant|>  ok </s> ", "\t\tdef f():\n\t\treturn 1\n\n\n"}) {
      d.texts.push_back(t);
    }
    json manifest;
    manifest["texts"] = d.texts;
    for (size_t i = 0; i < std::size(kRealVocabs); ++i) {
      manifest["vocabs"].push_back({{"name", kRealVocabs[i]},
                                    {"path", d.dir + "/" + kRealVocabs[i] + ".gguf"},
                                    {"piece_stride", 13}});
      d.index[kRealVocabs[i]] = i;
    }
    {
      std::ofstream out(d.dir + "/manifest.json");
      out << manifest.dump();
    }
    const char* node_env = std::getenv("MOE_NODE");
    const std::string node = node_env && *node_env ? node_env : "node";
    const std::string run = node + " '" + root + "/tests/tokenizer/tokenize_oracle.mjs' '" +
                            d.dir + "/manifest.json' '" + d.dir + "/oracle.json' >> '" + log +
                            "' 2>&1";
    if (std::system(run.c_str()) != 0) {
      d.error = "tokenize_oracle.mjs failed (run scripts/setup.sh?): " + ReadFile(log);
      return d;
    }
    try {
      d.oracle = json::parse(ReadFile(d.dir + "/oracle.json"));
    } catch (const std::exception& e) {
      d.error = std::string("cannot parse the oracle output: ") + e.what();
    }
    return d;
  }();
  return data;
}

class RealVocabTest : public ::testing::TestWithParam<const char*> {};

TEST_P(RealVocabTest, MatchesLlamaCpp) {
  if (!RealVocabsEnabled()) {
    GTEST_SKIP() << "runs as the ctest tokenizer_real_vocabs (MOE_TOKENIZER_REAL_VOCABS=1)";
  }
  const RealOracleData& o = RealOracle();
  ASSERT_TRUE(o.error.empty()) << o.error;
  const size_t i = o.index.at(GetParam());
  const json& ov = o.oracle["vocabs"][i];
  ASSERT_EQ(ov["name"], GetParam());
  auto file = GgufFile::Open(o.dir + "/" + GetParam() + ".gguf");
  auto tok = Tokenizer::FromGguf(*file, 0);
  ExpectMatchesOracle(*tok, ov, o.texts);
}

INSTANTIATE_TEST_SUITE_P(Llama, RealVocabTest, ::testing::ValuesIn(kRealVocabs));

TEST(RealVocab, UnsupportedVocabulariesFailCleanly) {
  if (!RealVocabsEnabled()) {
    GTEST_SKIP() << "runs as the ctest tokenizer_real_vocabs (MOE_TOKENIZER_REAL_VOCABS=1)";
  }
  const RealOracleData& o = RealOracle();
  ASSERT_TRUE(o.error.empty()) << o.error;
  for (const char* name : kUnsupportedRealVocabs) {
    auto file = GgufFile::Open(o.dir + "/" + name + ".gguf");
    try {
      Tokenizer::FromGguf(*file, 0);
      ADD_FAILURE() << name << " loaded, expected a 'not supported' error";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("not supported"), std::string::npos) << e.what();
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Unicode helpers.

TEST(Unicode, Categories) {
  EXPECT_EQ(CategoryOf('a'), UnicodeCategory::kLetter);
  EXPECT_EQ(CategoryOf('Z'), UnicodeCategory::kLetter);
  EXPECT_EQ(CategoryOf(0xE9), UnicodeCategory::kLetter);     // é
  EXPECT_EQ(CategoryOf(0x4E2D), UnicodeCategory::kLetter);   // 中
  EXPECT_EQ(CategoryOf(0x30AB), UnicodeCategory::kLetter);   // カ
  EXPECT_EQ(CategoryOf('7'), UnicodeCategory::kNumber);
  EXPECT_EQ(CategoryOf(0xB2), UnicodeCategory::kNumber);     // ² (No)
  EXPECT_EQ(CategoryOf(0x2163), UnicodeCategory::kNumber);   // Ⅳ (Nl)
  EXPECT_EQ(CategoryOf(0x301), UnicodeCategory::kMark);      // combining acute
  EXPECT_EQ(CategoryOf('!'), UnicodeCategory::kPunctuation);
  EXPECT_EQ(CategoryOf(0x3002), UnicodeCategory::kPunctuation);  // 。
  EXPECT_EQ(CategoryOf('$'), UnicodeCategory::kSymbol);
  EXPECT_EQ(CategoryOf(0x1F642), UnicodeCategory::kSymbol);  // 🙂
  EXPECT_EQ(CategoryOf(' '), UnicodeCategory::kSeparator);
  EXPECT_EQ(CategoryOf(0x3000), UnicodeCategory::kSeparator);
  EXPECT_EQ(CategoryOf('\n'), UnicodeCategory::kControl);
  EXPECT_EQ(CategoryOf(0x200D), UnicodeCategory::kControl);  // ZWJ (Cf)
  EXPECT_EQ(CategoryOf(0xE000), UnicodeCategory::kControl);  // private use
  EXPECT_EQ(CategoryOf(0x378), UnicodeCategory::kUnassigned);
  EXPECT_EQ(CategoryOf(0x10FFFF), UnicodeCategory::kUnassigned);
  EXPECT_EQ(CategoryOf(0x110000), UnicodeCategory::kUnassigned);
  EXPECT_TRUE(IsUnicodeWhitespace('\t'));
  EXPECT_TRUE(IsUnicodeWhitespace(0x85));
  EXPECT_TRUE(IsUnicodeWhitespace(0x3000));
  EXPECT_TRUE(IsUnicodeWhitespace(0x200A));
  EXPECT_FALSE(IsUnicodeWhitespace(0x200B));  // zero width space is not White_Space
  EXPECT_FALSE(IsUnicodeWhitespace(0x1C));
  EXPECT_STREQ(UnicodeTablesVersion(), "14.0.0");
}

TEST(Unicode, DecodeUtf8LikeLlamaCpp) {
  using V = std::vector<uint32_t>;
  EXPECT_EQ(DecodeUtf8("a\xC3\xA9\xE4\xB8\xAD\xF0\x9F\x99\x82"), (V{'a', 0xE9, 0x4E2D, 0x1F642}));
  EXPECT_EQ(DecodeUtf8("\xFF"), (V{0xFFFD}));
  EXPECT_EQ(DecodeUtf8("\x80z"), (V{0xFFFD, 'z'}));
  EXPECT_EQ(DecodeUtf8("a\xC3"), (V{'a', 0xFFFD}));
  // A truncated 3-byte sequence: each byte is replaced on its own, as llama.cpp resumes at the
  // next byte (the continuation byte then fails too).
  EXPECT_EQ(DecodeUtf8("\xE4\xB8"), (V{0xFFFD, 0xFFFD}));
  EXPECT_EQ(DecodeUtf8("\xE4\xB8z"), (V{0xFFFD, 0xFFFD, 'z'}));
  EXPECT_EQ(DecodeUtf8("\xC0\x80"), (V{0}));  // overlong: decoded as written, like llama.cpp
  EXPECT_EQ(DecodeUtf8("\xF4\x90\x80\x80"), (V{0xFFFD}));  // above U+10FFFF
  EXPECT_EQ(DecodeUtf8(std::string("\0", 1)), (V{0}));
  EXPECT_TRUE(IsValidUtf8("h\xC3\xA9llo \xF0\x9F\x99\x82"));
  EXPECT_FALSE(IsValidUtf8("\xC0\x80"));
  EXPECT_FALSE(IsValidUtf8("\xED\xA0\x80"));  // surrogate
  EXPECT_FALSE(IsValidUtf8("\xE4\xB8"));
  std::string s;
  for (uint32_t cp : {0x24u, 0xA2u, 0x20ACu, 0x10348u}) AppendUtf8(cp, &s);
  EXPECT_EQ(s, "$\xC2\xA2\xE2\x82\xAC\xF0\x90\x8D\x88");
}

TEST(Unicode, Gpt2Alphabet) {
  EXPECT_EQ(ByteToGpt2CodePoint('a'), uint32_t{'a'});
  EXPECT_EQ(ByteToGpt2CodePoint('!'), uint32_t{'!'});
  EXPECT_EQ(ByteToGpt2CodePoint(0x00), 0x100u);
  EXPECT_EQ(ByteToGpt2CodePoint(' '), 0x120u);   // Ġ
  EXPECT_EQ(ByteToGpt2CodePoint('\n'), 0x10Au);  // Ċ
  EXPECT_EQ(ByteToGpt2CodePoint(0x7F), 0x121u);
  EXPECT_EQ(ByteToGpt2CodePoint(0xA0), 0x142u);
  EXPECT_EQ(ByteToGpt2CodePoint(0xAD), 0x143u);  // Ń
  EXPECT_EQ(ByteToGpt2CodePoint(0xE9), 0xE9u);
  for (int b = 0; b < 256; ++b) {
    EXPECT_EQ(Gpt2CodePointToByte(ByteToGpt2CodePoint(static_cast<uint8_t>(b))), b);
  }
  EXPECT_EQ(Gpt2CodePointToByte(' '), -1);
  EXPECT_EQ(Gpt2CodePointToByte(0xAD), -1);
  EXPECT_EQ(Gpt2CodePointToByte(0x144), -1);
}

// ---------------------------------------------------------------------------------------------
// Pre-tokenizers (byte_encode = false to read the words).

std::vector<std::string> Split(PreTokenizerType t, const std::string& s) {
  return PreTokenize(t, s, /*byte_encode=*/false);
}
using W = std::vector<std::string>;

TEST(PreTokenizer, Gpt2) {
  EXPECT_EQ(Split(PreTokenizerType::kGpt2, "Hello world  foo's 123!?"),
            (W{"Hello", " world", " ", " foo", "'s", " 123", "!?"}));
  // Contractions are case-sensitive in the GPT-2 regex.
  EXPECT_EQ(Split(PreTokenizerType::kGpt2, "I'LL go"), (W{"I", "'", "LL", " go"}));
  EXPECT_EQ(Split(PreTokenizerType::kGpt2, "a \n b   "), (W{"a", " \n", " b", "   "}));
  EXPECT_EQ(Split(PreTokenizerType::kGpt2, "caf\xC3\xA9 \xE4\xB8\xAD\xE6\x96\x87"),
            (W{"caf\xC3\xA9", " \xE4\xB8\xAD\xE6\x96\x87"}));
}

TEST(PreTokenizer, Llama3AndQwen2) {
  EXPECT_EQ(Split(PreTokenizerType::kLlama3, "1234567"), (W{"123", "456", "7"}));
  EXPECT_EQ(Split(PreTokenizerType::kLlama3, "I'LL don't"), (W{"I", "'LL", " don", "'t"}));
  // [^\r\n\p{L}\p{N}]?\p{L}+ takes one leading non-letter; \s*[\r\n]+ ends at the last newline.
  EXPECT_EQ(Split(PreTokenizerType::kLlama3, "  x\n\n y"), (W{" ", " x", "\n\n", " y"}));
  EXPECT_EQ(Split(PreTokenizerType::kLlama3, "(hello) ..\n\nx"),
            (W{"(hello", ")", " ..\n\n", "x"}));
  EXPECT_EQ(Split(PreTokenizerType::kQwen2, "ab1234"), (W{"ab", "1", "2", "3", "4"}));
  // qwen35 keeps combining marks inside letter runs.
  // A mark is not \p{L} but may be the optional lead character before letters.
  EXPECT_EQ(Split(PreTokenizerType::kQwen2, "e\xCC\x81t"), (W{"e", "\xCC\x81t"}));
  EXPECT_EQ(Split(PreTokenizerType::kQwen2, "e\xCC\x81"), (W{"e", "\xCC\x81"}));
  EXPECT_EQ(Split(PreTokenizerType::kQwen35, "e\xCC\x81t"), (W{"e\xCC\x81t"}));
}

TEST(PreTokenizer, Default) {
  // Punctuation runs first, then GPT-2, then \p{N}+ (which splits the space off a number),
  // then ASCII digits in threes.
  EXPECT_EQ(Split(PreTokenizerType::kDefault, "a+b=c 1234567!!"),
            (W{"a", "+", "b", "=", "c", " ", "123", "456", "7", "!!"}));
  // Backquote is neither \p{P} nor in the extra list: GPT-2 keeps it with the space.
  EXPECT_EQ(Split(PreTokenizerType::kDefault, "x `y`"), (W{"x", " `", "y", "`"}));
}

TEST(PreTokenizer, Deepseek) {
  EXPECT_EQ(Split(PreTokenizerType::kDeepseek3, "abc1234\xE4\xB8\xAD\xE6\x96\x87x"),
            (W{"abc", "123", "4", "\xE4\xB8\xAD\xE6\x96\x87", "x"}));
  EXPECT_EQ(Split(PreTokenizerType::kDeepseek3, ".Hello world"), (W{".Hello", " world"}));
  EXPECT_EQ(Split(PreTokenizerType::kDeepseek3, "a  b\n\n"), (W{"a", " ", " b", "\n\n"}));
  EXPECT_EQ(Split(PreTokenizerType::kDeepseekLlm, "Hello, \xE4\xB8\x96\xE7\x95\x8C 123"),
            (W{"Hello", ",", " ", "\xE4\xB8\x96\xE7\x95\x8C", " ", "123"}));
  EXPECT_EQ(Split(PreTokenizerType::kDeepseekLlm, "a\r\nb  "), (W{"a", "\r", "\n", "b", "  "}));
  EXPECT_EQ(Split(PreTokenizerType::kDeepseekCoder, "x12 +"), (W{"x", "1", "2", " +"}));
}

TEST(PreTokenizer, ByteEncoding) {
  // " é" -> bytes 20 C3 A9 -> Ġ Ã ©
  EXPECT_EQ(PreTokenize(PreTokenizerType::kGpt2, " \xC3\xA9", true),
            (W{"\xC4\xA0\xC3\x83\xC2\xA9"}));
  // An invalid byte is read as U+FFFD (EF BF BD -> ï ¿ ½).
  EXPECT_EQ(PreTokenize(PreTokenizerType::kGpt2, "\xFF", true), (W{"\xC3\xAF\xC2\xBF\xC2\xBD"}));
}

// ---------------------------------------------------------------------------------------------
// Hand-built vocabularies through the real GGUF path.

std::string Gpt2Text(const std::string& raw) {
  std::string s;
  for (unsigned char c : raw) AppendUtf8(ByteToGpt2CodePoint(c), &s);
  return s;
}

struct BpeSpec {
  std::vector<std::string> extra_tokens;  // raw text, byte-encoded here
  std::vector<std::string> merges;        // raw "left right", each side byte-encoded here
  std::string pre = "gpt-2";
};

std::unique_ptr<GgufFile> WriteAndOpen(const GgufWriter& w, const std::string& name) {
  const std::string path = TempDir() + "/" + name + ".gguf";
  w.Write(path);
  return GgufFile::Open(path);
}

std::unique_ptr<GgufFile> BpeFile(const BpeSpec& spec, const std::string& name) {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.push_back(Gpt2Text(std::string(1, static_cast<char>(b))));
  for (const std::string& t : spec.extra_tokens) tokens.push_back(Gpt2Text(t));
  std::vector<std::string> merges;
  for (const std::string& m : spec.merges) {
    const size_t sp = m.find(' ');
    merges.push_back(Gpt2Text(m.substr(0, sp)) + " " + Gpt2Text(m.substr(sp + 1)));
  }
  GgufWriter w;
  w.SetString("general.architecture", "llama");
  w.SetString("tokenizer.ggml.model", "gpt2");
  w.SetString("tokenizer.ggml.pre", spec.pre);
  w.SetStringArray("tokenizer.ggml.tokens", tokens);
  w.SetStringArray("tokenizer.ggml.merges", merges);
  w.SetU32("tokenizer.ggml.eos_token_id", 0);
  return WriteAndOpen(w, name);
}

int32_t Id(const Tokenizer& t, const std::string& raw) {
  const auto id = t.TextToToken(Gpt2Text(raw));
  EXPECT_TRUE(id.has_value()) << raw;
  return id.value_or(-1);
}

TEST(Bpe, MergesByRank) {
  auto f = BpeFile({{"ab", "bc", "abc"}, {"a b", "b c", "ab c"}}, "bpe_rank1");
  auto t = Tokenizer::FromGguf(*f, 0);
  EXPECT_EQ(t->n_vocab(), 259u);
  // a b c: (a,b) has rank 0, (b,c) rank 1 -> ab c -> (ab,c) rank 2 -> abc
  EXPECT_EQ(t->Encode("abc", false), (Ids{Id(*t, "abc")}));
  // b c a b: (a,b) merges first, then (b,c)
  EXPECT_EQ(t->Encode("bcab", false), (Ids{Id(*t, "bc"), Id(*t, "ab")}));
  // " ab" is one word; (Ġ,a) has no merge
  EXPECT_EQ(t->Encode(" ab", false), (Ids{Id(*t, " "), Id(*t, "ab")}));
  // Equal ranks: the leftmost pair merges first.
  auto g = BpeFile({{"aa"}, {"a a"}}, "bpe_rank2");
  auto u = Tokenizer::FromGguf(*g, 0);
  EXPECT_EQ(u->Encode("aaa", false), (Ids{Id(*u, "aa"), Id(*u, "a")}));
  EXPECT_EQ(u->Encode("aaaa", false), (Ids{Id(*u, "aa"), Id(*u, "aa")}));
}

TEST(Bpe, RankOrderDecides) {
  // Same tokens, (b,c) now before (a,b): a bc, and (a,bc) is no merge.
  auto f = BpeFile({{"ab", "bc", "abc"}, {"b c", "a b", "ab c"}}, "bpe_rank3");
  auto t = Tokenizer::FromGguf(*f, 0);
  EXPECT_EQ(t->Encode("abc", false), (Ids{Id(*t, "a"), Id(*t, "bc")}));
  EXPECT_EQ(t->Decode(t->Encode("abc", false)), "abc");
}

TEST(Bpe, InvalidUtf8IsReplacementCharacter) {
  auto f = BpeFile({}, "bpe_invalid");
  auto t = Tokenizer::FromGguf(*f, 0);
  EXPECT_EQ(t->Encode("\xFF", false), t->Encode("\xEF\xBF\xBD", false));
  EXPECT_EQ(t->Encode("\xFF", false), (Ids{0xEF, 0xBF, 0xBD}));  // byte tokens are ids 0..255
  EXPECT_EQ(t->Decode({0xE4, 0xB8, 0xAD}), "\xE4\xB8\xAD");
  // Defaults without keys: gpt2 has no BOS unless asked, and the pre-tokenizer is gpt-2.
  EXPECT_FALSE(t->add_bos());
  EXPECT_EQ(t->Encode("a", true), (Ids{'a'}));
  EXPECT_EQ(t->eos(), 0);
  EXPECT_TRUE(t->IsEog(0));
  EXPECT_FALSE(t->IsEog(1));
}

std::unique_ptr<GgufFile> SpmFile(const std::vector<std::pair<std::string, float>>& pieces,
                                  const std::string& name, bool with_bytes = true) {
  std::vector<std::string> tokens = {"<unk>", "<s>", "</s>"};
  std::vector<float> scores = {0, 0, 0};
  std::vector<int32_t> types = {2, 3, 3};
  if (with_bytes) {
    for (int b = 0; b < 256; ++b) {
      tokens.push_back(StrFormat("<0x%02X>", b));
      scores.push_back(0);
      types.push_back(6);
    }
  }
  for (const auto& [p, s] : pieces) {
    tokens.push_back(p);
    scores.push_back(s);
    types.push_back(1);
  }
  GgufWriter w;
  w.SetString("general.architecture", "llama");
  w.SetString("tokenizer.ggml.model", "llama");
  w.SetStringArray("tokenizer.ggml.tokens", tokens);
  w.SetF32Array("tokenizer.ggml.scores", scores);
  w.SetI32Array("tokenizer.ggml.token_type", types);
  return WriteAndOpen(w, name);
}

const std::string kSp = "\xE2\x96\x81";  // ▁

TEST(Spm, HigherScoreMergesFirstAndBytesFallBack) {
  auto f = SpmFile({{kSp, -5}, {"a", -6}, {"b", -7}, {"ab", -1}, {kSp + "a", -0.5f}}, "spm1");
  auto t = Tokenizer::FromGguf(*f, 0);
  auto id = [&](const std::string& s) { return t->TextToToken(s).value(); };
  // "ab" -> "▁ab": (▁,a) scores -0.5 > (a,b) -1, and "▁ab" is not a piece.
  EXPECT_EQ(t->Encode("ab", false), (Ids{id(kSp + "a"), id("b")}));
  EXPECT_EQ(t->Encode("ab", true), (Ids{1, id(kSp + "a"), id("b")}));  // BOS by default
  // é is no piece: its UTF-8 bytes C3 A9 become <0xC3> <0xA9> (ids 3 + byte).
  EXPECT_EQ(t->Encode("b\xC3\xA9", false), (Ids{id(kSp), id("b"), 3 + 0xC3, 3 + 0xA9}));
  EXPECT_EQ(t->Decode(t->Encode("b\xC3\xA9 ab", false)), "b\xC3\xA9 ab");
  EXPECT_EQ(t->TokenToPiece(id(kSp + "a")), " a");
  EXPECT_EQ(t->TokenToPiece(3 + 0x41), "A");
  EXPECT_EQ(t->TokenToPiece(1), "");             // control
  EXPECT_EQ(t->TokenToPiece(1, true), "<s>");
  EXPECT_EQ(t->Decode({id(kSp + "a"), id("b")}), "ab");  // leading space of the prefix removed
  EXPECT_EQ(t->bos(), 1);
  EXPECT_EQ(t->eos(), 2);
  EXPECT_TRUE(t->IsEog(2));
}

TEST(Spm, ScoreOrderDecides) {
  auto f = SpmFile({{kSp, -5}, {"a", -6}, {"b", -7}, {"ab", 0}, {kSp + "a", -0.5f}}, "spm2");
  auto t = Tokenizer::FromGguf(*f, 0);
  auto id = [&](const std::string& s) { return t->TextToToken(s).value(); };
  EXPECT_EQ(t->Encode("ab", false), (Ids{id(kSp), id("ab")}));
}

TEST(Spm, MissingByteTokenIsAnError) {
  auto f = SpmFile({{kSp, -1}, {"a", -2}}, "spm3", /*with_bytes=*/false);
  auto t = Tokenizer::FromGguf(*f, 0);
  EXPECT_EQ(t->Encode("a", false).size(), 2u);
  EXPECT_THROW(t->Encode("z", false), Error);
}

// Any bytes at all: no crash, and decoding gives the input back (BPE: with each invalid UTF-8
// byte read as U+FFFD, as llama.cpp reads it; SPM: exactly for valid UTF-8, through byte
// fallback).
TEST(Tokenizer, ArbitraryBytesRoundTrip) {
  auto bf = BpeFile({{"ab", "bc", "abc", "\xC3\xA9"}, {"a b", "b c", "ab c", "\xC3 \xA9"}},
                    "bpe_fuzz");
  BpeSpec llama3{{"ab"}, {"a b"}, "llama-bpe"};
  auto lf = BpeFile(llama3, "bpe_fuzz_llama3");
  BpeSpec ds3{{"ab"}, {"a b"}, "deepseek-v3"};
  auto df = BpeFile(ds3, "bpe_fuzz_ds3");
  BpeSpec dflt{{"ab"}, {"a b"}, "default"};
  auto ff = BpeFile(dflt, "bpe_fuzz_default");
  auto sf = SpmFile({{kSp, -5}, {"a", -6}, {"b", -7}, {"ab", -1}, {kSp + "a", -0.5f}}, "spm_fuzz");
  std::vector<std::unique_ptr<Tokenizer>> bpe;
  for (auto* f : {&bf, &lf, &df, &ff}) bpe.push_back(Tokenizer::FromGguf(**f, 0));
  auto spm = Tokenizer::FromGguf(*sf, 0);
  uint32_t state = 1;
  auto next = [&] { return (state = state * 1664525u + 1013904223u) >> 24; };
  const std::string alphabet[] = {"a", "b", "c", " ", "  ", "\n", "\r\n", "\t", "1", "234",
                                  "'s", "!", "\xC3\xA9", "\xE4\xB8\xAD", "\xF0\x9F\x99\x82",
                                  "\xCC\x81", "\xE3\x80\x80", "\xFF", "\xC3", "\x80",
                                  "\xED\xA0\x80", std::string("\0", 1)};
  for (int iter = 0; iter < 400; ++iter) {
    std::string s;
    const int n = next() % 24;
    for (int k = 0; k < n; ++k) s += alphabet[next() % std::size(alphabet)];
    std::string expected;
    for (uint32_t cp : DecodeUtf8(s)) AppendUtf8(cp, &expected);
    for (const auto& t : bpe) {
      EXPECT_EQ(t->Decode(t->Encode(s, false)), expected) << t->pre() << " \"" << Show(s) << "\"";
    }
    if (IsValidUtf8(s)) {
      EXPECT_EQ(spm->Decode(spm->Encode(s, false)), s) << Show(s);
    }
  }
  // SPM splits characters by their lead byte without validating (llama.cpp's
  // unicode_len_utf8), so a stray lead byte swallows the first byte of the next "▁", whose
  // bytes are then spelled as bytes and decode as "▁", not as a space.
  auto id = [&](const std::string& p) { return spm->TextToToken(p).value(); };
  EXPECT_EQ(spm->Encode("\xC3 a", false),
            (Ids{id(kSp), 3 + 0xC3, 3 + 0xE2, 3 + 0x96, 3 + 0x81, id("a")}));
  EXPECT_EQ(spm->Decode(spm->Encode("\xC3 a", false)), "\xC3\xE2\x96\x81" "a");
}

// ---------------------------------------------------------------------------------------------
// Errors, ids-only models, copying.

std::string ErrorOf(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Tokenizer, NoneModel) {
  GgufWriter w;
  w.SetString("general.architecture", "llama");
  w.SetString("tokenizer.ggml.model", "none");
  w.SetU32("llama.vocab_size", 77);
  auto f = WriteAndOpen(w, "none");
  auto t = Tokenizer::FromGguf(*f, 0);
  EXPECT_FALSE(t->HasVocab());
  EXPECT_EQ(t->model(), "none");
  EXPECT_EQ(t->n_vocab(), 77u);
  EXPECT_EQ(t->bos(), -1);
  EXPECT_EQ(t->eos(), -1);
  EXPECT_EQ(t->eot(), -1);
  EXPECT_FALSE(t->IsEog(11));
  EXPECT_EQ(ErrorOf([&] { t->Encode("hi", true); }),
            "this model has no vocabulary (tokenizer.ggml.model = none): pass token ids with "
            "--prompt-ids");
  EXPECT_EQ(Tokenizer::FromGguf(*f, 5)->n_vocab(), 5u);
}

TEST(Tokenizer, BadFilesGiveOneLineErrors) {
  {
    GgufWriter w;
    w.SetString("general.architecture", "llama");
    auto f = WriteAndOpen(w, "nomodel");
    const std::string e = ErrorOf([&] { Tokenizer::FromGguf(*f, 0); });
    EXPECT_NE(e.find("tokenizer.ggml.model"), std::string::npos) << e;
    EXPECT_EQ(e.find('\n'), std::string::npos) << e;
  }
  {
    GgufWriter w;
    w.SetString("tokenizer.ggml.model", "gpt2");
    w.SetString("tokenizer.ggml.pre", "no-such-pre");
    w.SetStringArray("tokenizer.ggml.tokens", {"a"});
    w.SetStringArray("tokenizer.ggml.merges", {});
    auto f = WriteAndOpen(w, "badpre");
    const std::string e = ErrorOf([&] { Tokenizer::FromGguf(*f, 0); });
    EXPECT_NE(e.find("'no-such-pre' is not supported"), std::string::npos) << e;
  }
  {
    GgufWriter w;
    w.SetString("tokenizer.ggml.model", "gpt2");
    w.SetStringArray("tokenizer.ggml.tokens", {"a", "b"});
    auto f = WriteAndOpen(w, "nomerges");
    EXPECT_NE(ErrorOf([&] { Tokenizer::FromGguf(*f, 0); }).find("tokenizer.ggml.merges"),
              std::string::npos);
  }
  {
    GgufWriter w;
    w.SetString("tokenizer.ggml.model", "llama");
    w.SetStringArray("tokenizer.ggml.tokens", {"a", "b", "a"});
    auto f = WriteAndOpen(w, "duplicate");
    EXPECT_NE(ErrorOf([&] { Tokenizer::FromGguf(*f, 0); }).find("'a' twice (ids 0 and 2)"),
              std::string::npos);
  }
  {
    GgufWriter w;
    w.SetString("tokenizer.ggml.model", "llama");
    w.SetStringArray("tokenizer.ggml.tokens", {"a", "b"});
    w.SetF32Array("tokenizer.ggml.scores", {0.5f});
    auto f = WriteAndOpen(w, "shortscores");
    EXPECT_NE(ErrorOf([&] { Tokenizer::FromGguf(*f, 0); }).find("scores has 1 entries"),
              std::string::npos);
    auto g = SpmFile({}, "sizes");
    EXPECT_NE(ErrorOf([&] { Tokenizer::FromGguf(*g, 1000); }).find("1000 token embeddings"),
              std::string::npos);
    EXPECT_EQ(Tokenizer::FromGguf(*g, 259)->n_vocab(), 259u);
  }
  {
    GgufWriter w;
    w.SetString("tokenizer.ggml.model", "bert");
    auto f = WriteAndOpen(w, "bert");
    EXPECT_NE(ErrorOf([&] { Tokenizer::FromGguf(*f, 0); }).find("'bert' is not supported"),
              std::string::npos);
  }
}

TEST(Tokenizer, SpecialTokensAndEog) {
  std::vector<std::string> tokens;
  for (int b = 0; b < 256; ++b) tokens.push_back(Gpt2Text(std::string(1, static_cast<char>(b))));
  tokens.insert(tokens.end(), {"<|im_end|>", "<tool>", "<|endoftext|>", "<|unused_3|>"});
  std::vector<int32_t> types(256, 1);
  types.insert(types.end(), {3, 4, 1, 3});
  GgufWriter w;
  w.SetString("tokenizer.ggml.model", "gpt2");
  w.SetString("tokenizer.ggml.pre", "qwen2");
  w.SetStringArray("tokenizer.ggml.tokens", tokens);
  w.SetI32Array("tokenizer.ggml.token_type", types);
  w.SetStringArray("tokenizer.ggml.merges", {});
  w.SetU32("tokenizer.ggml.eos_token_id", 256);
  w.SetU32("tokenizer.ggml.bos_token_id", 9999);  // out of range: ignored, default 11 stays
  w.SetBool("tokenizer.ggml.add_bos_token", true);
  auto f = WriteAndOpen(w, "special");
  auto t = Tokenizer::FromGguf(*f, 0);
  EXPECT_EQ(t->bos(), 11);
  EXPECT_EQ(t->eos(), 256);
  EXPECT_EQ(t->eot(), 256);  // "<|im_end|>" (lowest id among the EOT texts)
  EXPECT_EQ(t->eog_ids(), (Ids{256, 258}));  // "<|endoftext|>" too, whatever its type
  // User-defined tokens are split out even without parse_special; control ones only with it.
  EXPECT_EQ(t->Encode("a<tool>b", false), (Ids{'a', 257, 'b'}));
  EXPECT_EQ(t->Encode("<|im_end|>", false).size(), 10u);
  EXPECT_EQ(t->Encode("x<|im_end|>", false, true), (Ids{'x', 256}));
  // "<|endoftext|>" became a control token: parsed only as special, rendered only with special.
  EXPECT_EQ(t->Encode("<|endoftext|>", false, true), (Ids{258}));
  EXPECT_EQ(t->TokenToPiece(258), "");
  EXPECT_EQ(t->TokenToPiece(258, true), "<|endoftext|>");
  EXPECT_EQ(t->TokenToPiece(257), "<tool>");
  EXPECT_EQ(t->Encode("hi", true), (Ids{11, 'h', 'i'}));
  EXPECT_EQ(t->token_type(257), TokenType::kUserDefined);
  EXPECT_THROW(t->TokenToPiece(260), Error);
  EXPECT_THROW(t->TokenToPiece(-1), Error);
}

TEST(Tokenizer, CleanSpacesLikeLlamaCpp) {
  auto f = BpeFile({}, "clean");
  auto t = Tokenizer::FromGguf(*f, 0);
  auto ids = [&](const std::string& s) {
    Ids r;
    for (unsigned char c : s) r.push_back(c);
    return r;
  };
  DecodeOptions clean{.special = false, .clean_spaces = true};
  EXPECT_EQ(t->Decode(ids("a , b . c ? d !"), clean), "a, b. c? d!");
  EXPECT_EQ(t->Decode(ids("it ' s"), clean), "it's");
  EXPECT_EQ(t->Decode(ids("he 's I 'm we 're they 've don 't I 'll I 'd"), clean),
            "he's I'm we're they've don 't I 'll I 'd");
  EXPECT_EQ(t->Decode(ids("a , b")), "a , b");  // off by default
}

TEST(Tokenizer, CopyTokenizerKeys) {
  auto src = BpeFile({{"ab"}, {"a b"}}, "copy_src");
  GgufWriter w;
  w.SetString("general.architecture", "llama");
  CopyTokenizerKeys(*src, w);
  auto dst = WriteAndOpen(w, "copy_dst");
  size_t n_tok = 0;
  for (const auto& [k, v] : src->kvs()) {
    if (k.rfind("tokenizer.", 0) == 0) {
      n_tok++;
      EXPECT_TRUE(dst->Has(k)) << k;
    }
  }
  EXPECT_EQ(dst->kvs().size(), n_tok + 1);
  auto a = Tokenizer::FromGguf(*src, 0);
  auto b = Tokenizer::FromGguf(*dst, 0);
  EXPECT_EQ(a->Encode("ab cab", false), b->Encode("ab cab", false));
  EXPECT_EQ(b->Encode("ab", false), (Ids{256}));
}

}  // namespace
}  // namespace moe
