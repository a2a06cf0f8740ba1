// Fuzzing the GGUF reader: every truncation of small valid files, random byte mutations of
// them, and random bytes behind a valid magic + version. Each input must either parse (and
// then every tensor byte and every getter must be safe to touch) or throw moe::Error with a
// one-line message; anything else (another exception, a crash, an ASan/UBSan report) fails.
// Inputs live in exactly-sized heap buffers so ASan catches any read past the end.
#include <gtest/gtest.h>

#include <cstring>
#include <random>

#include "formats/gguf.h"
#include "formats/gguf_test_util.h"

namespace moe {
namespace {

using gguf_test::Bytes;
using gguf_test::Kv;
using gguf_test::KvStr;
using gguf_test::KvU32;
using gguf_test::RawFile;
using gguf_test::RawTensor;

// Seed 1: a file written by GgufWriter (all writer key types, several dtypes).
std::vector<uint8_t> WriterSeed() {
  gguf_test::TempDir tmp;
  GgufWriter w;
  w.SetString("general.architecture", "llama");
  w.SetU32("llama.block_count", 2);
  w.SetF32("llama.attention.layer_norm_rms_epsilon", 1e-5f);
  w.SetBool("tokenizer.ggml.add_bos_token", true);
  w.SetStringArray("tokenizer.ggml.tokens", {"a", "bc", ""});
  w.SetF32Array("tokenizer.ggml.scores", {0.f, -1.f, 2.f});
  w.SetI32Array("tokenizer.ggml.token_type", {1, 2, 3});
  w.SetU32Array("llama.attention.head_count", {2, 4});
  w.SetI32("test.i32", -7);
  w.SetU64("test.u64", 99);
  std::vector<uint8_t> d(4096);
  for (size_t i = 0; i < d.size(); ++i) d[i] = static_cast<uint8_t>(i * 13);
  w.AddTensor("output_norm.weight", DType::kF32, {4, 2}, d.data(), 32);
  w.AddTensor("blk.0.ffn_gate_inp.weight", DType::kQ8_0, {32, 2}, d.data(), 68);
  w.AddTensor("blk.0.ffn_up_exps.weight", DType::kQ4_K, {256, 1, 1}, d.data(), 144);
  w.AddTensor("x.f16", DType::kF16, {3}, d.data(), 6);
  const std::string path = tmp.File("seed.gguf");
  w.Write(path);
  return gguf_test::ReadFileBytes(path);
}

// Seed 2: hand-built with every value type, alignment 16, small and odd tensors.
std::vector<uint8_t> RawSeed() {
  RawFile r;
  r.alignment = 16;
  r.kvs = {KvStr("general.architecture", "olmoe"),
           KvU32("general.alignment", 16),
           Kv("u8", 0, Bytes().U8(9).b),
           Kv("i8", 1, Bytes().Put<int8_t>(-9).b),
           Kv("u16", 2, Bytes().Put<uint16_t>(999).b),
           Kv("i16", 3, Bytes().Put<int16_t>(-999).b),
           Kv("i32", 5, Bytes().Put<int32_t>(-5).b),
           Kv("b", 7, Bytes().U8(1).b),
           Kv("i64", 11, Bytes().Put<int64_t>(-1).b),
           Kv("f64", 12, Bytes().Put(2.5).b),
           Kv("au8", 9, Bytes().U32(0).U64(3).U8(1).U8(2).U8(3).b),
           Kv("ab", 9, Bytes().U32(7).U64(2).U8(0).U8(1).b),
           Kv("ai64", 9, Bytes().U32(11).U64(1).Put<int64_t>(5).b),
           Kv("as", 9, Bytes().U32(8).U64(2).Str("xy").Str("").b),
           Kv("ai32", 9, Bytes().U32(5).U64(2).Put<int32_t>(1).Put<int32_t>(2).b)};
  r.tensors = {RawTensor{"a", {3}, 0, {}, {}}, RawTensor{"b", {32, 1, 2}, 2, {}, {}},
               RawTensor{"c", {1, 1, 1, 1}, 26, {}, {}}, RawTensor{"d", {5, 3}, 30, {}, {}}};
  return r.Build();
}

// Seed 3: no tensors, one key.
std::vector<uint8_t> TinySeed() {
  RawFile r;
  r.kvs = {KvU32("k", 1)};
  return r.Build();
}

struct Stats {
  int parsed = 0;
  int rejected = 0;
  int failures = 0;
};

volatile uint64_t g_sink;

// Touches everything a caller could touch on a file that parsed, checking the invariants the
// reader promises (data inside the buffer, sequential aligned offsets).
void Exercise(const GgufFile& f, const uint8_t* buf, size_t size) {
  uint64_t acc = 0;
  uint64_t expected = 0;
  for (const GgufTensorInfo& t : f.tensors()) {
    const uint8_t* p = static_cast<const uint8_t*>(t.view.data);
    const size_t n = t.view.NumBytes();
    ASSERT_GE(p, buf);
    ASSERT_LE(p + n, buf + size);
    ASSERT_EQ(t.data_offset, expected);
    ASSERT_EQ(static_cast<uint64_t>(p - buf) % f.alignment(), 0u);
    ASSERT_EQ(f.FindTensor(t.view.name), &t.view);
    for (size_t i = 0; i < n; ++i) acc += p[i];
    expected += gguf_test::Pad(n, f.alignment());
  }
  for (const auto& [key, v] : f.kvs()) {
    ASSERT_EQ(f.Find(key), &v);
    acc += v.str.size() + v.arr_u.size() + v.arr_i.size() + v.arr_f.size();
    for (const std::string& s : v.strs) acc += s.size();
    try {
      acc += f.GetU32Opt(key).value_or(0);
    } catch (const Error&) {
    }
    try {
      acc += static_cast<uint64_t>(f.GetF32Opt(key).value_or(0) != 0);
    } catch (const Error&) {
    }
    try {
      acc += f.GetBoolOpt(key).value_or(false);
    } catch (const Error&) {
    }
    try {
      acc += f.GetStringOpt(key).value_or("").size();
    } catch (const Error&) {
    }
    try {
      acc += f.GetStringArray(key).size();
    } catch (const Error&) {
    }
    try {
      acc += f.GetF32Array(key).size();
    } catch (const Error&) {
    }
    try {
      acc += f.GetI32Array(key).size();
    } catch (const Error&) {
    }
    for (uint32_t n_layer : {0u, 3u, static_cast<uint32_t>(v.arr_count)}) {
      try {
        auto pl = f.GetPerLayerOpt(key, n_layer);
        if (pl) acc += pl->size();
      } catch (const Error&) {
      }
    }
  }
  g_sink = acc;
}

void Check(const std::vector<uint8_t>& src, size_t n, Stats* st, const char* what) {
  // Exactly n bytes on the heap (the range constructor allocates exactly n).
  const std::vector<uint8_t> buf(src.begin(), src.begin() + n);
  try {
    auto f = GgufFile::FromMemory(buf.data(), buf.size(), "fuzz.gguf");
    Exercise(*f, buf.data(), buf.size());
    ++st->parsed;
  } catch (const Error& e) {
    const std::string msg = e.what();
    if (msg.rfind("fuzz.gguf: ", 0) != 0 || msg.find('\n') != std::string::npos) {
      if (st->failures++ < 5) ADD_FAILURE() << what << ": bad message: " << msg;
    }
    ++st->rejected;
  } catch (const std::exception& e) {
    if (st->failures++ < 5) ADD_FAILURE() << what << ": non-moe exception: " << e.what();
  } catch (...) {
    if (st->failures++ < 5) ADD_FAILURE() << what << ": unknown exception";
  }
}

std::vector<std::vector<uint8_t>> Seeds() { return {WriterSeed(), RawSeed(), TinySeed()}; }

TEST(GgufFuzz, SeedsParse) {
  for (const auto& s : Seeds()) {
    auto f = GgufFile::FromMemory(s.data(), s.size(), "seed");
    EXPECT_FALSE(f->kvs().empty());
  }
}

TEST(GgufFuzz, EveryTruncation) {
  for (const auto& s : Seeds()) {
    Stats st;
    for (size_t n = 0; n <= s.size(); ++n) Check(s, n, &st, "truncation");
    EXPECT_EQ(st.failures, 0);
    EXPECT_GE(st.parsed, 1);  // at least the full file
    EXPECT_GT(st.rejected, static_cast<int>(s.size() / 2));
  }
}

// 1..8 mutations per case: bit flips, random bytes, and "interesting" u32/u64 values written
// over fields (counts, lengths, types, offsets) to reach deep checks quickly.
TEST(GgufFuzz, RandomMutations) {
  std::mt19937_64 rng(20240601);
  const uint64_t interesting[] = {0,
                                  1,
                                  2,
                                  3,
                                  4,
                                  5,
                                  7,
                                  8,
                                  9,
                                  12,
                                  13,
                                  31,
                                  32,
                                  33,
                                  63,
                                  64,
                                  255,
                                  256,
                                  0x7fffffffull,
                                  0x80000000ull,
                                  0xffffffffull,
                                  1ull << 32,
                                  1ull << 62,
                                  1ull << 63,
                                  ~0ull,
                                  ~0ull - 1};
  int total_parsed = 0, total_rejected = 0;
  for (const auto& seed : Seeds()) {
    Stats st;
    // Mutations mostly land in the header and metadata, where the checks are.
    const size_t meta_end =
        GgufFile::FromMemory(seed.data(), seed.size(), "s")->data_section_offset();
    for (int c = 0; c < 15000; ++c) {
      std::vector<uint8_t> m = seed;
      const int ops = 1 + static_cast<int>(rng() % 8);
      for (int k = 0; k < ops; ++k) {
        const size_t range = (rng() % 5 == 0) ? m.size() : std::min(meta_end, m.size());
        const size_t pos = rng() % range;
        switch (rng() % 4) {
          case 0:
            m[pos] ^= static_cast<uint8_t>(1u << (rng() % 8));
            break;
          case 1:
            m[pos] = static_cast<uint8_t>(rng());
            break;
          case 2: {
            const uint64_t v = interesting[rng() % (sizeof(interesting) / sizeof(uint64_t))];
            const size_t w = (rng() % 2) ? 8 : 4;
            for (size_t b = 0; b < w && pos + b < m.size(); ++b) m[pos + b] = (v >> (8 * b)) & 0xff;
            break;
          }
          default: {  // small delta on a byte (lengths off by a few)
            m[pos] = static_cast<uint8_t>(m[pos] + static_cast<int>(rng() % 7) - 3);
            break;
          }
        }
      }
      const size_t n = (rng() % 8 == 0) ? rng() % (m.size() + 1) : m.size();
      Check(m, n, &st, "mutation");
    }
    EXPECT_EQ(st.failures, 0);
    total_parsed += st.parsed;
    total_rejected += st.rejected;
  }
  // The mix must exercise both outcomes, or the fuzzer is not testing much.
  EXPECT_GT(total_parsed, 100);
  EXPECT_GT(total_rejected, 1000);
}

TEST(GgufFuzz, RandomBytesAfterValidPrefix) {
  std::mt19937_64 rng(777);
  Stats st;
  for (int c = 0; c < 10000; ++c) {
    Bytes b;
    b.U32(0x46554747).U32(3);
    if (c % 2 == 0) {  // plausible small counts: parsing gets past the header
      b.U64(rng() % 4).U64(rng() % 6);
    } else {
      b.U64(rng()).U64(rng());
    }
    const size_t len = rng() % 400;
    for (size_t i = 0; i < len; ++i) {
      // Mostly small bytes, so random lengths and types are often in range.
      b.U8(static_cast<uint8_t>(rng() % 3 == 0 ? rng() : rng() % 16));
    }
    Check(b.b, b.b.size(), &st, "random");
  }
  EXPECT_EQ(st.failures, 0);
  EXPECT_GT(st.rejected, 8000);
}

}  // namespace
}  // namespace moe
