// Forward-pass invariants that need no external oracle (llama.cpp conformance is in
// tests/conformance): batched prefill equals token-by-token decode, thread count does not
// change results beyond float reordering, and bad inputs give one-line errors.
#include "model/forward.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <filesystem>
#include <random>
#include <string>
#include <tuple>

#include "kernels/kernels.h"
#include "model/init.h"
#include "runtime/sampler.h"
#include "util/error.h"
#include "test_dir.h"
#include "test_models.h"

namespace moe {
namespace {

std::string MakeModel(Arch arch, DType type, const std::string& name, uint32_t dim, uint32_t ffn,
                      uint32_t heads, uint32_t kv_heads, uint32_t shared = 0) {
  InitOptions o = TestModelOptions(arch, type, 3, dim, ffn, heads, kv_heads, 42);
  o.config.n_ff_shexp = shared;
  return WriteTestModel(o, "forward", name);
}

std::string MakeDeepseek(const std::string& name, DType type, uint32_t q_lora, bool legacy, bool v3 = false,
                         const std::function<void(InitOptions&)>& tweak = nullptr) {
  InitOptions o = DeepseekTestOptions(type, q_lora, legacy, v3);
  if (tweak) tweak(o);
  return WriteTestModel(o, "forward", name);
}

double MaxAbsDiff(const float* a, const float* b, size_t n) {
  double m = 0;
  for (size_t i = 0; i < n; ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}

// n tokens in chunks of n_batch, against one token at a time on one thread (caches of kv).
void CheckPrefillEqualsDecode(const std::string& path, double tol, int n = 19, int n_batch = 8,
                              DType kv = DType::kF32) {
  auto model = Model::Load(path);
  const int V = static_cast<int>(model->config().n_vocab);
  std::mt19937 rng(1);
  std::vector<int32_t> toks(n);
  for (auto& t : toks) t = static_cast<int32_t>(rng() % V);
  ThreadPool pool(2);
  Forward batch(*model, pool, 128, n_batch, kv);
  std::vector<float> all;
  batch.Eval(toks.data(), static_cast<int>(toks.size()), true, &all);
  ThreadPool pool1(1);
  Forward step(*model, pool1, 128, 256, kv);
  std::vector<float> one;
  for (size_t i = 0; i < toks.size(); ++i) {
    step.Eval(&toks[i], 1, false, &one);
    ASSERT_LE(MaxAbsDiff(one.data(), &all[i * V], V), tol) << path << " position " << i;
  }
}

TEST(Forward, PrefillEqualsDecodeAllArchitectures) {
  // 19 tokens in chunks of 8 (per-token attention), then 75 in chunks of 40 and 35: batched
  // attention (blocks of 32 queries and a partial one) over an empty cache and a filled one.
  for (int n_batch : {8, 40}) {
    const int n = n_batch == 8 ? 19 : 75;
    CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kF32, "fw_llama", 96, 80, 4, 2), 2e-4, n, n_batch);
    CheckPrefillEqualsDecode(MakeModel(Arch::kQwen2Moe, DType::kF32, "fw_qwen2", 64, 48, 4, 4, 40), 2e-4, n, n_batch);
    CheckPrefillEqualsDecode(MakeModel(Arch::kOlmoe, DType::kF32, "fw_olmoe", 64, 72, 2, 2), 2e-4, n, n_batch);
    CheckPrefillEqualsDecode(MakeModel(Arch::kQwen3Moe, DType::kF32, "fw_qwen3", 64, 64, 4, 2), 2e-4, n, n_batch);
    CheckPrefillEqualsDecode(MakeDeepseek("fw_deepseek2", DType::kF32, 48, false, true), 2e-4, n, n_batch);
  }
}

// F16 caches: the batched path widens the cached rows to F32 for its GEMMs, the per-token path
// widens them as it loads them; both see the same values, so prefill equals decode as for F32,
// up to what a last-bit difference before the rounding to half precision can flip (2^-11 of
// a key or value; measured up to 2.1e-4 on the deepseek2 model, hence 1e-3).
TEST(Forward, PrefillEqualsDecodeF16Cache) {
  for (int n_batch : {8, 40}) {
    const int n = n_batch == 8 ? 19 : 75;
    CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kF32, "fw_llama", 96, 80, 4, 2), 1e-3, n, n_batch,
                             DType::kF16);
    CheckPrefillEqualsDecode(MakeModel(Arch::kQwen3Moe, DType::kF32, "fw_qwen3", 64, 64, 4, 2), 1e-3, n, n_batch,
                             DType::kF16);
    CheckPrefillEqualsDecode(MakeDeepseek("fw_deepseek2", DType::kF32, 48, false, true), 1e-3, n, n_batch,
                             DType::kF16);
  }
}

