// The weight formats against ggml itself (ggml_oracle.h: the libraries llama.cpp runs on):
//  - dequantization bit-identical to ggml's dequantize_row_<t> on random blocks (every byte
//    random: any scale, sign and quant pattern, NaN and inf scales included) and adversarial
//    rows;
//  - the quantizers byte-identical to ggml's reference quantizers (what llama-quantize writes
//    without an importance matrix) on normal, uniform, wide, tiny, outlier, constant and zero
//    rows;
//  - the products (ConvertActivations + MatMul) equal to ggml's vec_dot on the activations
//    ggml's from_float makes, within the float summation-order error.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/ggml_oracle.h"
#include "kernels/kernels.h"
#include "kernels/weight_types.h"
#include "tensor/dtype.h"

namespace moe {
namespace {

using kernels::ActivationRowBytes;
using kernels::ConvertActivations;
using kernels::DequantizeRow;
using kernels::QuantizeRow;
using kernels::QuantizerUsesImportance;

const test::GgmlOracle* Oracle() {
  std::string why;
  const test::GgmlOracle* o = test::GgmlOracle::Get(&why);
#if defined(__x86_64__)
  if (!o) ADD_FAILURE() << why;  // setup.sh installs it on every x86-64 machine
#endif
  return o;
}

bool SameFloat(float a, float b) {
  if (std::isnan(a) && std::isnan(b)) return true;
  uint32_t x, y;
  std::memcpy(&x, &a, 4);
  std::memcpy(&y, &b, 4);
  return x == y;
}

// Rows that stress a quantizer: scales, signs, ties, outliers, degenerate blocks.
std::vector<std::vector<float>> AdversarialRows(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  std::uniform_real_distribution<float> ud(-1.f, 1.f);
  std::vector<std::vector<float>> rows;
  auto make = [&](auto gen) {
    std::vector<float> r(n);
    for (int64_t i = 0; i < n; ++i) r[i] = gen(i);
    rows.push_back(r);
  };
  make([&](int64_t) { return nd(rng); });
  make([&](int64_t) { return ud(rng); });
  make([&](int64_t) { return 1e-4f * nd(rng); });
  make([&](int64_t) { return std::exp2(10.f * ud(rng)) * (rng() & 1 ? 1.f : -1.f); });
  make([&](int64_t i) { return i % 97 == 0 ? 50.f * nd(rng) : nd(rng); });  // outliers
  make([&](int64_t) { return 0.f; });
  make([&](int64_t) { return 1.75f; });
  make([&](int64_t i) { return static_cast<float>(i % 16) - 8.f; });  // exact grid values
  make([&](int64_t i) { return (i % 32) < 16 ? -3.f : 3.f; });
  make([&](int64_t) { return nd(rng) + 5.f; });  // all positive (k-quant mins)
  return rows;
}

// The codebook i-quants: ggml's quantizers search lattice neighbourhoods with importance
// weights; moe's search the whole codebook (kernels/quant_iq.cc). Their bytes differ; the test
// below compares the error instead.
bool IsCodebookType(DType t) {
  return t == DType::kIQ2_XXS || t == DType::kIQ2_XS || t == DType::kIQ2_S ||
         t == DType::kIQ3_XXS || t == DType::kIQ3_S || t == DType::kIQ1_S ||
         t == DType::kIQ1_M;
}

// Types whose ggml quantizer is a deterministic reference moe must reproduce byte for byte.
bool HasReferenceQuantizer(DType t) { return Traits(t).block_size > 1 && !IsCodebookType(t); }
// quantize_row_<t>_ref is not what llama-quantize writes for iq4_nl (it skips the scale
// search, ntry -1); moe follows ggml_quantize_chunk, the file writer's path, for every type.
bool RowRefIsChunk(DType t) { return t != DType::kIQ4_NL; }

TEST(GgmlOracle, DequantizationIsBitIdentical) {
  const test::GgmlOracle* o = Oracle();
  if (!o) GTEST_SKIP() << "no ggml oracle on this platform";
  std::mt19937_64 rng(1);
  for (DType t : test::AllWeightTypes(/*include_f32=*/false)) {
    const auto* tr = o->Traits(static_cast<int>(t));
    ASSERT_EQ(tr->blck_size, Traits(t).block_size) << DTypeName(t);
    ASSERT_EQ(tr->type_size, Traits(t).block_bytes) << DTypeName(t);
    const int64_t bs = Traits(t).block_size, nb = 64, n = bs * nb;
    std::vector<uint8_t> bytes(RowBytes(t, n));
    for (int round = 0; round < 20; ++round) {
      for (uint8_t& b : bytes) b = static_cast<uint8_t>(rng());
      std::vector<float> ours(n), ref(n);
      DequantizeRow(t, bytes.data(), ours.data(), n);
      tr->to_float(bytes.data(), ref.data(), n);
      for (int64_t i = 0; i < n; ++i)
        ASSERT_TRUE(SameFloat(ours[i], ref[i])) << DTypeName(t) << " element " << i << ": " << ours[i] << " vs " << ref[i];
    }
    // And the blocks the quantizers make from adversarial rows.
    if (Traits(t).block_size > 1) {
      for (const auto& row : AdversarialRows(n, 3)) {
        QuantizeRow(t, row.data(), bytes.data(), n);
        std::vector<float> ours(n), ref(n);
        DequantizeRow(t, bytes.data(), ours.data(), n);
        tr->to_float(bytes.data(), ref.data(), n);
        for (int64_t i = 0; i < n; ++i) ASSERT_TRUE(SameFloat(ours[i], ref[i])) << DTypeName(t) << " element " << i;
      }
    }
  }
}

TEST(GgmlOracle, QuantizersAreByteIdentical) {
  const test::GgmlOracle* o = Oracle();
  if (!o) GTEST_SKIP() << "no ggml oracle on this platform";
  for (DType t : test::QuantizedWeightTypes()) {
    if (!HasReferenceQuantizer(t)) continue;
    const char* name = DTypeName(t);  // ggml's names
    const int64_t n = Traits(t).block_size * 48;
    const test::GgmlOracle::FromFloat ref = o->QuantizeRef(name);
    ASSERT_NE(ref, nullptr) << name;
    int rows = 0;
    for (uint64_t seed : {1, 2, 3}) {
      for (const auto& row : AdversarialRows(n, seed)) {
        std::vector<uint8_t> ours(RowBytes(t, n)), theirs(ours.size()), chunk(ours.size());
        QuantizeRow(t, row.data(), ours.data(), n);
        // What llama-quantize calls (no importance matrix): the same bytes.
        o->QuantizeChunk(static_cast<int>(t), row.data(), chunk.data(), 1, n, nullptr);
        for (size_t i = 0; i < ours.size(); ++i)
          ASSERT_EQ(ours[i], chunk[i]) << name << " row " << rows << " byte " << i;
        if (RowRefIsChunk(t)) {
          ref(row.data(), theirs.data(), n);
          ASSERT_EQ(chunk, theirs) << name << " row " << rows;
        }
        ++rows;
      }
    }
  }
}

// With an importance matrix (llama-quantize --imatrix): ggml_quantize_chunk's weighted
// quantizers, byte for byte, for every type whose moe quantizer takes one. Importance values
// span orders of magnitude, some columns zero, as real activation statistics do.
TEST(GgmlOracle, ImportanceWeightedQuantizersAreByteIdentical) {
  const test::GgmlOracle* o = Oracle();
  if (!o) GTEST_SKIP() << "no ggml oracle on this platform";
  int checked_types = 0;
  for (DType t : test::QuantizedWeightTypes()) {
    if (!QuantizerUsesImportance(t) || IsCodebookType(t)) continue;
    ++checked_types;
    const int64_t n = Traits(t).block_size * 24;
    std::mt19937_64 rng(static_cast<uint64_t>(t) + 100);
    std::uniform_real_distribution<float> ud(-6.f, 3.f);
    int rows = 0;
    for (uint64_t seed : {1, 2}) {
      for (const auto& row : AdversarialRows(n, seed)) {
        std::vector<float> imp(n);
        for (float& v : imp) v = rng() % 17 == 0 ? 0.f : std::exp2(ud(rng));
        std::vector<uint8_t> ours(RowBytes(t, n)), theirs(ours.size()), plain(ours.size());
        QuantizeRow(t, row.data(), ours.data(), n, imp.data());
        o->QuantizeChunk(static_cast<int>(t), row.data(), theirs.data(), 1, n, imp.data());
        for (size_t i = 0; i < ours.size(); ++i)
          ASSERT_EQ(ours[i], theirs[i]) << DTypeName(t) << " row " << rows << " byte " << i;
        ++rows;
      }
    }
  }
  EXPECT_GE(checked_types, 11);
}

// Codebook types: ggml reads moe's encoding as moe does (the dequantization test above covers
// any bytes), and moe's squared error is no worse than ggml's quantizer's on the same rows
// (ggml's wants importance weights for these types: all ones, i.e. none).
TEST(GgmlOracle, CodebookQuantizersNoWorseThanGgml) {
  const test::GgmlOracle* o = Oracle();
  if (!o) GTEST_SKIP() << "no ggml oracle on this platform";
  for (DType t : test::QuantizedWeightTypes()) {
    if (!IsCodebookType(t)) continue;
    const int64_t n = 256 * 8;
    const std::vector<float> ones(n, 1.0f);
    const auto to_float = o->Dequantizer(static_cast<int>(t));
    ASSERT_NE(to_float, nullptr) << DTypeName(t);
    // Seeds 1, 2: plain squared error (ggml gets an importance matrix of ones, which some of its
    // codebook quantizers require); seed 3: both get the same random importance matrix, and
    // the error is weighted by it.
    std::mt19937_64 rng(static_cast<uint64_t>(t) + 7);
    std::uniform_real_distribution<float> ud(-6.f, 3.f);
    for (uint64_t seed : {1, 2, 3}) {
      const auto rows = AdversarialRows(n, seed);
      for (size_t r = 0; r < rows.size(); ++r) {
        const std::vector<float>& x = rows[r];
        std::vector<float> imp = ones;
        if (seed == 3) {
          for (float& v : imp) v = rng() % 17 == 0 ? 0.f : std::exp2(ud(rng));
        }
        std::vector<uint8_t> ours(RowBytes(t, n)), theirs(ours.size());
        if (seed == 3) {
          QuantizeRow(t, x.data(), ours.data(), n, imp.data());
        } else {
          QuantizeRow(t, x.data(), ours.data(), n);
        }
        o->QuantizeChunk(static_cast<int>(t), x.data(), theirs.data(), 1, n, imp.data());
        std::vector<float> y_ours(n), y_ggml_of_ours(n), y_theirs(n);
        DequantizeRow(t, ours.data(), y_ours.data(), n);
        to_float(ours.data(), y_ggml_of_ours.data(), n);
        to_float(theirs.data(), y_theirs.data(), n);
        double e_ours = 0, e_theirs = 0, norm = 0;
        for (int64_t i = 0; i < n; ++i) {
          ASSERT_TRUE(SameFloat(y_ours[i], y_ggml_of_ours[i])) << DTypeName(t) << " element " << i;
          e_ours += imp[i] * (y_ours[i] - double(x[i])) * (y_ours[i] - double(x[i]));
          e_theirs += imp[i] * (y_theirs[i] - double(x[i])) * (y_theirs[i] - double(x[i]));
          norm += imp[i] * double(x[i]) * x[i];
        }
        // 1% slack for rows where both are exact or nearly so.
        EXPECT_LE(e_ours, 1.01 * e_theirs + 1e-12 * norm)
            << DTypeName(t) << " row kind " << r << " seed " << seed << ": relative error "
            << std::sqrt(e_ours / norm) << " vs ggml's " << std::sqrt(e_theirs / norm);
        if (r == 0) {
          std::printf("%s normal row: relative RMSE %.4f (ggml %.4f)\n", DTypeName(t),
                      std::sqrt(e_ours / norm), std::sqrt(e_theirs / norm));
        }
      }
    }
  }
}

TEST(GgmlOracle, ProductsMatchGgmlVecDot) {
  const test::GgmlOracle* o = Oracle();
  if (!o) GTEST_SKIP() << "no ggml oracle on this platform";
  std::mt19937_64 rng(7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (DType t : test::AllWeightTypes(/*include_f32=*/false)) {
    const auto* cpu = o->TraitsCpu(static_cast<int>(t));
    ASSERT_NE(cpu->vec_dot, nullptr) << DTypeName(t);
    ASSERT_EQ(cpu->vec_dot_type, static_cast<int>(VecDotType(t))) << DTypeName(t);
    // ggml has no dequantizer for q8_1: its d * q is ours (checked against a restatement of
    // the formula in quant_test).
    test::GgmlOracle::ToFloat act_to_float = o->Dequantizer(cpu->vec_dot_type);
    if (act_to_float == nullptr && cpu->vec_dot_type == static_cast<int>(DType::kQ8_1)) {
      act_to_float = [](const void* x, float* y, int64_t n) { DequantizeRow(DType::kQ8_1, x, y, n); };
    }
    ASSERT_NE(act_to_float, nullptr) << DTypeName(t);
    for (int64_t nb : {1, 3, 16}) {
      const int64_t n = std::max<int64_t>(256, Traits(t).block_size) * nb;
      const int64_t rows = 5, tokens = 3;
      std::vector<float> w(static_cast<size_t>(rows) * n), x(static_cast<size_t>(tokens) * n);
      for (float& v : w) v = nd(rng);
      for (float& v : x) v = nd(rng);
      const size_t rb = RowBytes(t, n);
      std::vector<uint8_t> wq(rb * rows);
      for (int64_t r = 0; r < rows; ++r) QuantizeRow(t, &w[r * n], wq.data() + r * rb, n);
      // Ours.
      const size_t ab = ActivationRowBytes(t, n);
      std::vector<uint8_t> act(ab * tokens);
      for (int64_t k = 0; k < tokens; ++k) ConvertActivations(t, &x[k * n], act.data() + k * ab, n);
      std::vector<float> y(static_cast<size_t>(tokens) * rows);
      kernels::MatMul(t, wq.data(), n, 0, rows, act.data(), ab, tokens, y.data(), rows);
      // ggml's: its own activation conversion and vec_dot.
      const auto* vdt = o->Traits(cpu->vec_dot_type);
      std::vector<uint8_t> gact(static_cast<size_t>(n / vdt->blck_size * vdt->type_size) + 64);
      std::vector<float> wdq(n), xdq(n);
      for (int64_t k = 0; k < tokens; ++k) {
        test::GgmlOracle::FromFloat from = o->TraitsCpu(cpu->vec_dot_type)->from_float;
        if (from == nullptr) from = vdt->from_float_ref;  // f16 / bf16: the base library's
        ASSERT_NE(from, nullptr) << DTypeName(t);
        from(&x[k * n], gact.data(), n);
        act_to_float(gact.data(), xdq.data(), n);
        for (int64_t r = 0; r < rows; ++r) {
          float s = 0;
          cpu->vec_dot(static_cast<int>(n), &s, 0, wq.data() + r * rb, 0, gact.data(), 0, 1);
          o->Traits(static_cast<int>(t))->to_float(wq.data() + r * rb, wdq.data(), n);
          double mag = 0;
          for (int64_t i = 0; i < n; ++i) mag += std::fabs(static_cast<double>(wdq[i]) * xdq[i]);
          // Same integer block dots; float sums in another order, and activation quants that
          // may differ by one step at exact rounding ties (ggml's generic rounds half away from
          // zero, its x86 code, which moe follows, half to even).
          const double tol = 1e-5 * mag + 1e-6;
          ASSERT_NEAR(y[k * rows + r], s, tol) << DTypeName(t) << " n=" << n << " row " << r << " token " << k;
        }
      }
    }
  }
}

// The activation conversion (ConvertActivations) is byte for byte ggml's CPU from_float for
// each vec-dot type, on normal rows and on rows with exact rounding ties.
TEST(GgmlOracle, ActivationConversionIsByteIdentical) {
  const test::GgmlOracle* o = Oracle();
  if (!o) GTEST_SKIP() << "no ggml oracle on this platform";
  for (DType t : test::AllWeightTypes(/*include_f32=*/false)) {
    const DType vt = VecDotType(t);
    test::GgmlOracle::FromFloat from = o->TraitsCpu(static_cast<int>(vt))->from_float;
    if (from == nullptr) from = o->Traits(static_cast<int>(vt))->from_float_ref;
    ASSERT_NE(from, nullptr) << DTypeName(vt);
    const int64_t n = 256 * 8;
    std::vector<std::vector<float>> rows = AdversarialRows(n, 11);
    std::vector<float> ties(n);  // amax 127: every x.5 is a rounding tie
    for (int64_t i = 0; i < n; ++i) ties[i] = (i % 32 == 0) ? 127.f : static_cast<float>(i % 120) - 59.5f;
    rows.push_back(ties);
    for (size_t r = 0; r < rows.size(); ++r) {
      std::vector<uint8_t> ours(ActivationRowBytes(t, n)), theirs(ours.size());
      ConvertActivations(t, rows[r].data(), ours.data(), n);
      from(rows[r].data(), theirs.data(), n);
      ASSERT_EQ(ours, theirs) << DTypeName(t) << " -> " << DTypeName(vt) << " row " << r;
    }
  }
}

// Not a test: the decode kernels' speed against ggml's vec_dot, one thread, on the same hot
// matrix (2816 x 1024, weights written by moe's quantizer) and each engine's own activation
// conversion. Run with the CPU library llama.cpp picks on this machine, e.g.
//   MOE_GGML_CPU=libggml-cpu-zen4.so MOE_BENCH_TYPES=iq1_m,iq2_xs test_kernels
//     --gtest_also_run_disabled_tests --gtest_filter='*DecodeKernelVsGgml*'
TEST(GgmlOracle, DISABLED_DecodeKernelVsGgml) {
  const test::GgmlOracle* o = Oracle();
  if (!o) GTEST_SKIP() << "no ggml oracle on this platform";
  const int64_t rows = 2816, n = 1024;
  const char* sel = std::getenv("MOE_BENCH_TYPES");
  const std::string list = std::string(",") + (sel ? sel : "") + ",";
  std::mt19937_64 rng(11);
  std::normal_distribution<float> nd(0.f, 1.f);
  // Best of 5 runs of >= 0.2 s each (the machine is shared): GB/s of weights.
  const auto best_gbs = [](size_t bytes, auto&& fn) {
    double best = 0;
    for (int run = 0; run < 5; ++run) {
      const auto t0 = std::chrono::steady_clock::now();
      double secs = 0;
      int it = 0;
      do {
        fn();
        ++it;
        secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      } while (secs < 0.2);
      best = std::max(best, static_cast<double>(bytes) * it / secs * 1e-9);
    }
    return best;
  };
  std::printf("%-8s %10s %10s %7s\n", "type", "moe GB/s", "ggml GB/s", "ratio");
  for (DType t : test::AllWeightTypes(/*include_f32=*/false)) {
    if (sel && list.find(std::string(",") + DTypeName(t) + ",") == std::string::npos) continue;
    const auto* cpu = o->TraitsCpu(static_cast<int>(t));
    const size_t rb = RowBytes(t, n);
    std::vector<float> w(static_cast<size_t>(n)), x(static_cast<size_t>(n));
    std::vector<uint8_t> wq(rb * rows);
    for (int64_t r = 0; r < rows; ++r) {
      for (float& v : w) v = nd(rng);
      QuantizeRow(t, w.data(), wq.data() + r * rb, n);
    }
    for (float& v : x) v = nd(rng);
    std::vector<uint8_t> act(ActivationRowBytes(t, n));
    ConvertActivations(t, x.data(), act.data(), n);
    const auto* vdt = o->Traits(cpu->vec_dot_type);
    std::vector<uint8_t> gact(static_cast<size_t>(n / vdt->blck_size * vdt->type_size) + 64);
    test::GgmlOracle::FromFloat from = o->TraitsCpu(cpu->vec_dot_type)->from_float;
    if (from == nullptr) from = vdt->from_float_ref;
    from(x.data(), gact.data(), n);
    std::vector<float> y(rows), gy(rows);
    const double ours = best_gbs(wq.size(), [&] {
      kernels::MatMul(t, wq.data(), n, 0, rows, act.data(), act.size(), 1, y.data(), rows);
    });
    const double theirs = best_gbs(wq.size(), [&] {
      for (int64_t r = 0; r < rows; ++r) {
        cpu->vec_dot(static_cast<int>(n), &gy[r], 0, wq.data() + r * rb, 0, gact.data(), 0, 1);
      }
    });
    std::printf("%-8s %10.2f %10.2f %6.2fx\n", DTypeName(t), ours, theirs, ours / theirs);
  }
}

}  // namespace
}  // namespace moe
