// moe tokenizer train's vocabularies (tokenizer/spm_trainer.h): SentencePiece's own encoder and
// moe.cpp's SPM tokenizer, reading the GGUF keys the trainer writes, give the same tokens on held-
// out text (lines, whole multi-line texts, edge cases); and the GGUF keys are what llama.cpp
// expects (types, special ids, flags). llama.cpp itself is compared in tests/train.
#include "tokenizer/spm_trainer.h"

#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "formats/gguf.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

// The repository's own prose (docs and README): real text that every checkout has.
std::vector<std::string> RepoTexts() {
  const fs::path root = fs::path(__FILE__).parent_path().parent_path().parent_path();
  std::vector<std::string> out;
  std::vector<fs::path> files = {root / "README.md"};
  for (const auto& e : fs::directory_iterator(root / "docs"))
    if (e.path().extension() == ".md") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  for (const fs::path& p : files) {
    std::ifstream in(p);
    std::stringstream ss;
    ss << in.rdbuf();
    out.push_back(ss.str());
  }
  return out;
}

std::vector<std::string> Lines(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream in(s);
  std::string l;
  while (std::getline(in, l))
    if (!l.empty()) out.push_back(l);
  return out;
}

TEST(SpmTrainer, MoeTokenizesLikeSentencePiece) {
  std::vector<std::string> texts = RepoTexts();
  ASSERT_GE(texts.size(), 3u);
  // Train on all but the last file; test on that one.
  const std::string held_out = texts.back();
  texts.pop_back();
  SpmTrainOptions o;
  o.vocab_size = 700;
  o.threads = 2;
  const std::string model = TrainSpmModel(texts, o);
  GgufWriter w;
  WriteSpmTokenizer(model, w);
  const std::vector<uint8_t> bytes = w.Serialize();
  auto f = GgufFile::FromMemory(bytes.data(), bytes.size(), "tok");
  auto tok = Tokenizer::FromGguf(*f, 0);
  EXPECT_EQ(tok->model(), "llama");
  EXPECT_EQ(tok->n_vocab(), 700u);
  EXPECT_EQ(tok->bos(), 1);
  EXPECT_EQ(tok->eos(), 2);
  EXPECT_EQ(tok->unk(), 0);
  EXPECT_TRUE(tok->add_bos());
  EXPECT_FALSE(tok->add_space_prefix());
  EXPECT_EQ(tok->token_type(0), TokenType::kUnknown);
  EXPECT_EQ(tok->token_type(1), TokenType::kControl);
  EXPECT_EQ(tok->token_type(3), TokenType::kByte);
  EXPECT_EQ(tok->TokenText(3 + 0x41), "<0x41>");
  EXPECT_EQ(tok->token_type(300), TokenType::kNormal);

  std::vector<std::string> cases = Lines(held_out);
  cases.push_back(held_out);  // a whole multi-line document
  for (const char* s : {"  two leading spaces", "trailing   ", "tab\tseparated\twords", "caf\xC3\xA9 na\xC3\xAFve \xE2\x80\x94 \xE6\x97\xA5\xE6\x9C\xAC",
                        "emoji \xF0\x9F\x98\x80 ok", "digits 1234567 3.14", "x", "\n\nblank lines\n\n", "<s> </s> <unk>"})
    cases.push_back(s);
  int checked = 0;
  for (const std::string& c : cases) {
    const std::vector<int32_t> ours = tok->Encode(c, /*add_special=*/false);
    const std::vector<int32_t> ref = SpmEncode(model, c);
    ASSERT_EQ(ours, ref) << "text: " << c.substr(0, 80);
    EXPECT_EQ(tok->Decode(ours), c);
    ++checked;
  }
  EXPECT_GT(checked, 20);
}

TEST(SpmTrainer, BadOptionsAreOneLineErrors) {
  SpmTrainOptions o;
  o.vocab_size = 100;
  try {
    TrainSpmModel({"some text"}, o);
    FAIL() << "a vocabulary below 260 tokens must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("too small"), std::string::npos) << e.what();
  }
  o.vocab_size = 100000;  // far more pieces than this text has: SentencePiece refuses
  try {
    TrainSpmModel({"a tiny text with few words"}, o);
    FAIL() << "an impossible vocabulary size must be refused";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos) << e.what();
  }
  try {
    TrainSpmModel({"", "\n\n"}, SpmTrainOptions());
    FAIL() << "no text must be refused";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("no text"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moe