// An F16 cache holds half the bytes and moves the logits by about what rounding keys and values
// to half precision does (a few 1e-3 on these models), not more; and it is really used (the
// logits are not the F32 cache's).
TEST(Forward, F16CacheIsCloseToF32) {
  for (const std::string& path : {MakeModel(Arch::kLlama, DType::kF32, "kv16_llama", 96, 80, 4, 2),
                                  MakeDeepseek("kv16_deepseek2", DType::kF32, 48, false, true)}) {
    SCOPED_TRACE(path);
    auto model = Model::Load(path);
    const int V = static_cast<int>(model->config().n_vocab);
    std::mt19937 rng(3);
    std::vector<int32_t> toks(60);
    for (auto& t : toks) t = static_cast<int32_t>(rng() % V);
    ThreadPool pool(2);
    Forward f32(*model, pool, 64, 64, DType::kF32), f16(*model, pool, 64, 64, DType::kF16);
    EXPECT_EQ(KvCache(model->config(), 64, DType::kF16).Bytes() * 2, KvCache(model->config(), 64).Bytes());
    std::vector<float> a, b;
    f32.Eval(toks.data(), static_cast<int>(toks.size()), true, &a);
    f16.Eval(toks.data(), static_cast<int>(toks.size()), true, &b);
    const double d = MaxAbsDiff(a.data(), b.data(), a.size());
    EXPECT_GT(d, 0.0);
    EXPECT_LT(d, 2e-2);
  }
  EXPECT_THROW(ParseCacheType("q8_0"), Error);
  EXPECT_EQ(ParseCacheType("f16"), DType::kF16);
}

// MLA's forms (Forward::MlaForm) are the same function: their logits over a 40-token prefill
// (one chunk: the expanded form where the form allows it) and 5 decode steps (absorbed, except
// kPlain) agree up to rounding. Runs the model (repacked if asked) under `form`.
std::vector<float> MlaLogits(const std::string& path, Forward::MlaForm form, DType kv, bool repack = false) {
  auto model = Model::Load(path);
  ThreadPool pool(2);
  if (repack) model->RepackForInference(pool);
  const int V = static_cast<int>(model->config().n_vocab);
  std::mt19937 rng(2);
  std::vector<int32_t> toks(45);
  for (auto& t : toks) t = static_cast<int32_t>(rng() % V);
  Forward f(*model, pool, 128, 40, kv);
  f.SetMlaForm(form);
  std::vector<float> all, step;
  f.Eval(toks.data(), 40, true, &all);
  for (int i = 40; i < 45; ++i) {
    f.Eval(&toks[i], 1, false, &step);
    all.insert(all.end(), step.begin(), step.end());
  }
  return all;
}

void ExpectMlaFormsClose(const std::string& path, Forward::MlaForm a, Forward::MlaForm b, double tol,
                         DType kv = DType::kF32, bool repack_b = false) {
  const std::vector<float> x = MlaLogits(path, a, kv), y = MlaLogits(path, b, kv, repack_b);
  ASSERT_EQ(x.size(), y.size());
  EXPECT_LE(MaxAbsDiff(x.data(), y.data(), x.size()), tol) << path << " forms " << static_cast<int>(a) << " and "
                                                           << static_cast<int>(b);
}

