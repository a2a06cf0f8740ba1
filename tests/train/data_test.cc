// Training data (train/data.h) and upcycling (train/upcycle.h):
//  - tokenizing a large document in pieces, in parallel, gives exactly the tokens of the whole
//    document, for byte-level BPE vocabularies and trained SentencePiece ones;
//  - prompt / completion documents: only completion tokens are targets, and only inside the
//    sequence where their document starts;
//  - JSONL and folders are read as documented, bad files are one-line errors;
//  - the epoch order is a permutation fixed by (seed, epoch);
//  - Drop-Upcycling re-initialises exactly round(r F) neurons per expert, a different subset per
//    expert, with the dense matrices' statistics; plain upcycling copies the dense FFN.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "formats/gguf.h"
#include "kernels/kernels.h"
#include "tokenizer/spm_trainer.h"
#include "tokenizer/tokenizer.h"
#include "train/data.h"
#include "train/upcycle.h"
#include "util/error.h"
#include "util/threadpool.h"
#include "test_dir.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

fs::path Root() { return fs::path(__FILE__).parent_path().parent_path().parent_path(); }

std::string Dir() { return TestDir("data"); }

std::string Slurp(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// ~800 KB of prose: the repository's docs, repeated with numbered variations.
std::string BigText() {
  std::string base = Slurp(Root() / "README.md");
  for (const auto& e : fs::directory_iterator(Root() / "docs"))
    if (e.path().extension() == ".md") base += Slurp(e.path());
  std::string out;
  for (int i = 0; out.size() < 800000; ++i) out += "Part " + std::to_string(i) + ":\n" + base + "\n";
  return out;
}

std::unique_ptr<Tokenizer> FromWriter(const GgufWriter& w, std::vector<uint8_t>* keep) {
  *keep = w.Serialize();
  auto f = GgufFile::FromMemory(keep->data(), keep->size(), "tok");
  return Tokenizer::FromGguf(*f, 0);
}

std::vector<int32_t> Whole(const Tokenizer& tok, const std::string& text) {
  std::vector<int32_t> ids = tok.Encode(text, true);
  if (tok.eos() >= 0 && !tok.add_eos()) ids.push_back(tok.eos());
  return ids;
}

TEST(Data, PiecewiseTokenizationEqualsWholeDocument) {
  const std::string text = BigText();
  ThreadPool pool(2);
  std::vector<std::pair<std::string, std::unique_ptr<Tokenizer>>> toks;
  std::vector<std::vector<uint8_t>> keep(8);
  {  // a trained SentencePiece vocabulary (no space prefix)
    SpmTrainOptions o;
    o.vocab_size = 600;
    GgufWriter w;
    WriteSpmTokenizer(TrainSpmModel({text.substr(0, 200000)}, o), w);
    toks.push_back({"spm", FromWriter(w, &keep[0])});
  }
  // Byte-level BPE vocabularies with llama.cpp's pre-tokenizers (tests/tokenizer/make_vocab.py).
  const std::string vocabs = Dir() + "/vocabs";
  const std::string cmd = "/usr/bin/python3 '" + (Root() / "tests/tokenizer/make_vocab.py").string() + "' '" + vocabs +
                          "' >/dev/null 2>&1";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  for (const char* name : {"bpe_llama3", "bpe_default", "bpe_qwen2"}) {
    auto f = GgufFile::Open(vocabs + "/" + name + ".gguf");
    toks.push_back({name, Tokenizer::FromGguf(*f, 0)});
  }
  for (auto& [name, tok] : toks) {
    CorpusStats st;
    const TokenStream s = TokenizeDocuments({Document{"", text}}, *tok, &pool, &st);
    const std::vector<int32_t> whole = Whole(*tok, text);
    ASSERT_EQ(s.tokens.size(), whole.size()) << name;
    EXPECT_TRUE(s.tokens == whole) << name;
    EXPECT_TRUE(s.target.empty());
  }
}

TEST(Data, PromptTokensAreContextAndCompletionsNeedTheirPrompt) {
  SpmTrainOptions o;
  o.vocab_size = 285;
  GgufWriter w;
  WriteSpmTokenizer(TrainSpmModel({"abc=abc.\nxyz=xyz.\nhello world\n"}, o), w);
  std::vector<uint8_t> keep;
  auto tok = FromWriter(w, &keep);
  const std::vector<Document> docs = {{"abc=", "abc."}, {"", "plain text"}, {"xyz=", "xyz."}};
  CorpusStats st;
  const TokenStream s = TokenizeDocuments(docs, *tok, nullptr, &st);
  ASSERT_EQ(s.target.size(), s.tokens.size());
  ASSERT_EQ(s.doc_starts.size(), 3u);
  // Document 0: BOS + prompt (context), completion + EOS (targets).
  const std::vector<int32_t> p0 = tok->Encode("abc=", true), c0 = tok->Encode("abc.", false);
  size_t i = 0;
  for (; i < p0.size(); ++i) EXPECT_EQ(s.target[i], 0) << i;
  for (size_t j = 0; j < c0.size() + 1; ++j, ++i) EXPECT_EQ(s.target[i], 1) << i;
  EXPECT_EQ(s.tokens[i - 1], tok->eos());
  // Document 1 (plain text): every token but its BOS.
  EXPECT_EQ(s.doc_starts[1], static_cast<int64_t>(i));
  EXPECT_EQ(s.target[i], 0);  // BOS
  EXPECT_EQ(s.target[i + 1], 1);
  // Packed: a target counts only when its document starts in the same sequence.
  for (int L : {3, 5, 8}) {
    const Sequences q = Pack(s, L);
    ASSERT_EQ(q.target.size(), q.data.size());
    for (int64_t n = 0; n < q.size(); ++n) {
      for (int j = 0; j <= L; ++j) {
        const int64_t pos = n * L + j;
        int64_t start = 0;
        for (int64_t d : s.doc_starts)
          if (d <= pos) start = d;
        const uint8_t want = s.target[pos] && start >= n * L;
        EXPECT_EQ(q.target_at(n)[j], want) << "L=" << L << " seq " << n << " pos " << j;
        EXPECT_EQ(q.at(n)[j], s.tokens[pos]);
      }
    }
  }
}

TEST(Data, PackSplitAndOrder) {
  TokenStream s;
  for (int i = 0; i < 23; ++i) s.tokens.push_back(i);
  const Sequences q = Pack(s, 5);
  ASSERT_EQ(q.size(), 4);  // (23 - 1) / 5
  for (int n = 0; n < 4; ++n)
    for (int j = 0; j <= 5; ++j) EXPECT_EQ(q.at(n)[j], n * 5 + j);
  Sequences a = q;
  const Sequences b = SplitTail(&a, 1);
  EXPECT_EQ(a.size(), 3);
  EXPECT_EQ(b.size(), 1);
  EXPECT_EQ(b.at(0)[0], 15);
  EXPECT_EQ(Pack(s, 30).size(), 0);
  for (int64_t n : {1, 2, 17, 1000}) {
    const std::vector<int64_t> o1 = EpochOrder(n, 9, 3), o2 = EpochOrder(n, 9, 3), o3 = EpochOrder(n, 9, 4);
    EXPECT_EQ(o1, o2);
    std::set<int64_t> u(o1.begin(), o1.end());
    EXPECT_EQ(static_cast<int64_t>(u.size()), n);
    EXPECT_EQ(*u.begin(), 0);
    EXPECT_EQ(*u.rbegin(), n - 1);
    if (n >= 17) {
      EXPECT_NE(o1, o3);  // epochs differ
    }
  }
}

TEST(Data, ReadsFilesFoldersAndJsonl) {
  const fs::path d = fs::path(Dir()) / "docs";
  fs::remove_all(d);
  fs::create_directories(d / "sub");
  std::ofstream(d / "b.txt") << "second";
  std::ofstream(d / "a.txt") << "first";
  std::ofstream(d / "sub" / "c.jsonl") << "{\"text\": \"third\"}\n\n{\"prompt\": \"p\", \"completion\": \"c\"}\n";
  std::ofstream(d / "empty.txt") << "";
  CorpusStats st;
  const std::vector<Document> docs = ReadDocuments({d.string()}, &st);
  ASSERT_EQ(docs.size(), 4u);
  EXPECT_EQ(docs[0].text, "first");
  EXPECT_EQ(docs[1].text, "second");
  EXPECT_EQ(docs[2].text, "third");
  EXPECT_EQ(docs[3].prompt, "p");
  EXPECT_EQ(docs[3].text, "c");
  EXPECT_EQ(st.files, 4);
  auto error_of = [](const std::vector<std::string>& paths) {
    CorpusStats s;
    try {
      ReadDocuments(paths, &s);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(error_of({(d / "missing").string()}).find("does not exist"), std::string::npos);
  EXPECT_NE(error_of({(d / "empty.txt").string()}).find("no text"), std::string::npos);
  std::ofstream(d / "bad.jsonl") << "{\"text\": \"ok\"}\nnot json\n";
  EXPECT_NE(error_of({(d / "bad.jsonl").string()}).find("line 2 is not JSON"), std::string::npos);
  std::ofstream(d / "bad2.jsonl") << "{\"prompt\": \"only a prompt\"}\n";
  EXPECT_NE(error_of({(d / "bad2.jsonl").string()}).find("line 1 has neither"), std::string::npos);
  EXPECT_NE(error_of({}).find("no data"), std::string::npos);
}

// A dense llama GGUF written here with the writer (F32; D=32, F=48, 2 layers).
std::string DenseModel() {
  const std::string path = Dir() + "/dense.gguf";
  const int D = 32, F = 48, V = 40, L = 2;
  GgufWriter w;
  w.SetString("general.architecture", "llama");
  w.SetU32("llama.context_length", 64);
  w.SetU32("llama.embedding_length", D);
  w.SetU32("llama.block_count", L);
  w.SetU32("llama.feed_forward_length", F);
  w.SetU32("llama.attention.head_count", 4);
  w.SetF32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  w.SetU32("llama.vocab_size", V);
  w.SetString("tokenizer.ggml.model", "none");
  std::mt19937 rng(1);
  std::normal_distribution<float> nd(0.0f, 0.3f);
  auto add = [&](const std::string& name, std::vector<int64_t> ne, float mean) {
    int64_t n = 1;
    for (int64_t x : ne) n *= x;
    std::vector<float> v(n);
    for (float& x : v) x = mean + nd(rng);
    w.AddTensor(name, DType::kF32, ne, v.data(), v.size() * 4);
  };
  add("token_embd.weight", {D, V}, 0);
  add("output_norm.weight", {D}, 1);
  for (int i = 0; i < L; ++i) {
    const std::string b = "blk." + std::to_string(i) + ".";
    add(b + "attn_norm.weight", {D}, 1);
    add(b + "attn_q.weight", {D, D}, 0);
    add(b + "attn_k.weight", {D, D}, 0);
    add(b + "attn_v.weight", {D, D}, 0);
    add(b + "attn_output.weight", {D, D}, 0);
    add(b + "ffn_norm.weight", {D}, 1);
    add(b + "ffn_gate.weight", {D, F}, 0.05f);
    add(b + "ffn_up.weight", {D, F}, -0.02f);
    add(b + "ffn_down.weight", {F, D}, 0.01f);
  }
  w.Write(path);
  return path;
}

TEST(Upcycle, ExpertsCopyTheDenseFfnAndDropReinitialisesNeurons) {
  const std::string path = DenseModel();
  auto f = GgufFile::Open(path);
  const int D = 32, F = 48, E = 5;
  for (double r : {0.0, 0.25, 1.0}) {
    UpcycleOptions o;
    o.n_expert = E;
    o.n_expert_used = 2;
    o.drop_ratio = r;
    o.seed = 3;
    const ModelParams<float> p = Upcycle(path, o);
    EXPECT_EQ(p.config.n_expert, static_cast<uint32_t>(E));
    EXPECT_TRUE(p.tied_output);
    for (int il = 0; il < 2; ++il) {
      const std::string b = "blk." + std::to_string(il) + ".";
      const float* gate = f->FindTensor(b + "ffn_gate.weight")->F32();
      const float* up = f->FindTensor(b + "ffn_up.weight")->F32();
      const float* down = f->FindTensor(b + "ffn_down.weight")->F32();
      const MoeWeights<float>& m = p.layers[il].moe;
      std::set<std::vector<int>> subsets;
      double sum = 0, sum2 = 0;
      int64_t n_new = 0;
      for (int e = 0; e < E; ++e) {
        std::vector<int> changed;
        for (int fn = 0; fn < F; ++fn) {
          bool same_gate = true, same_up = true, same_down = true;
          for (int d = 0; d < D; ++d) {
            same_gate = same_gate && m.gate_exps[(static_cast<size_t>(e) * F + fn) * D + d] == gate[fn * D + d];
            same_up = same_up && m.up_exps[(static_cast<size_t>(e) * F + fn) * D + d] == up[fn * D + d];
            same_down = same_down && m.down_exps[(static_cast<size_t>(e) * D + d) * F + fn] == down[d * F + fn];
          }
          ASSERT_EQ(same_gate, same_up) << "a neuron is re-initialised in W_gate and W_up together";
          ASSERT_EQ(same_gate, same_down) << "and in W_down's column";
          if (!same_gate) {
            changed.push_back(fn);
            for (int d = 0; d < D; ++d) {
              const double v = m.gate_exps[(static_cast<size_t>(e) * F + fn) * D + d];
              sum += v;
              sum2 += v * v;
              ++n_new;
            }
          }
        }
        EXPECT_EQ(static_cast<int64_t>(changed.size()), std::llround(r * F)) << "expert " << e << " r=" << r;
        subsets.insert(changed);
      }
      if (r > 0 && r < 1) {
        EXPECT_EQ(static_cast<int>(subsets.size()), E) << "each expert drops its own neurons";
      }
      if (n_new > 1000) {  // the new W_gate values follow N(mean, sd) of the dense W_gate
        double m0 = 0, s0 = 0;
        for (int i = 0; i < F * D; ++i) m0 += gate[i];
        m0 /= F * D;
        for (int i = 0; i < F * D; ++i) s0 += (gate[i] - m0) * (gate[i] - m0);
        s0 = std::sqrt(s0 / (F * D));
        const double mean = sum / n_new, sd = std::sqrt(sum2 / n_new - mean * mean);
        EXPECT_NEAR(mean, m0, 4 * s0 / std::sqrt(static_cast<double>(n_new)));
        EXPECT_NEAR(sd, s0, 0.1 * s0);
      }
      for (float x : m.router) EXPECT_LT(std::fabs(x), 0.2f);  // new router ~ N(0, 0.02)
    }
  }
}

TEST(Upcycle, BadInputIsAOneLineError) {
  const std::string path = DenseModel();
  auto error_of = [&](const std::string& p, UpcycleOptions o) {
    try {
      Upcycle(p, o);
    } catch (const Error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  UpcycleOptions o;
  o.n_expert = 2;
  o.n_expert_used = 3;
  EXPECT_NE(error_of(path, o).find("--experts-used"), std::string::npos);
  o.n_expert_used = 1;
  o.drop_ratio = 1.5;
  EXPECT_NE(error_of(path, o).find("--drop-upcycling"), std::string::npos);
  // An MoE model is not a dense model.
  GgufWriter w;
  w.SetString("general.architecture", "llama");
  w.SetU32("llama.expert_count", 4);
  w.Write(Dir() + "/moe_not_dense.gguf");
  EXPECT_NE(error_of(Dir() + "/moe_not_dense.gguf", UpcycleOptions()).find("already an MoE"), std::string::npos);
  GgufWriter w2;
  w2.SetString("general.architecture", "gpt2");
  w2.Write(Dir() + "/gpt2.gguf");
  EXPECT_NE(error_of(Dir() + "/gpt2.gguf", UpcycleOptions()).find("llama or qwen3"), std::string::npos);
}

}  // namespace
}  // namespace moe
