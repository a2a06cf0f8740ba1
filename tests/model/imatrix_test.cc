// Importance matrices: what the forward pass gathers (the first layer's attention inputs
// recomputed here in double from the weights; expert counts against the routing), the mean the
// quantizers get, and the file format round trip. (Byte identity of the weighted quantizers and
// of the files' use by llama-quantize: tests/kernels/ggml_oracle_test.cc and
// tests/conformance/quantize_oracle.py.)
#include "model/imatrix.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>

#include "kernels/kernels.h"
#include "model/init.h"
#include "model/model.h"
#include "util/error.h"
#include "test_dir.h"
#include "test_models.h"

namespace moe {
namespace {

std::string SmallModel() {
  return WriteTestModel(TestModelOptions(Arch::kLlama, DType::kF32, 2, 64, 96, 4, 2, 7), "imatrix", "imatrix_model");
}

TEST(Imatrix, GathersTheInputsOfEveryMatrix) {
  auto model = Model::Load(SmallModel());
  const ModelConfig& c = model->config();
  const int chunk = 40, n_chunks = 3;
  std::mt19937 rng(3);
  std::vector<int32_t> tokens(chunk * n_chunks + 7);  // a partial chunk at the end is dropped
  for (auto& t : tokens) t = static_cast<int32_t>(rng() % c.n_vocab);
  const Imatrix m = GatherImatrix(*model, tokens, chunk, 2);
  EXPECT_EQ(m.chunk_count, 3u);
  EXPECT_EQ(m.chunk_size, 40u);
  EXPECT_EQ(m.entries().count("output.weight"), 0u);
  for (int il = 0; il < 2; ++il) {
    const std::string b = "blk." + std::to_string(il) + ".";
    for (const char* w : {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"})
      ASSERT_EQ(m.entries().count(b + w + ".weight"), 1u) << b << w;
    // Every token reaches k experts; gate and up see the same rows, down as many.
    const Imatrix::Entry& g = m.entries().at(b + "ffn_gate_exps.weight");
    const Imatrix::Entry& u = m.entries().at(b + "ffn_up_exps.weight");
    const Imatrix::Entry& d = m.entries().at(b + "ffn_down_exps.weight");
    ASSERT_EQ(g.counts.size(), 6u);
    double total = 0;
    for (float v : g.counts) total += v;
    EXPECT_EQ(total, chunk * n_chunks * 2.0);
    EXPECT_EQ(g.counts, d.counts);
    EXPECT_EQ(g.sum2, u.sum2);
    EXPECT_EQ(d.ne0, 96);
    EXPECT_EQ(m.entries().at(b + "attn_q.weight").counts, std::vector<float>{120.0f});
  }
  // Layer 0's attention input: rms_norm(token embedding) * attn_norm, recomputed in double.
  const int64_t E = c.n_embd;
  std::vector<double> ref(E, 0.0);
  std::vector<float> x(E);
  const float* norm = model->layers[0].attn_norm->F32();
  for (int ci = 0; ci < n_chunks; ++ci) {
    for (int t = 0; t < chunk; ++t) {
      kernels::DequantizeRow(model->token_embd->dtype, model->token_embd->Row(tokens[ci * chunk + t]), x.data(), E);
      double ms = 0;
      for (float v : x) ms += static_cast<double>(v) * v;
      const double inv = 1.0 / std::sqrt(ms / E + c.rms_eps);
      for (int64_t j = 0; j < E; ++j) {
        const double h = x[j] * inv * norm[j];
        ref[j] += h * h;
      }
    }
  }
  for (const char* w : {"blk.0.attn_q.weight", "blk.0.attn_k.weight", "blk.0.attn_v.weight"}) {
    const Imatrix::Entry& e = m.entries().at(w);
    for (int64_t j = 0; j < E; ++j) ASSERT_NEAR(e.sum2[j], ref[j], 1e-4 * ref[j] + 1e-9) << w << " column " << j;
  }
}

// deepseek2: attn_k_b and attn_v_b see what llama.cpp's absorbed graph gives them (each head's
// q_nope, each head's latent mix: one row per token and head) even where the forward pass would
// run a prompt chunk expanded (f32 weights, chunks of 40 tokens).
TEST(Imatrix, DeepseekLatentProductsAreObservedAbsorbed) {
  InitOptions o = TestModelOptions(Arch::kDeepseek2, DType::kF32, 2, 64, 32, 2, 0, 9);
  o.qk_nope = 16;
  o.config.n_rot = 8;
  o.config.n_embd_head_v = 16;
  o.config.n_lora_kv = 32;
  o.config.n_layer_dense_lead = 1;
  auto model = Model::Load(WriteTestModel(o, "imatrix", "imatrix_deepseek2"));
  std::mt19937 rng(4);
  std::vector<int32_t> tokens(80);
  for (auto& t : tokens) t = static_cast<int32_t>(rng() % model->config().n_vocab);
  const Imatrix m = GatherImatrix(*model, tokens, 40, 2);
  for (int il = 0; il < 2; ++il) {
    for (const char* w : {"attn_k_b", "attn_v_b"}) {
      const std::string name = "blk." + std::to_string(il) + "." + w + ".weight";
      ASSERT_EQ(m.entries().count(name), 1u) << name;
      EXPECT_EQ(m.entries().at(name).counts, std::vector<float>(2, 80.0f)) << name;  // per head
    }
  }
}

TEST(Imatrix, ValuesAreMeansAndUnseenMatricesGetOnes) {
  Imatrix m;
  const float r0[3] = {1, 2, 3}, r1[3] = {3, 0, -1};
  const float* rows[2] = {r0, r1};
  m.Add("w", 1, 3, 3, rows, 2);
  EXPECT_EQ(m.Values("w", 1, 3, 3), (std::vector<float>{5.0f, 2.0f, 5.0f}));
  EXPECT_EQ(m.Values("w", 0, 3, 3), (std::vector<float>{1.0f, 1.0f, 1.0f}));
  EXPECT_TRUE(m.Values("other", 0, 1, 3).empty());
  EXPECT_THROW(m.Values("w", 0, 3, 4), Error);  // another shape: the wrong model's matrix
  EXPECT_THROW(m.Values("w", 0, 1, 3), Error);
}

TEST(Imatrix, FileRoundTripAndBadFiles) {
  Imatrix m;
  std::vector<float> r(5);
  for (int i = 0; i < 5; ++i) r[i] = 0.5f * static_cast<float>(i) - 1.0f;
  const float* rows[1] = {r.data()};
  m.Add("blk.0.ffn_down_exps.weight", 2, 4, 5, rows, 1);
  m.Add("blk.0.attn_q.weight", 0, 1, 5, rows, 1);
  m.datasets = {"some.txt"};
  m.chunk_count = 2;
  m.chunk_size = 64;
  const std::string path = TestDir("imatrix") + "/round.imatrix.gguf";
  m.Save(path);
  const Imatrix back = Imatrix::Load(path);
  EXPECT_EQ(back.datasets, m.datasets);
  EXPECT_EQ(back.chunk_count, 2u);
  EXPECT_EQ(back.chunk_size, 64u);
  ASSERT_EQ(back.entries().size(), 2u);
  for (const auto& [name, e] : m.entries()) {
    EXPECT_EQ(back.entries().at(name).sum2, e.sum2) << name;
    EXPECT_EQ(back.entries().at(name).counts, e.counts) << name;
  }
  // A model file is not an importance matrix.
  try {
    Imatrix::Load(SmallModel());
    FAIL() << "a model file loaded as an imatrix";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("not an importance matrix"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moe