TEST(Forward, MlaFormsAgree) {
  using M = Forward::MlaForm;
  for (const auto& [path, kv, tol] : {std::tuple{MakeDeepseek("mla_split", DType::kF32, 0, false), DType::kF32, 2e-4},
                                      std::tuple{MakeDeepseek("mla_split_qlora", DType::kF32, 48, false, true), DType::kF32, 2e-4},
                                      std::tuple{MakeDeepseek("mla_legacy", DType::kF32, 0, true), DType::kF32, 2e-4},
                                      // both read an F16 latent cache through the same widened values
                                      std::tuple{MakeDeepseek("mla_split_qlora", DType::kF32, 48, false, true), DType::kF16, 1e-3}}) {
    ExpectMlaFormsClose(path, M::kAbsorbed, M::kPlain, tol, kv);
    ExpectMlaFormsClose(path, M::kExpanded, M::kPlain, tol, kv);
    // f32 attn_k_b / attn_v_b: the default expands the prompt (rounding apart from absorbed's)
    const std::vector<float> automatic = MlaLogits(path, M::kAuto, kv), expanded = MlaLogits(path, M::kExpanded, kv),
                             absorbed = MlaLogits(path, M::kAbsorbed, kv);
    EXPECT_EQ(MaxAbsDiff(automatic.data(), expanded.data(), automatic.size()), 0.0) << path;
    EXPECT_GT(MaxAbsDiff(automatic.data(), absorbed.data(), automatic.size()), 0.0) << path;
    // The forms must be distinguishable from a wrong one: the logits move with the tokens.
    auto model = Model::Load(path);
    ThreadPool pool(2);
    Forward fresh(*model, pool, 128);
    std::vector<float> other;
    int32_t tok = 7;
    fresh.Eval(&tok, 1, false, &other);
    EXPECT_GT(MaxAbsDiff(other.data(), absorbed.data(), other.size()), 100 * tol) << path;
  }
  // Quantized attn_k_b / attn_v_b: the default keeps llama.cpp's absorbed form and roundings
  // (conformance holds it to llama.cpp); expanded on request (its attn_k_b transposed into
  // q8_0) agrees with the f32 reference to the roundings of the q8 conversions, as absorbed
  // does, on the file's layout and on the tiles the weights are repacked into (the transposed
  // attn_k_b then comes from the file). One expert per block: a rounding never flips a routing
  // choice, which in a random model moves the logits by whole units.
  const std::string q8 = MakeDeepseek("mla_q8_0", DType::kQ8_0, 64, false, false, [](InitOptions& o) {
    o.qk_nope = 64;  // attn_k_b rows of 64: repacked into tiles
    o.config.n_expert = 1;
    o.config.n_expert_used = 1;
    o.config.n_expert_shared = 1;
  });
  const std::vector<float> automatic = MlaLogits(q8, M::kAuto, DType::kF32), absorbed = MlaLogits(q8, M::kAbsorbed, DType::kF32),
                           expanded = MlaLogits(q8, M::kExpanded, DType::kF32), plain = MlaLogits(q8, M::kPlain, DType::kF32);
  EXPECT_EQ(MaxAbsDiff(automatic.data(), absorbed.data(), automatic.size()), 0.0);
  EXPECT_GT(MaxAbsDiff(expanded.data(), absorbed.data(), automatic.size()), 0.0);
  // Both quantized forms sit about 0.08 from the f32 reference on this model (logits up to 4.5);
  // a wrong key or value would move them by units.
  EXPECT_LE(MaxAbsDiff(absorbed.data(), plain.data(), plain.size()), 0.25);
  EXPECT_LE(MaxAbsDiff(expanded.data(), plain.data(), plain.size()), 0.25);
  // As CheckRepackedEqualsPlain: the tiles agree to float summation order, which can flip an
  // activation quant on a rounding boundary (here 0.03-0.06).
  ExpectMlaFormsClose(q8, M::kExpanded, M::kExpanded, 0.1, DType::kF32, /*repack_b=*/true);
}

// The latent cache is what MLA is for: kv_lora + qk_rope floats per position and layer.
TEST(Forward, MlaCachesTheLatent) {
  auto model = Model::Load(MakeDeepseek("mla_cache", DType::kF32, 0, false));
  const ModelConfig& c = model->config();
  EXPECT_EQ(c.KvBytesPerPosition(), 3u * (64 + 16) * sizeof(float));
  ThreadPool pool(1);
  Forward f(*model, pool, 100);
  EXPECT_EQ(f.KvCacheBytes(), 100u * c.KvBytesPerPosition());
}

TEST(Forward, QuantizedPrefillEqualsDecode) {
  // Quantized activations are computed per token, so batching must not change them at all
  // beyond float summation order. (Short: over more positions an activation quant that sits on
  // a rounding boundary flips with the summation order now and then, and moves a logit by a
  // few 1e-2; the attention is F32 whatever the weights, tested long above.)
  CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kQ8_0, "fw_q8", 64, 96, 2, 2), 2e-3);
  CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kQ4_K, "fw_q4k", 256, 256, 4, 2), 2e-3);
  CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kQ2_K, "fw_q2k", 256, 256, 4, 2), 2e-3);
  CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kQ3_K, "fw_q3k", 256, 256, 4, 2), 2e-3);
  CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kIQ4_XS, "fw_iq4xs", 256, 256, 4, 2), 2e-3);
  CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kIQ4_NL, "fw_iq4nl", 96, 160, 4, 2), 2e-3);
  CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kMXFP4, "fw_mxfp4", 96, 160, 4, 2), 2e-3);
  CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kIQ2_XXS, "fw_iq2xxs", 256, 256, 4, 2), 2e-3);
  CheckPrefillEqualsDecode(MakeModel(Arch::kQwen3Moe, DType::kIQ1_S, "fw_iq1s", 256, 256, 4, 2), 2e-3);
  CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kIQ1_M, "fw_iq1m", 256, 256, 4, 2), 2e-3);
  // q8_1 activations (q4_1, q5_1), an odd number of blocks per ffn_down row (96 = 3 x 32).
  CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kQ4_1, "fw_q41", 128, 96, 4, 4), 2e-3);
  CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kQ5_1, "fw_q51", 128, 96, 4, 4), 2e-3);
  CheckPrefillEqualsDecode(MakeModel(Arch::kLlama, DType::kQ5_0, "fw_q50", 96, 160, 4, 2), 2e-3);
}

// Repacked weights (Model::RepackForInference: q8_0, q4_0, q4_K and q6_K tiles, and q5_0
// widened into q8_0's, where the CPU has AVX-512 VNNI): every repacked matrix multiplies like the file's layout (up to float
// summation order, 1..6 tokens, first and last expert), a second call repacks nothing, the
// token embedding (read by rows) stays as it was, and the logits agree.
void CheckRepackedMatrices(const Model& plain, const Model& packed) {
  std::mt19937 rng(9);
  std::normal_distribution<float> nd;
  int checked = 0;
  for (size_t il = 0; il < plain.layers.size(); ++il) {
    const LayerWeights& A = plain.layers[il];
    const LayerWeights& B = packed.layers[il];
    const std::pair<const TensorView*, const TensorView*> mats[] = {
        {A.wq, B.wq}, {A.wk, B.wk}, {A.wv, B.wv}, {A.wo, B.wo}, {A.gate_exps, B.gate_exps},
        {A.up_exps, B.up_exps}, {A.down_exps, B.down_exps}, {A.gate_shexp, B.gate_shexp},
        {A.up_shexp, B.up_shexp}, {A.down_shexp, B.down_shexp}, {A.wq_a, B.wq_a}, {A.wq_b, B.wq_b},
        {A.wkv_a, B.wkv_a}, {A.wk_b, B.wk_b}, {A.wv_b, B.wv_b}, {A.ffn_gate, B.ffn_gate},
        {A.ffn_up, B.ffn_up}, {A.ffn_down, B.ffn_down}};
    for (const auto& [a, b] : mats) {
      if (!a || b->layout != WeightLayout::kTiles16) continue;
      const int64_t in = a->ne[0], rows = a->ne[1];
      const size_t rb = kernels::ActivationRowBytes(a->dtype, in);
      for (int T : {1, 4, 6, 40}) {
        std::vector<float> x(static_cast<size_t>(T) * in);
        for (float& v : x) v = nd(rng);
        std::vector<uint8_t> act(rb * T);
        for (int t = 0; t < T; ++t) kernels::ConvertActivations(a->dtype, x.data() + t * in, act.data() + t * rb, in);
        for (int64_t e : {int64_t{0}, a->ne[2] - 1}) {
          std::vector<float> ya(static_cast<size_t>(T) * rows), yb(ya.size());
          kernels::MatMul(a->dtype, a->Slab(e), in, 0, rows, act.data(), rb, T, ya.data(), rows, a->layout);
          kernels::MatMul(b->dtype, b->Slab(e), in, 0, rows, act.data(), rb, T, yb.data(), rows, b->layout);
          double scale = 0;
          for (float v : ya) scale = std::max(scale, std::fabs(static_cast<double>(v)));
          ASSERT_LE(MaxAbsDiff(ya.data(), yb.data(), ya.size()), 1e-5 * scale + 1e-6)
              << a->name << " expert " << e << ", " << T << " tokens";
          ++checked;
        }
      }
    }
  }
  EXPECT_GT(checked, 0);
}

// deepseek: MakeDeepseek's q_lora q8_0 model (dim and ffn unused) instead of a qwen2moe one.
void CheckRepackedEqualsPlain(DType type, const std::string& name, uint32_t dim, uint32_t ffn, bool deepseek = false) {
  const std::string path = deepseek ? MakeDeepseek(name, type, 64, false)
                                    : MakeModel(Arch::kQwen2Moe, type, name, dim, ffn, 4, 2, ffn);
  auto plain = Model::Load(path);
  auto packed = Model::Load(path);
  ThreadPool pool(2);
  const uint64_t bytes = packed->RepackForInference(pool);
  const DType tiles_type = type == DType::kQ5_0 ? DType::kQ8_0 : type;  // q5_0 widens to q8_0's tiles
  if (kernels::RepackLayout(tiles_type, deepseek ? 128 : dim, deepseek ? 64 : ffn) == WeightLayout::kRows) {
    EXPECT_EQ(bytes, 0u);
  } else {
    // Every multiplied matrix is q8_0 with rows in tiles and blocks in pairs.
    EXPECT_GT(bytes, 0u);
    const LayerWeights& last = packed->layers.back();
    EXPECT_EQ(last.gate_exps->layout, WeightLayout::kTiles16);
    EXPECT_EQ(last.down_shexp->layout, WeightLayout::kTiles16);
    if (deepseek) {
      EXPECT_EQ(last.wv_b->layout, WeightLayout::kTiles16);  // {64, 32, 4}: per-head tiles
      EXPECT_EQ(packed->layers[0].ffn_down->layout, WeightLayout::kTiles16);
    }
    EXPECT_EQ(packed->token_embd->layout, WeightLayout::kRows);
    CheckRepackedMatrices(*plain, *packed);
  }
  EXPECT_EQ(packed->RepackForInference(pool), 0u);
  const int V = static_cast<int>(plain->config().n_vocab);
  std::mt19937 rng(3);
  std::vector<int32_t> toks(13);
  for (auto& t : toks) t = static_cast<int32_t>(rng() % V);
  Forward a(*plain, pool, 64), b(*packed, pool, 64);
  std::vector<float> la, lb;
  a.Eval(toks.data(), 9, true, &la);
  b.Eval(toks.data(), 9, true, &lb);
  // The matrices agree to float summation order (above); through the layers an activation
  // quant that sits on a rounding boundary can flip with that order and move a logit of these
  // small random models by a few 1e-2, which a wrong layout would exceed a hundredfold.
  ASSERT_LE(MaxAbsDiff(la.data(), lb.data(), la.size()), 0.1);
  for (size_t i = 9; i < toks.size(); ++i) {
    a.Eval(&toks[i], 1, false, &la);
    b.Eval(&toks[i], 1, false, &lb);
    ASSERT_LE(MaxAbsDiff(la.data(), lb.data(), la.size()), 0.1) << name << " decode position " << i;
  }
}

TEST(Forward, RepackedWeightsGiveTheSameLogits) {
  CheckRepackedEqualsPlain(DType::kQ8_0, "fw_repack_ds", 0, 0, /*deepseek=*/true);
  CheckRepackedEqualsPlain(DType::kQ8_0, "fw_repack_q8", 128, 192);
  CheckRepackedEqualsPlain(DType::kQ4_0, "fw_repack_q4", 128, 192);
  CheckRepackedEqualsPlain(DType::kQ5_0, "fw_repack_q5", 128, 192);
  CheckRepackedEqualsPlain(DType::kQ4_K, "fw_repack_q4k", 256, 512);
  CheckRepackedEqualsPlain(DType::kQ6_K, "fw_repack_q6k", 256, 256);
}

TEST(Forward, BadTokenAndFullContextAreErrors) {
  auto model = Model::Load(MakeModel(Arch::kLlama, DType::kF32, "fw_err", 64, 64, 2, 2));
  ThreadPool pool(1);
  Forward f(*model, pool, 4);
  std::vector<float> logits;
  int32_t bad = 300;
  EXPECT_THROW(f.Eval(&bad, 1, false, &logits), Error);
  int32_t toks[5] = {1, 2, 3, 4, 5};
  EXPECT_THROW(f.Eval(toks, 5, false, &logits), Error);
  f.Eval(toks, 4, false, &logits);
  EXPECT_EQ(logits.size(), 300u);
}

// A context shorter than one block of kernels::Attend's keys (16), with a GQA group (16 query
// heads on one KV head) and MLA's heads attending together: the attention scratch must hold the
// kernel's rows x 16 floats, not only the context's; the logits are those of a long context.
TEST(Forward, TinyContextDecodesLikeALongOne) {
  for (const std::string& path : {MakeModel(Arch::kQwen3Moe, DType::kF32, "fw_tiny_gqa", 128, 64, 16, 1),
                                   MakeDeepseek("fw_tiny_mla", DType::kF32, 0, false)}) {
    auto model = Model::Load(path);
    ThreadPool pool(1);
    Forward tiny(*model, pool, 3), long_ctx(*model, pool, 64);
    std::vector<float> a, b;
    for (int32_t tok : {7, 123, 42}) {
      tiny.Eval(&tok, 1, false, &a);
      long_ctx.Eval(&tok, 1, false, &b);
      ASSERT_EQ(a, b) << path << " token " << tok;
    }
  }
}

// The cache in pages (KvCache's layout): a context over many pages gives bitwise the logits of
// one page, through batched attention (rows gathered or widened across pages; prompts in
// chunks of 40) and per-token attention (kernels::Attend over paged rows), F32 and F16, GQA and
// MLA.
TEST(Forward, PagedCacheGivesTheLogitsOfOnePage) {
  for (const std::string& path : {MakeModel(Arch::kLlama, DType::kF32, "fw_llama", 96, 80, 4, 2),
                                   MakeDeepseek("fw_deepseek2", DType::kF32, 48, false, true)}) {
    for (DType kv : {DType::kF32, DType::kF16}) {
      SCOPED_TRACE(path + " " + DTypeName(kv));
      auto model = Model::Load(path);
      const int V = static_cast<int>(model->config().n_vocab);
      ThreadPool pool(2);
      Forward f(*model, pool, 128, 40, kv);
      std::mt19937 rng(5);
      std::vector<int32_t> toks(100);
      for (auto& t : toks) t = static_cast<int32_t>(rng() % V);
      std::vector<std::vector<float>> want;
      for (int page : {128, 16}) {  // one page of 128 positions, then eight of 16
        KvCache cache(model->config(), 128, kv, page);
        std::vector<float> logits(V);
        int at = 0, step = 0;
        for (int n : {40, 35, 1, 1, 1, 1, 1, 16, 1, 1, 1, 1}) {  // 75 prompt tokens, then decode and a chunk
          SeqBatch b{&cache, toks.data() + at, n, logits.data()};
          f.EvalBatch(&b, 1);
          at += n;
          if (page == 128) {
            want.push_back(logits);
          } else {
            ASSERT_EQ(logits, want[step]) << "after " << at << " tokens";
          }
          ++step;
        }
      }
    }
  }
  auto model = Model::Load(MakeModel(Arch::kLlama, DType::kF32, "fw_llama", 96, 80, 4, 2));
  EXPECT_THROW(KvCache(model->config(), 128, DType::kF32, 24), Error);
}

// Absorbed MLA prefill splits a chunk's (token, head) rows into GEMM blocks by the thread count
// and the context, and each thread widens the latent rows once, extending them item by item: a
// row's logits must not depend on its block-mates, the threads or the cache's pages (prompts of
// 96 + 24 tokens, so that a thread runs several blocks and the second chunk reads the first's
// rows), and must stay the plain form's.
TEST(Forward, MlaAbsorbedPrefillDoesNotDependOnItsBlocks) {
  const std::string path = MakeDeepseek("fw_deepseek2_blocks", DType::kF32, 48, false, true);
  auto model = Model::Load(path);
  const int V = static_cast<int>(model->config().n_vocab);
  std::mt19937 rng(9);
  std::vector<int32_t> toks(122);
  for (auto& t : toks) t = static_cast<int32_t>(rng() % V);
  for (DType kv : {DType::kF32, DType::kF16}) {
    SCOPED_TRACE(DTypeName(kv));
    const auto run = [&](Forward::MlaForm form, int threads, int page) {
      ThreadPool pool(threads);
      Forward f(*model, pool, 128, 96, kv);
      f.SetMlaForm(form);
      KvCache cache(model->config(), 128, kv, page);
      std::vector<float> logits(V), all;
      int at = 0;
      for (int n : {96, 24, 1, 1}) {
        SeqBatch b{&cache, toks.data() + at, n, logits.data()};
        f.EvalBatch(&b, 1);
        all.insert(all.end(), logits.begin(), logits.end());
        at += n;
      }
      return all;
    };
    const std::vector<float> want = run(Forward::MlaForm::kAbsorbed, 1, 128);
    for (int threads : {2, 3})
      for (int page : {128, 16}) EXPECT_EQ(run(Forward::MlaForm::kAbsorbed, threads, page), want) << threads << " threads, pages of " << page;
    const std::vector<float> plain = run(Forward::MlaForm::kPlain, 2, 128);
    EXPECT_LE(MaxAbsDiff(want.data(), plain.data(), want.size()), kv == DType::kF16 ? 1e-3 : 2e-4);
  }
}

// Batch invariance (the server's promise): with kernels::SetBatchInvariant on, each sequence's
// logits are bitwise the same whether it runs alone or beside others, whatever the others are
// (a 40-token prompt takes batched attention, short ones the per-token path), and whatever
// position it has in the batch; sequences join and leave between steps.
void CheckBatchInvariance(const std::string& path, DType kv = DType::kF32) {
  SCOPED_TRACE(path);
  kernels::SetBatchInvariant(true);
  auto model = Model::Load(path);
  ThreadPool pool(2);
  model->RepackForInference(pool);
  const int V = static_cast<int>(model->config().n_vocab);
  Forward f(*model, pool, 96, 64, kv);
  std::mt19937 rng(7);
  const std::vector<int> lengths = {5, 40, 9};
  std::vector<std::vector<int32_t>> prompts;
  for (int n : lengths) {
    std::vector<int32_t> p(n);
    for (auto& t : p) t = static_cast<int32_t>(rng() % V);
    prompts.push_back(p);
  }
  const int kSteps = 5;
  // Alone: prompt, then greedy decode steps; logits per step.
  std::vector<std::vector<std::vector<float>>> alone(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    KvCache cache(model->config(), 96, kv);
    std::vector<float> logits(V);
    SeqBatch b{&cache, prompts[i].data(), static_cast<int>(prompts[i].size()), logits.data()};
    f.EvalBatch(&b, 1);
    alone[i].push_back(logits);
    for (int step = 0; step < kSteps; ++step) {
      const int32_t tok = Argmax(logits.data(), V);
      SeqBatch d{&cache, &tok, 1, logits.data()};
      f.EvalBatch(&d, 1);
      alone[i].push_back(logits);
    }
  }
  // Together, in reverse order, sequence 0 joining one step late and sequence 2 skipping one.
  std::vector<std::unique_ptr<KvCache>> caches;
  for (size_t i = 0; i < prompts.size(); ++i) caches.push_back(std::make_unique<KvCache>(model->config(), 96, kv));
  std::vector<std::vector<float>> logits(prompts.size(), std::vector<float>(V));
  std::vector<int> done(prompts.size(), -1);  // steps evaluated (-1: prompt not yet)
  std::vector<int32_t> next(prompts.size());
  for (int round = 0; round < kSteps + 3; ++round) {
    std::vector<SeqBatch> batch;
    for (int i = static_cast<int>(prompts.size()) - 1; i >= 0; --i) {
      if (i == 0 && round == 0) continue;  // joins late
      if (i == 2 && round == 2) continue;  // sits one step out
      if (done[i] >= kSteps) continue;
      if (done[i] < 0) {
        batch.push_back({caches[i].get(), prompts[i].data(), static_cast<int>(prompts[i].size()), logits[i].data()});
      } else {
        next[i] = Argmax(logits[i].data(), V);
        batch.push_back({caches[i].get(), &next[i], 1, logits[i].data()});
      }
    }
    if (batch.empty()) break;
    f.EvalBatch(batch.data(), static_cast<int>(batch.size()));
    for (const SeqBatch& b : batch) {
      const int i = static_cast<int>(std::find_if(caches.begin(), caches.end(),
                                                  [&](const auto& c) { return c.get() == b.cache; }) - caches.begin());
      ++done[i];
      ASSERT_EQ(logits[i], alone[i][done[i]]) << "sequence " << i << " step " << done[i];
    }
  }
  for (size_t i = 0; i < prompts.size(); ++i) EXPECT_EQ(done[i], kSteps) << "sequence " << i;
  kernels::SetBatchInvariant(false);
}

TEST(Forward, BatchedSequencesAreBitwiseTheirOwn) {
  CheckBatchInvariance(MakeModel(Arch::kLlama, DType::kF32, "bi_f32", 64, 64, 4, 2));    // float rows kernel
  CheckBatchInvariance(MakeModel(Arch::kLlama, DType::kQ4_1, "bi_q41", 128, 96, 4, 4));  // int rows kernel
  CheckBatchInvariance(MakeModel(Arch::kQwen2Moe, DType::kQ8_0, "bi_q8", 128, 128, 4, 2, 64));  // tiles (VNNI)
  CheckBatchInvariance(MakeModel(Arch::kLlama, DType::kIQ2_XXS, "bi_iq2xxs", 512, 512, 4, 2));  // 8-token groups
  CheckBatchInvariance(MakeDeepseek("bi_deepseek2", DType::kF32, 48, false, true));     // MLA
  CheckBatchInvariance(MakeModel(Arch::kLlama, DType::kQ8_0, "bi_q8_kv16", 128, 128, 4, 2), DType::kF16);
  CheckBatchInvariance(MakeDeepseek("bi_deepseek2_kv16", DType::kF32, 48, false, true), DType::kF16);
}

// A copy of a model file with some keys replaced (SetValue of the same name) and a tensor's data
// overwritten by `poke` (or the alignment changed): hostile files for the checks below.
std::string RewriteModel(const std::string& src, const std::string& name,
                         const std::function<void(GgufWriter&)>& keys,
                         const std::function<void(const std::string&, std::vector<uint8_t>&)>& poke = nullptr) {
  auto f = GgufFile::Open(src);
  GgufWriter w;
  for (const auto& [k, v] : f->kvs()) w.SetValue(k, v);
  if (keys) keys(w);
  for (const GgufTensorInfo& t : f->tensors()) {
    std::vector<uint8_t> bytes(static_cast<const uint8_t*>(t.view.data),
                               static_cast<const uint8_t*>(t.view.data) + t.view.NumBytes());
    if (poke) poke(t.view.name, bytes);
    w.AddTensor(t.view.name, t.view.dtype, std::vector<int64_t>(t.view.ne, t.view.ne + t.view.n_dims),
                bytes.data(), bytes.size());
  }
  const std::string path = TestDir("forward") + "/" + name + ".gguf";
  w.Write(path);
  return path;
}

// A NaN weight stops the forward with an error naming the block, not NaN logits; hyper-parameters
// no model has, and tensors that are not 4-byte aligned, are refused at load.
TEST(Forward, HostileFilesAreOneLineErrors) {
  const std::string base = MakeModel(Arch::kLlama, DType::kF32, "fw_hostile", 64, 64, 2, 2);
  const std::string nan = RewriteModel(base, "fw_nan", nullptr, [](const std::string& n, std::vector<uint8_t>& b) {
    if (n != "blk.1.ffn_down_exps.weight") return;
    const float v = std::nanf("");
    for (size_t i = 0; i + 4 <= b.size(); i += 4) std::memcpy(&b[i], &v, 4);
  });
  auto model = Model::Load(nan);
  ThreadPool pool(1);
  Forward f(*model, pool, 16);
  std::vector<float> logits;
  const int32_t toks[3] = {1, 2, 3};
  try {
    f.Eval(toks, 3, false, &logits);
    FAIL() << "a NaN weight gave logits";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("block 1 gave a non-finite value (NaN)"), std::string::npos) << e.what();
  }
  const auto expect_load_error = [](const std::string& path, const std::string& needle) {
    try {
      Model::Load(path);
      ADD_FAILURE() << path << " loaded";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    }
  };
  expect_load_error(RewriteModel(base, "fw_base", [](GgufWriter& w) { w.SetF32("llama.rope.freq_base", 1e-45f); }),
                    "rope.freq_base");
  expect_load_error(RewriteModel(base, "fw_eps", [](GgufWriter& w) {
                      w.SetF32("llama.attention.layer_norm_rms_epsilon", 1e30f);
                    }), "layer_norm_rms_epsilon");
  expect_load_error(RewriteModel(base, "fw_ctx", [](GgufWriter& w) { w.SetU32("llama.context_length", 0); }),
                    "context_length");
  expect_load_error(RewriteModel(base, "fw_align", [](GgufWriter& w) { w.SetU32("general.alignment", 1); }),
                    "general.alignment 1");
}

TEST(Init, ImpossibleConfigsAreOneLineErrors) {
  InitOptions o;
  o.config.arch = Arch::kLlama;
  o.config.n_layer = 1;
  o.config.n_embd = 100;
  o.config.n_ff_exp = 64;
  o.config.n_expert = 4;
  o.config.n_expert_used = 5;  // k > E
  o.config.n_vocab = 50;
  EXPECT_THROW(InitRandomModel(o, TestDir("forward") + "/bad.gguf"), Error);
  o.config.n_expert_used = 2;
  o.type = DType::kQ4_K;  // rows of 100 are not multiples of 256
  try {
    InitRandomModel(o, TestDir("forward") + "/bad.gguf");
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("multiples of 256"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace moe
