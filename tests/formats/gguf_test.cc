// GGUF reader/writer tests: round trips, cross-checks against an independent Python
// implementation (write_gguf.py), hand-crafted invalid files and the typed getters.
#include "formats/gguf.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <random>
#include <sstream>

#include "formats/gguf_test_util.h"

namespace moe {
namespace {

using gguf_test::Bytes;
using gguf_test::ExpectError;
using gguf_test::Kv;
using gguf_test::KvStr;
using gguf_test::KvU32;
using gguf_test::Pad;
using gguf_test::ParseBytes;
using gguf_test::RawFile;
using gguf_test::RawTensor;
using gguf_test::TempDir;

// ---- small independent helpers ----

uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// IEEE binary16 -> float, written from the definition (no library code).
float HalfToFloat(uint16_t h) {
  const int sign = h >> 15, exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = std::ldexp(mant, -24);
  } else if (exp == 31) {
    v = mant ? NAN : INFINITY;
  } else {
    v = std::ldexp(1024 + mant, exp - 25);
  }
  return static_cast<float>(sign ? -v : v);
}

uint64_t Fnv1a64(const uint8_t* p, size_t n) {
  uint64_t h = 0xCBF29CE484222325ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001B3ull;
  return h;
}

std::vector<uint8_t> Pattern(size_t n, int seed) {  // as write_gguf.py's pattern()
  std::vector<uint8_t> b(n);
  for (size_t j = 0; j < n; ++j) b[j] = static_cast<uint8_t>((j * 37 + seed) & 0xff);
  return b;
}

std::string Hex(const std::string& s) {
  std::string o;
  for (unsigned char c : s) o += StrFormat("%02x", c);
  return o;
}

// Bytes of a tensor from the dtype table (ggml's rule: blocks along ne[0]).
uint64_t ExpectedBytes(DType t, const std::vector<int64_t>& ne) {
  const DTypeTraits& tr = Traits(t);
  uint64_t n = ne[0] / tr.block_size * tr.block_bytes;
  for (size_t d = 1; d < ne.size(); ++d) n *= ne[d];
  return n;
}

std::filesystem::path SourceDir() { return std::filesystem::path(__FILE__).parent_path(); }

bool HavePython() { return std::system("python3 -c pass >/dev/null 2>&1") == 0; }

// Runs write_gguf.py with args; returns its stdout, fails the test on a non-zero exit.
std::string RunPython(const std::string& args) {
  const std::string cmd =
      "python3 '" + (SourceDir() / "write_gguf.py").string() + "' " + args + " 2>&1";
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) {
    ADD_FAILURE() << "popen failed: " << cmd;
    return "";
  }
  std::string out;
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  const int rc = ::pclose(p);
  EXPECT_EQ(rc, 0) << cmd << "\n" << out;
  return out;
}

// ------------------------------------------------------------------------------------------------
// Round trip through GgufWriter and GgufFile::Open.

std::vector<DType> AllSupportedDTypes() {
  std::vector<DType> out;
  for (uint32_t t = 0; t < 64; ++t) {
    if (FindDTypeTraits(t) != nullptr) out.push_back(static_cast<DType>(t));
  }
  return out;
}

struct WrittenTensor {
  std::string name;
  DType dtype;
  std::vector<int64_t> ne;
  std::vector<uint8_t> data;
};

class GgufRoundTrip : public ::testing::TestWithParam<uint32_t> {};  // alignment; 0 = default

TEST_P(GgufRoundTrip, EveryKeyTypeAndDType) {
  const uint32_t align_param = GetParam();
  const uint64_t align = align_param == 0 ? 32 : align_param;
  TempDir tmp;
  GgufWriter w;
  w.SetString("general.architecture", "qwen3moe");
  w.SetU32("test.u32", 0xFFFFFFFFu);
  w.SetI32("test.i32", -123456789);
  w.SetU64("test.u64", 0xFEDCBA9876543210ull);
  w.SetF32("test.f32", 0.1f);
  w.SetF32("test.f32_negzero", -0.0f);
  w.SetBool("test.bool_t", true);
  w.SetBool("test.bool_f", false);
  const std::string with_nul("a\0b\xc3\xa9", 5);
  w.SetString("test.str", with_nul);
  w.SetString("test.empty", "");
  if (align_param != 0) w.SetAlignment(align_param);
  const std::vector<std::string> strs = {"<unk>", "", "\xe2\x96\x81the", std::string(300, 'x')};
  w.SetStringArray("test.strs", strs);
  const std::vector<float> f32s = {1.0f, -2.5f, std::numeric_limits<float>::infinity(),
                                   std::numeric_limits<float>::denorm_min(), -0.0f};
  w.SetF32Array("test.f32s", f32s);
  const std::vector<int32_t> i32s = {0, -1, std::numeric_limits<int32_t>::min(),
                                     std::numeric_limits<int32_t>::max()};
  w.SetI32Array("test.i32s", i32s);
  const std::vector<uint32_t> u32s = {3, 0, 0xFFFFFFFFu};
  w.SetU32Array("test.u32s", u32s);
  w.SetI32Array("test.empty_i32s", {});

  // Two tensors per dtype with odd row counts and every n_dims.
  std::mt19937 rng(42);
  std::vector<WrittenTensor> written;
  int k = 0;
  for (DType dt : AllSupportedDTypes()) {
    const int64_t b = Traits(dt).block_size;
    const std::vector<std::vector<int64_t>> shapes = {
        {b * 3}, {b * (b == 1 ? 7 : 1), 5}, {b * 5, 3, 2}, {b, 1, 1, 3}};
    for (int j = 0; j < 2; ++j) {
      WrittenTensor t;
      t.name = StrFormat("blk.%d.%s", k, DTypeName(dt));
      t.dtype = dt;
      t.ne = shapes[(k + j * 2) % shapes.size()];
      t.data.resize(ExpectedBytes(dt, t.ne));
      for (auto& x : t.data) x = static_cast<uint8_t>(rng());
      w.AddTensor(t.name, t.dtype, t.ne, t.data.data(), t.data.size());
      written.push_back(std::move(t));
      ++k;
    }
  }
  const std::string path = tmp.File("rt.gguf");
  w.Write(path);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));

  auto f = GgufFile::Open(path);
  EXPECT_EQ(f->path(), path);
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(f->alignment(), align);

  // Keys in insertion order.
  std::vector<std::string> keys;
  for (const auto& kv : f->kvs()) keys.push_back(kv.first);
  std::vector<std::string> want_keys = {
      "general.architecture", "test.u32",    "test.i32",    "test.u64", "test.f32",
      "test.f32_negzero",     "test.bool_t", "test.bool_f", "test.str", "test.empty"};
  if (align_param != 0) want_keys.push_back("general.alignment");
  for (const char* s : {"test.strs", "test.f32s", "test.i32s", "test.u32s", "test.empty_i32s"}) {
    want_keys.push_back(s);
  }
  EXPECT_EQ(keys, want_keys);

  EXPECT_EQ(f->GetString("general.architecture"), "qwen3moe");
  EXPECT_EQ(f->GetU32("test.u32"), 0xFFFFFFFFu);
  EXPECT_EQ(f->Find("test.i32")->type, GgufType::kI32);
  EXPECT_EQ(f->Find("test.i32")->num.i64, -123456789);
  EXPECT_EQ(f->Find("test.u64")->type, GgufType::kU64);
  EXPECT_EQ(f->Find("test.u64")->num.u64, 0xFEDCBA9876543210ull);
  EXPECT_EQ(FloatBits(f->GetF32("test.f32")), FloatBits(0.1f));
  EXPECT_EQ(FloatBits(f->GetF32("test.f32_negzero")), FloatBits(-0.0f));
  EXPECT_EQ(f->GetBoolOpt("test.bool_t"), std::optional<bool>(true));
  EXPECT_EQ(f->GetBoolOpt("test.bool_f"), std::optional<bool>(false));
  EXPECT_EQ(f->GetString("test.str"), with_nul);
  EXPECT_EQ(f->GetString("test.empty"), "");
  if (align_param != 0) {
    EXPECT_EQ(f->GetU32("general.alignment"), align_param);
  }
  EXPECT_EQ(f->GetStringArray("test.strs"), strs);
  const std::vector<float> got_f = f->GetF32Array("test.f32s");
  ASSERT_EQ(got_f.size(), f32s.size());
  for (size_t i = 0; i < f32s.size(); ++i) EXPECT_EQ(FloatBits(got_f[i]), FloatBits(f32s[i]));
  EXPECT_EQ(f->GetI32Array("test.i32s"), i32s);
  EXPECT_EQ(f->GetPerLayerOpt("test.u32s", 3), std::optional<std::vector<uint32_t>>(u32s));
  EXPECT_TRUE(f->GetI32Array("test.empty_i32s").empty());
  EXPECT_EQ(f->Find("test.empty_i32s")->arr_count, 0u);

  // Tensors: metadata, bytes, sequential offsets, alignment relative to the mapping.
  ASSERT_EQ(f->tensors().size(), written.size());
  const std::vector<uint8_t> file = gguf_test::ReadFileBytes(path);
  ASSERT_EQ(file.size(), f->file_size());
  EXPECT_EQ(f->data_section_offset() % align, 0u);
  const uint8_t* base = static_cast<const uint8_t*>(f->tensors()[0].view.data) -
                        f->data_section_offset() - f->tensors()[0].data_offset;
  EXPECT_EQ(reinterpret_cast<uintptr_t>(base) % 4096, 0u) << "mapping is page aligned";
  uint64_t expected_offset = 0;
  for (size_t i = 0; i < written.size(); ++i) {
    const WrittenTensor& t = written[i];
    const GgufTensorInfo& info = f->tensors()[i];
    SCOPED_TRACE(t.name);
    EXPECT_EQ(info.view.name, t.name);
    EXPECT_EQ(info.view.dtype, t.dtype);
    ASSERT_EQ(info.view.n_dims, static_cast<int>(t.ne.size()));
    for (int d = 0; d < 4; ++d) {
      EXPECT_EQ(info.view.ne[d], d < static_cast<int>(t.ne.size()) ? t.ne[d] : 1);
    }
    EXPECT_EQ(info.view.NumBytes(), t.data.size());
    EXPECT_EQ(info.data_offset, expected_offset);
    const uint64_t rel = static_cast<const uint8_t*>(info.view.data) - base;
    EXPECT_EQ(rel, f->data_section_offset() + info.data_offset);
    EXPECT_EQ(rel % align, 0u);
    EXPECT_EQ(std::memcmp(info.view.data, t.data.data(), t.data.size()), 0);
    // Padding after the tensor is zeros.
    const uint64_t end = rel + t.data.size(), padded_end = rel + Pad(t.data.size(), align);
    ASSERT_LE(padded_end, file.size());
    for (uint64_t p = end; p < padded_end; ++p) ASSERT_EQ(file[p], 0) << "byte " << p;
    EXPECT_EQ(f->FindTensor(t.name), &info.view);
    EXPECT_EQ(f->FindTensorInfo(t.name), &info);
    expected_offset += Pad(t.data.size(), align);
  }
  EXPECT_EQ(file.size(), f->data_section_offset() + expected_offset);
  EXPECT_EQ(f->FindTensor("nope"), nullptr);
}

INSTANTIATE_TEST_SUITE_P(Alignments, GgufRoundTrip, ::testing::Values(0u, 1u, 8u, 64u, 4096u));

TEST(GgufWriter, SetReplacesInPlace) {
  TempDir tmp;
  GgufWriter w;
  w.SetU32("a", 1);
  w.SetU32("b", 2);
  w.SetU32("c", 3);
  w.SetString("b", "two");  // a different type replaces too
  w.SetU32("a", 10);
  w.SetAlignment(16);
  w.SetAlignment(64);
  w.Write(tmp.File("r.gguf"));
  auto f = GgufFile::Open(tmp.File("r.gguf"));
  ASSERT_EQ(f->kvs().size(), 4u);
  EXPECT_EQ(f->kvs()[0].first, "a");
  EXPECT_EQ(f->kvs()[1].first, "b");
  EXPECT_EQ(f->kvs()[2].first, "c");
  EXPECT_EQ(f->kvs()[3].first, "general.alignment");
  EXPECT_EQ(f->GetU32("a"), 10u);
  EXPECT_EQ(f->GetString("b"), "two");
  EXPECT_EQ(f->GetU32("c"), 3u);
  EXPECT_EQ(f->alignment(), 64u);
  EXPECT_EQ(f->data_section_offset() % 64, 0u);
  EXPECT_TRUE(f->tensors().empty());
}

TEST(GgufWriter, RejectsBadInput) {
  GgufWriter w;
  const std::vector<uint8_t> d(64 * 4);
  w.AddTensor("t", DType::kF32, {64}, d.data(), 256);
  ExpectError([&] { w.AddTensor("t", DType::kF32, {64}, d.data(), 256); },
              {"duplicate tensor 't'"});
  ExpectError([&] { w.AddTensor("u", DType::kF32, {64}, d.data(), 255); },
              {"tensor 'u' {64} of type f32 needs 256 bytes but 255 were given"});
  ExpectError([&] { w.AddTensor("v", DType::kQ8_0, {48}, d.data(), 51); },
              {"row length 48 is not a multiple of the q8_0 block size 32"});
  ExpectError([&] { w.AddTensor(std::string(64, 'n'), DType::kF32, {1}, d.data(), 4); },
              {"name must be 1..63 bytes"});
  ExpectError(
      [&] {
        w.AddTensor("w", DType::kF32, {1, 1, 1, 1, 1}, d.data(), 4);
      },
      {"5 dimensions given"});
  ExpectError([&] { w.AddTensor("x", DType::kF32, {4, 0}, d.data(), 0); }, {">= 1"});
  ExpectError([&] { w.AddTensor("y", static_cast<DType>(34), {4}, d.data(), 4); },
              {"unsupported dtype 34"});
  ExpectError([&] { w.SetAlignment(0); }, {"power of two"});
  ExpectError([&] { w.SetAlignment(48); }, {"power of two"});
  ExpectError([&] { w.SetU64("general.alignment", 32); }, {"general.alignment", "u32"});
  GgufValue nested;
  nested.type = GgufType::kArray;
  nested.elem_type = GgufType::kArray;
  ExpectError([&] { w.SetValue("n", nested); }, {"arrays of arrays"});
  GgufValue bad_count;
  bad_count.type = GgufType::kArray;
  bad_count.elem_type = GgufType::kU32;
  bad_count.arr_count = 2;
  bad_count.arr_u = {1};
  ExpectError([&] { w.SetValue("c", bad_count); }, {"arr_count 2 but holds 1"});
  GgufValue big_u8;
  big_u8.type = GgufType::kU8;
  big_u8.num.u64 = 256;
  ExpectError([&] { w.SetValue("u8", big_u8); }, {"does not fit type u8"});

  ExpectError([&] { w.Write("/nonexistent-dir-for-gguf-test/x.gguf"); },
              {"/nonexistent-dir-for-gguf-test/x.gguf", "cannot create", "No such file or directory"});
}

// Output never goes through a symlink, device or pipe, never opens an existing "X.tmp", and a
// FIFO is refused on reading without waiting for a writer.
TEST(GgufWriter, WritesOnlyNewOrRegularFiles) {
  TempDir tmp;
  GgufWriter w;
  w.SetU32("x", 1);
  const std::string target = tmp.File("target.gguf");
  w.Write(target);
  const std::string link = tmp.File("link.gguf");
  ASSERT_EQ(::symlink(target.c_str(), link.c_str()), 0);
  ExpectError([&] { w.Write(link); }, {"link.gguf", "symbolic link", "refusing"});
  EXPECT_TRUE(std::filesystem::is_symlink(link));
  ExpectError([&] { w.Write("/dev/null"); }, {"/dev/null", "not a regular file"});
  const std::string fifo = tmp.File("fifo");
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  ExpectError([&] { w.Write(fifo); }, {"fifo", "device, pipe or socket"});
  ExpectError([&] { GgufFile::Open(fifo); }, {"fifo", "not a regular file"});  // must not block
  // Somebody's file named like a temporary survives, and the write leaves no file of its own.
  const std::string stale = target + ".tmp";
  std::FILE* f = std::fopen(stale.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  std::fputs("keep me", f);
  std::fclose(f);
  GgufWriter w2;
  w2.SetU32("y", 2);
  w2.Write(target);
  EXPECT_EQ(GgufFile::Open(target)->GetU32("y"), 2u);
  std::ifstream in(stale);
  std::string kept((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(kept, "keep me");
  int files = 0;
  for (const auto& e : std::filesystem::directory_iterator(tmp.path())) files += std::filesystem::is_regular_file(e.symlink_status());
  EXPECT_EQ(files, 2) << "target.gguf and the stale file only";
}

TEST(GgufWriter, DeferredTensorsWriteTheSameBytes) {
  TempDir tmp;
  std::vector<uint8_t> a(RowBytes(DType::kQ8_0, 64) * 3), b(7 * 4);
  for (size_t i = 0; i < a.size(); ++i) a[i] = static_cast<uint8_t>(i * 7 + 1);
  for (size_t i = 0; i < b.size(); ++i) b[i] = static_cast<uint8_t>(i * 3 + 2);
  GgufWriter copied, deferred;
  for (GgufWriter* w : {&copied, &deferred}) w->SetU32("k", 5);
  copied.AddTensor("a", DType::kQ8_0, {64, 3}, a.data(), a.size());
  copied.AddTensor("b", DType::kF32, {7}, b.data(), b.size());
  int calls = 0;
  deferred.AddTensorDeferred("a", DType::kQ8_0, {64, 3}, [&](uint8_t* dst) {
    ++calls;
    std::memcpy(dst, a.data(), a.size());
  });
  deferred.AddTensorDeferred("b", DType::kF32, {7}, [&](uint8_t* dst) {
    ++calls;
    std::memcpy(dst, b.data(), b.size());
  });
  EXPECT_EQ(deferred.Serialize(), copied.Serialize());
  EXPECT_EQ(calls, 2);
  // A fill that fails: the error comes out of Write and the file already there is kept.
  const std::string path = tmp.File("keep.gguf");
  copied.Write(path);
  const std::vector<uint8_t> before = gguf_test::ReadFileBytes(path);
  GgufWriter failing;
  failing.AddTensorDeferred("c", DType::kF32, {4}, [](uint8_t*) { Fail("fill failed on purpose"); });
  ExpectError([&] { failing.Write(path); }, {"fill failed on purpose"});
  EXPECT_EQ(gguf_test::ReadFileBytes(path), before);
  EXPECT_FALSE(std::filesystem::exists(path + ".tmp"));
  ExpectError([&] { deferred.AddTensorDeferred("a", DType::kF32, {4}, [](uint8_t*) {}); },
              {"duplicate tensor 'a'"});
}

TEST(GgufWriter, SetValueCopiesEveryTypeFromAReadFile) {
  // Re-writing a file read from disk keeps every key and type (u8, i16, f64 ... included).
  if (!HavePython()) GTEST_SKIP() << "python3 not available";
  TempDir tmp;
  RunPython("write '" + tmp.File("py.gguf") + "'");
  auto src = GgufFile::Open(tmp.File("py.gguf"));
  GgufWriter w;
  for (const auto& [key, v] : src->kvs()) w.SetValue(key, v);
  for (const GgufTensorInfo& t : src->tensors()) {
    w.AddTensor(t.view.name, t.view.dtype,
                std::vector<int64_t>(t.view.ne, t.view.ne + t.view.n_dims), t.view.data,
                t.view.NumBytes());
  }
  w.Write(tmp.File("copy.gguf"));
  // The copy must be byte-identical to the independent writer's file.
  EXPECT_EQ(gguf_test::ReadFileBytes(tmp.File("copy.gguf")),
            gguf_test::ReadFileBytes(tmp.File("py.gguf")));
}

// ------------------------------------------------------------------------------------------------
// Cross-checks against write_gguf.py.

TEST(GgufPython, PythonWrittenFileReadsBack) {
  if (!HavePython()) GTEST_SKIP() << "python3 not available";
  TempDir tmp;
  const std::string path = tmp.File("py.gguf");
  RunPython("write '" + path + "'");
  auto f = GgufFile::Open(path);
  EXPECT_EQ(f->alignment(), 64u);
  ASSERT_EQ(f->kvs().size(), 27u);
  EXPECT_EQ(f->kvs()[0].first, "general.architecture");
  EXPECT_EQ(f->kvs()[26].first, "llama.attention.head_count");
  EXPECT_EQ(f->GetString("general.architecture"), "llama");
  EXPECT_EQ(f->GetU32("general.alignment"), 64u);
  auto num = [&](const char* k, GgufType t) {
    const GgufValue* v = f->Find(k);
    EXPECT_NE(v, nullptr) << k;
    if (v == nullptr) return GgufValue{}.num;
    EXPECT_EQ(v->type, t) << k;
    return v->num;
  };
  EXPECT_EQ(num("test.u8", GgufType::kU8).u64, 200u);
  EXPECT_EQ(num("test.i8", GgufType::kI8).i64, -100);
  EXPECT_EQ(num("test.u16", GgufType::kU16).u64, 60000u);
  EXPECT_EQ(num("test.i16", GgufType::kI16).i64, -30000);
  EXPECT_EQ(f->GetU32("test.u32"), 4000000000u);
  EXPECT_EQ(num("test.i32", GgufType::kI32).i64, -2000000000);
  EXPECT_EQ(f->GetF32("test.f32"), 0.15625f);
  EXPECT_EQ(f->GetBoolOpt("test.bool_t"), std::optional<bool>(true));
  EXPECT_EQ(f->GetBoolOpt("test.bool_f"), std::optional<bool>(false));
  EXPECT_EQ(f->GetString("test.str"), "h\xc3\xa9llo w\xc3\xb6rld");
  EXPECT_EQ(f->GetStringOpt("test.empty_str"), std::optional<std::string>(""));
  EXPECT_EQ(num("test.u64", GgufType::kU64).u64, (1ull << 63) + 5);
  EXPECT_EQ(num("test.i64", GgufType::kI64).i64, -(1ll << 62) - 7);
  EXPECT_EQ(num("test.f64", GgufType::kF64).f64, -2.5e300);
  EXPECT_EQ(f->GetStringArray("test.arr_str"), (std::vector<std::string>{"a", "", "bc",
                                                                         "\xc3\xbc"
                                                                         "ber"}));
  EXPECT_EQ(f->GetF32Array("test.arr_f32"),
            (std::vector<float>{1.5f, -0.25f, static_cast<float>(3e38)}));
  EXPECT_EQ(f->GetI32Array("test.arr_i32"),
            (std::vector<int32_t>{-1, 0, 2147483647, -2147483647 - 1}));
  const GgufValue* u32s = f->Find("test.arr_u32");
  ASSERT_NE(u32s, nullptr);
  EXPECT_EQ(u32s->elem_type, GgufType::kU32);
  EXPECT_EQ(u32s->arr_u, (std::vector<uint64_t>{0, 7, 4294967295u}));
  EXPECT_EQ(f->Find("test.arr_u8")->arr_u, (std::vector<uint64_t>{1, 255}));
  EXPECT_EQ(f->Find("test.arr_i16")->elem_type, GgufType::kI16);
  EXPECT_EQ(f->Find("test.arr_i16")->arr_i, (std::vector<int64_t>{-5, 5}));
  EXPECT_EQ(f->Find("test.arr_bool")->elem_type, GgufType::kBool);
  EXPECT_EQ(f->Find("test.arr_bool")->arr_u, (std::vector<uint64_t>{1, 0, 1}));
  EXPECT_EQ(f->Find("test.arr_f64")->arr_f, (std::vector<double>{0.1}));
  EXPECT_EQ(f->Find("test.arr_empty")->arr_count, 0u);
  EXPECT_EQ(f->GetPerLayerOpt("llama.attention.head_count", f->GetU32("llama.block_count")),
            (std::optional<std::vector<uint32_t>>({4, 8, 4})));

  // Tensors. Offsets by hand: a 48 B -> 64, b 16 -> 64, c 136 -> 192, d 20 -> 64, e 12 -> 64.
  ASSERT_EQ(f->tensors().size(), 6u);
  const uint64_t want_offsets[] = {0, 64, 128, 320, 384, 448};
  const char* names[] = {"a.f32", "b.f16", "c.q8_0", "d.i32", "e.bf16", "f.q4_K"};
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(f->tensors()[i].view.name, names[i]);
    EXPECT_EQ(f->tensors()[i].data_offset, want_offsets[i]);
  }
  EXPECT_EQ(f->data_section_offset() % 64, 0u);
  const TensorView* a = f->FindTensor("a.f32");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, DType::kF32);
  EXPECT_EQ(a->n_dims, 2);
  EXPECT_EQ(a->ne[0], 4);
  EXPECT_EQ(a->ne[1], 3);
  for (int j = 0; j < 12; ++j) EXPECT_EQ(a->F32()[j], j * 0.5f - 1.0f);
  const TensorView* b = f->FindTensor("b.f16");
  ASSERT_NE(b, nullptr);
  EXPECT_EQ(b->dtype, DType::kF16);
  for (int j = 0; j < 8; ++j) {
    uint16_t h;
    std::memcpy(&h, static_cast<const uint8_t*>(b->data) + 2 * j, 2);
    EXPECT_EQ(HalfToFloat(h), j * 0.5f - 1.0f);
  }
  const TensorView* c = f->FindTensor("c.q8_0");
  EXPECT_EQ(c->dtype, DType::kQ8_0);
  EXPECT_EQ(c->NumBytes(), 136u);
  EXPECT_EQ(std::memcmp(c->data, Pattern(136, 11).data(), 136), 0);
  const TensorView* d = f->FindTensor("d.i32");
  EXPECT_EQ(d->dtype, DType::kI32);
  for (int j = 0; j < 5; ++j) EXPECT_EQ(static_cast<const int32_t*>(d->data)[j], j - 2);
  const TensorView* e = f->FindTensor("e.bf16");
  EXPECT_EQ(e->dtype, DType::kBF16);
  EXPECT_EQ(e->n_dims, 4);
  EXPECT_EQ(std::memcmp(e->data, Pattern(12, 200).data(), 12), 0);
  const TensorView* q = f->FindTensor("f.q4_K");
  EXPECT_EQ(q->dtype, DType::kQ4_K);
  EXPECT_EQ(q->ne[2], 2);
  EXPECT_EQ(std::memcmp(q->data, Pattern(288, 3).data(), 288), 0);
  for (const GgufTensorInfo& t : f->tensors()) {
    const uint64_t rel = static_cast<const uint8_t*>(t.view.data) -
                         static_cast<const uint8_t*>(a->data);  // a is at the section start
    EXPECT_EQ(rel, t.data_offset);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.view.data) % 64, 0u);
  }
}

// The Python reader's canonical dump of a GgufWriter file equals the dump predicted from what
// was written (types, values, order, offsets, data hashes, sizes).
TEST(GgufPython, WriterOutputMatchesPythonReader) {
  if (!HavePython()) GTEST_SKIP() << "python3 not available";
  TempDir tmp;
  const uint64_t align = 64;
  GgufWriter w;
  std::vector<std::string> kv_lines;  // expected "kv" lines, in order
  std::map<std::string, size_t> kv_pos;
  uint64_t meta_bytes = 0;  // bytes of all kv records
  std::map<std::string, uint64_t> kv_size;
  auto expect_kv = [&](const std::string& key, const std::string& type, const std::string& text,
                       uint64_t value_bytes) {
    const std::string line = "kv " + key + " " + type + " " + text;
    const uint64_t size = 8 + key.size() + 4 + value_bytes;
    if (kv_pos.count(key)) {  // replaced in place
      meta_bytes -= kv_size[key];
      kv_lines[kv_pos[key]] = line;
    } else {
      kv_pos[key] = kv_lines.size();
      kv_lines.push_back(line);
    }
    kv_size[key] = size;
    meta_bytes += size;
  };
  w.SetString("general.architecture", "olmoe");
  expect_kv("general.architecture", "string", Hex("olmoe"), 8 + 5);
  w.SetU32("olmoe.block_count", 7);
  expect_kv("olmoe.block_count", "u32", "7", 4);
  w.SetI32("test.i32", -5);
  expect_kv("test.i32", "i32", "-5", 4);
  w.SetU64("test.u64", 1ull << 40);
  expect_kv("test.u64", "u64", std::to_string(1ull << 40), 8);
  w.SetF32("test.eps", 1e-6f);
  expect_kv("test.eps", "f32", StrFormat("0x%08x", FloatBits(1e-6f)), 4);
  w.SetBool("test.flag", true);
  expect_kv("test.flag", "bool", "1", 1);
  w.SetAlignment(align);
  expect_kv("general.alignment", "u32", "64", 4);
  const std::vector<std::string> toks = {"a", "",
                                         "\xc4\xa0"
                                         "b"};
  w.SetStringArray("tokenizer.ggml.tokens", toks);
  expect_kv("tokenizer.ggml.tokens", "array",
            "string 3 " + Hex("a") + ",," +
                Hex("\xc4\xa0"
                    "b"),
            12 + 8 * 3 + 1 + 0 + 3);
  const std::vector<float> scores = {0.5f, -1e30f};
  w.SetF32Array("tokenizer.ggml.scores", scores);
  expect_kv("tokenizer.ggml.scores", "array",
            StrFormat("f32 2 0x%08x,0x%08x", FloatBits(0.5f), FloatBits(-1e30f)), 12 + 8);
  w.SetI32Array("tokenizer.ggml.token_type", {1, -3});
  expect_kv("tokenizer.ggml.token_type", "array", "i32 2 1,-3", 12 + 8);
  w.SetU32Array("olmoe.head_counts", {4, 5});
  expect_kv("olmoe.head_counts", "array", "u32 2 4,5", 12 + 8);
  w.SetU32("olmoe.block_count", 3);  // replaced: stays second
  expect_kv("olmoe.block_count", "u32", "3", 4);

  struct Spec {
    std::string name;
    DType dt;
    std::vector<int64_t> ne;
  };
  const std::vector<Spec> specs = {{"token_embd.weight", DType::kQ8_0, {64, 3}},
                                   {"output_norm.weight", DType::kF32, {5}},
                                   {"blk.0.ffn_up_exps.weight", DType::kQ4_K, {256, 2, 3}},
                                   {"blk.0.ffn_down_exps.weight", DType::kQ6_K, {256, 1, 3}},
                                   {"x.bf16", DType::kBF16, {3, 1, 1, 2}}};
  std::mt19937 rng(7);
  std::vector<std::string> tensor_lines;
  uint64_t info_bytes = 0, offset = 0;
  for (const Spec& s : specs) {
    std::vector<uint8_t> data(ExpectedBytes(s.dt, s.ne));
    for (auto& x : data) x = static_cast<uint8_t>(rng());
    w.AddTensor(s.name, s.dt, s.ne, data.data(), data.size());
    std::string ne;
    for (size_t d = 0; d < s.ne.size(); ++d) ne += (d ? "," : "") + std::to_string(s.ne[d]);
    tensor_lines.push_back(
        StrFormat("tensor %s %u %s %llu %016llx", s.name.c_str(), static_cast<uint32_t>(s.dt),
                  ne.c_str(), static_cast<unsigned long long>(offset),
                  static_cast<unsigned long long>(Fnv1a64(data.data(), data.size()))));
    info_bytes += 8 + s.name.size() + 4 + 8 * s.ne.size() + 4 + 8;
    offset += Pad(data.size(), align);
  }
  const std::string path = tmp.File("w.gguf");
  w.Write(path);

  const uint64_t data_start = Pad(24 + meta_bytes + info_bytes, align);
  std::string want = StrFormat("header %zu %zu\n", specs.size(), kv_lines.size());
  for (const auto& l : kv_lines) want += l + "\n";
  want += StrFormat("data %llu\n", static_cast<unsigned long long>(data_start));
  for (const auto& l : tensor_lines) want += l + "\n";
  want += StrFormat("size %llu\n", static_cast<unsigned long long>(data_start + offset));
  EXPECT_EQ(RunPython("dump '" + path + "'"), want);
}

// ------------------------------------------------------------------------------------------------
// Validation of hand-crafted files.

// A small valid file; each test breaks one field.
RawFile Baseline() {
  RawFile r;
  r.kvs = {KvStr("general.architecture", "llama"), KvU32("llama.block_count", 2)};
  r.tensors = {RawTensor{"w", {8, 2}, 0, {}, {}}, RawTensor{"q", {64}, 8, {}, {}}};
  return r;
}

std::string At(uint64_t b) { return StrFormat("at byte %llu", static_cast<unsigned long long>(b)); }

TEST(GgufValidation, BaselineParses) {
  RawFile r = Baseline();
  const auto b = r.Build();
  auto f = ParseBytes(b);
  EXPECT_EQ(f->GetU32("llama.block_count"), 2u);
  ASSERT_EQ(f->tensors().size(), 2u);
  EXPECT_EQ(f->tensors()[1].data_offset, 64u);
  EXPECT_EQ(f->tensors()[1].info_offset, r.tensor_info_at[1]);
  EXPECT_EQ(f->Find("llama.block_count")->file_offset, r.kv_at[1]);
  EXPECT_EQ(f->data_section_offset(), r.data_start);
  EXPECT_EQ(f->tensors()[1].view.data, b.data() + r.data_start + 64);
  EXPECT_EQ(f->tensors()[1].view.NumBytes(), 68u);
}

TEST(GgufValidation, Header) {
  {
    RawFile r = Baseline();
    r.magic = 0x47475546;  // "FUGG"
    ExpectError([&] { ParseBytes(r.Build(), "m.gguf"); },
                {"m.gguf: bad magic \"FUGG\"", "not a GGUF file", At(0)});
  }
  for (uint32_t v : {1u, 4u, 0u}) {
    RawFile r = Baseline();
    r.version = v;
    ExpectError([&] { ParseBytes(r.Build()); },
                {StrFormat("unsupported GGUF version %u", v), "versions 2 and 3", At(4)});
  }
  {  // version 2 shares version 3's little-endian layout and is read like it
    RawFile r = Baseline();
    r.version = 2;
    auto f = ParseBytes(r.Build());
    EXPECT_EQ(f->version(), 2u);
  }
  {
    RawFile r = Baseline();
    r.version = 0x03000000;
    ExpectError([&] { ParseBytes(r.Build()); }, {"big-endian", At(4)});
  }
  const std::vector<uint8_t> tiny = {'G', 'G', 'U'};
  ExpectError([&] { ParseBytes(tiny); }, {"too small for a GGUF header"});
  ExpectError([&] { GgufFile::FromMemory(nullptr, 0, "e.gguf"); }, {"e.gguf: buffer is empty"});
  std::vector<uint8_t> hdr = Baseline().Build();
  hdr.resize(12);
  ExpectError([&] { ParseBytes(hdr); },
              {"file ends while reading the tensor count", At(8), "truncated"});
}

TEST(GgufValidation, ImplausibleCounts) {
  {
    RawFile r = Baseline();
    r.tensor_count = 1ull << 40;
    ExpectError([&] { ParseBytes(r.Build()); },
                {"tensor count 1099511627776 is implausible", At(8)});
  }
  {
    RawFile r = Baseline();
    r.tensor_count = ~0ull;
    ExpectError([&] { ParseBytes(r.Build()); }, {"tensor count", "implausible", At(8)});
  }
  {
    RawFile r = Baseline();
    r.kv_count = 1000000000000ull;
    ExpectError([&] { ParseBytes(r.Build()); },
                {"metadata key count 1000000000000 is implausible", At(16)});
  }
  {
    RawFile r = Baseline();  // plausible but wrong: a tensor info is read as a key
    r.kv_count = 3;
    ExpectError([&] { ParseBytes(r.Build()); }, {"t.gguf: "});
  }
  {
    // Counts pass the first check but the tensor infos left after the keys cannot fit.
    RawFile r = Baseline();
    r.tensors.clear();
    r.tensor_count = 5;  // 5 * 32 bytes fit after the header but not after the keys
    r.data_bytes = 100;
    ExpectError([&] { ParseBytes(r.Build()); }, {"tensor count 5", "implausible"});
  }
}

TEST(GgufValidation, Strings) {
  {
    RawFile r = Baseline();
    r.tensors.clear();
    r.kvs.push_back(Bytes().U64(1000).U8('a').U8('b').b);  // key name runs past the end
    r.kv_count = 3;
    r.data_bytes = 0;
    const auto b = r.Build();
    ExpectError([&] { ParseBytes(b); },
                {"the name of key 2 has length 1000 but only", "bytes remain", At(r.kv_at[2])});
  }
  {
    RawFile r = Baseline();
    r.kvs.push_back(Kv("s", 8, Bytes().U64(1ull << 50).b));
    const auto b = r.Build();
    ExpectError([&] { ParseBytes(b); }, {"the string value of key 's' has length 1125899906842624",
                                         At(r.kv_at[2] + 8 + 1 + 4)});
  }
  {
    RawFile r = Baseline();
    r.kvs.push_back(Kv("arr", 9, Bytes().U32(8).U64(2).Str("ok").U64(~0ull).b));
    const auto b = r.Build();
    ExpectError([&] { ParseBytes(b); }, {"string 1 of array key 'arr' has length"});
  }
}

TEST(GgufValidation, ValueTypes) {
  {
    RawFile r = Baseline();
    r.kvs.push_back(Kv("k", 13, Bytes().U32(0).b));
    const auto b = r.Build();
    ExpectError([&] { ParseBytes(b); },
                {"key 'k' has unknown value type 13 (valid: 0..12)", At(r.kv_at[2] + 9)});
  }
  {
    RawFile r = Baseline();
    r.kvs.push_back(Kv("k", 0xFFFFFFFF, Bytes().U32(0).b));
    ExpectError([&] { ParseBytes(r.Build()); }, {"unknown value type 4294967295"});
  }
  {
    RawFile r = Baseline();
    r.kvs.push_back(Kv("k", 9, Bytes().U32(14).U64(0).b));
    const auto b = r.Build();
    ExpectError([&] { ParseBytes(b); },
                {"key 'k' is an array with unknown element type 14", At(r.kv_at[2] + 13)});
  }
  {
    RawFile r = Baseline();
    r.kvs.push_back(Kv("nest", 9, Bytes().U32(9).U64(1).U32(4).U64(1).U32(5).b));
    ExpectError([&] { ParseBytes(r.Build()); }, {"key 'nest' is an array of arrays"});
  }
  {
    RawFile r = Baseline();
    r.kvs.push_back(Kv("big", 9, Bytes().U32(4).U64(1ull << 61).b));
    ExpectError([&] { ParseBytes(r.Build()); },
                {"key 'big' is an array of 2305843009213693952 u32"});
  }
  {
    RawFile r = Baseline();
    r.kvs.push_back(Kv("b", 7, Bytes().U8(2).b));
    ExpectError([&] { ParseBytes(r.Build()); },
                {"the bool value of key 'b': byte value 2 is not a bool"});
  }
  {
    RawFile r = Baseline();  // truncated scalar at the very end of the file
    r.tensors.clear();
    r.data_bytes = 0;
    r.kvs.push_back(Kv("u", 10, Bytes().U32(1).b));
    auto b = r.Build();
    b.resize(r.kv_at[2] + 8 + 1 + 4 + 4);  // drop the padding: the u64 ends after 4 bytes
    ExpectError([&] { ParseBytes(b); },
                {"file ends while reading the u64 value of key 'u'", "truncated"});
  }
}

TEST(GgufValidation, DuplicateKeys) {
  {
    RawFile r = Baseline();
    r.kvs.push_back(KvU32("llama.block_count", 3));
    const auto b = r.Build();
    ExpectError([&] { ParseBytes(b); },
                {StrFormat("duplicate key 'llama.block_count' (first at byte %llu)",
                           static_cast<unsigned long long>(r.kv_at[1])),
                 At(r.kv_at[2])});
  }
  {
    // Names are sanitized: no raw newline reaches the message.
    RawFile r = Baseline();
    r.kvs.push_back(KvU32("a\nb", 1));
    r.kvs.push_back(KvU32("a\nb", 2));
    ExpectError([&] { ParseBytes(r.Build()); }, {"duplicate key 'a\\x0ab'"});
  }
  {
    // Valid UTF-8 is kept; invalid bytes and quotes are escaped.
    RawFile r = Baseline();
    r.kvs.push_back(KvU32("\xc3\xa9\xff'", 1));
    r.kvs.push_back(KvU32("\xc3\xa9\xff'", 2));
    ExpectError([&] { ParseBytes(r.Build()); }, {"duplicate key '\xc3\xa9\\xff\\x27'"});
  }
  {
    RawFile r = Baseline();
    r.kvs.push_back(KvU32(std::string(5000, 'k'), 1));
    r.kvs.push_back(KvU32(std::string(5000, 'k'), 1));
    try {
      ParseBytes(r.Build());
      ADD_FAILURE() << "no error";
    } catch (const Error& e) {
      EXPECT_LT(std::strlen(e.what()), 300u) << "long names are cut in messages";
      EXPECT_NE(std::string(e.what()).find("(5000 bytes)"), std::string::npos) << e.what();
    }
  }
}

TEST(GgufValidation, Alignment) {
  {
    RawFile r = Baseline();
    r.kvs.push_back(Kv("general.alignment", 10, Bytes().U64(32).b));
    ExpectError([&] { ParseBytes(r.Build()); },
                {"key 'general.alignment' has type u64 but must be u32"});
  }
  for (uint32_t a : {0u, 48u, 3u}) {
    RawFile r = Baseline();
    r.kvs.push_back(KvU32("general.alignment", a));
    const auto b = r.Build();
    ExpectError([&] { ParseBytes(b); },
                {StrFormat("general.alignment is %u but must be a non-zero power of two", a),
                 At(r.kv_at[2] + 8 + 17 + 4)});
  }
  for (uint32_t a : {1u, 16u, 256u}) {
    RawFile r = Baseline();
    r.kvs.push_back(KvU32("general.alignment", a));
    r.alignment = a;
    const auto b = r.Build();
    auto f = ParseBytes(b);
    EXPECT_EQ(f->alignment(), a);
    EXPECT_EQ(f->data_section_offset(), r.data_start);
    EXPECT_EQ(f->tensors()[1].data_offset, Pad(64, a));
  }
}

TEST(GgufValidation, TensorInfos) {
  for (uint32_t nd : {0u, 5u}) {
    RawFile r = Baseline();
    r.tensors[1].n_dims = nd;
    if (nd == 5) r.tensors[1].ne = {64, 1, 1, 1, 1};
    const auto b = r.Build();
    ExpectError([&] { ParseBytes(b); }, {StrFormat("tensor 'q' has n_dims %u; must be 1..4", nd),
                                         At(r.tensor_info_at[1] + 9)});
  }
  {
    RawFile r = Baseline();
    r.tensors[0].ne = {8, 0};
    ExpectError([&] { ParseBytes(r.Build()); }, {"tensor 'w' has ne[1] = 0"});
  }
  {
    RawFile r = Baseline();
    r.tensors[0].ne = {8, ~0ull};
    r.data_bytes = 0;  // no room for the data a broken shape implies
    ExpectError([&] { ParseBytes(r.Build()); }, {"tensor 'w' has ne[1] = -1"});
  }
  {
    RawFile r = Baseline();
    r.tensors[1].ne = {33};
    ExpectError([&] { ParseBytes(r.Build()); },
                {"tensor 'q' {33} of type q8_0 has a row length ne[0] = 33 that is not a "
                 "multiple of the block size 32"});
  }
  {
    RawFile r = Baseline();
    r.tensors[1].type = 34;
    const auto b = r.Build();
    ExpectError([&] { ParseBytes(b); },
                {"tensor 'q' has ggml type 34 (tq1_0) which moe.cpp does not support", "q8_0",
                 At(r.offset_field_at[1] - 4)});
  }
  {
    RawFile r = Baseline();
    r.tensors[1].type = 99;
    ExpectError([&] { ParseBytes(r.Build()); }, {"ggml type 99 (unknown)"});
  }
  {
    RawFile r = Baseline();
    r.tensors[0].ne = {1ull << 62, 4};
    r.data_bytes = 0;  // no room for the data a broken shape implies
    ExpectError([&] { ParseBytes(r.Build()); }, {"tensor 'w'", "too large", "overflows"});
  }
  {
    RawFile r = Baseline();
    r.tensors[0].ne = {1ull << 40, 1ull << 40};
    r.data_bytes = 0;  // no room for the data a broken shape implies
    ExpectError([&] { ParseBytes(r.Build()); }, {"tensor 'w'", "too large"});
  }
  {
    RawFile r = Baseline();  // elements fit in int64 but the bytes do not fit the limit
    r.tensors[0].type = 26;
    r.tensors[0].ne = {1ull << 61};
    r.data_bytes = 0;  // no room for the data a broken shape implies
    ExpectError([&] { ParseBytes(r.Build()); }, {"tensor 'w'", "too large"});
  }
  {
    RawFile r = Baseline();
    r.tensors[0].name = std::string(64, 'n');
    const auto b = r.Build();
    ExpectError([&] { ParseBytes(b); },
                {"the name of tensor 0 has length 64 but at most 63", At(r.tensor_info_at[0])});
  }
  {
    RawFile r = Baseline();
    r.tensors[0].name = std::string(63, 'n');
    auto b = r.Build();
    EXPECT_NE(ParseBytes(b)->FindTensor(std::string(63, 'n')), nullptr);
  }
  {
    RawFile r = Baseline();
    r.tensors[1].name = "w";
    const auto b = r.Build();
    ExpectError([&] { ParseBytes(b); },
                {StrFormat("duplicate tensor 'w' (first at byte %llu)",
                           static_cast<unsigned long long>(r.tensor_info_at[0])),
                 At(r.tensor_info_at[1])});
  }
  {
    RawFile r = Baseline();  // truncated inside the infos
    auto b = r.Build();
    b.resize(r.offset_field_at[1] + 3);
    ExpectError([&] { ParseBytes(b); }, {"file ends while reading the data offset of tensor 'q'"});
  }
}

TEST(GgufValidation, Offsets) {
  {
    RawFile r = Baseline();
    r.tensors[1].offset = 128;
    const auto b = r.Build();
    ExpectError([&] { ParseBytes(b); },
                {"tensor 'q' has data offset 128, expected 64", At(r.offset_field_at[1])});
  }
  {
    RawFile r = Baseline();
    r.tensors[0].offset = 32;
    ExpectError([&] { ParseBytes(r.Build()); }, {"tensor 'w' has data offset 32, expected 0"});
  }
  {
    RawFile r = Baseline();
    r.tensors[1].offset = 65;
    ExpectError([&] { ParseBytes(r.Build()); },
                {"tensor 'q' has data offset 65, which is not a multiple of the alignment 32"});
  }
  {
    RawFile r = Baseline();  // infos in the other order than the data: offsets swapped
    r.tensors[0].offset = 96;
    r.tensors[1].offset = 0;
    ExpectError([&] { ParseBytes(r.Build()); }, {"tensor 'w' has data offset 96, expected 0"});
  }
  {
    RawFile r = Baseline();
    r.data_bytes = 64 + 10;
    const auto b = r.Build();
    ExpectError([&] { ParseBytes(b, "m.gguf"); },
                {StrFormat("m.gguf: tensor 'q' data ends at byte %llu but the file has %zu bytes "
                           "(truncated file?)",
                           static_cast<unsigned long long>(r.data_start + 64 + 68), b.size())});
  }
  {
    RawFile r = Baseline();  // the last tensor's padding may be missing (ggml does not need it)
    r.data_bytes = 64 + 68;
    const auto b = r.Build();
    EXPECT_EQ(ParseBytes(b)->tensors().size(), 2u);
  }
  {
    RawFile r = Baseline();
    r.tensors[1].offset = ~0ull & ~31ull;
    ExpectError([&] { ParseBytes(r.Build()); }, {"tensor 'q' has data offset"});
  }
}

// ------------------------------------------------------------------------------------------------
// Typed getters.

TEST(GgufGetters, TypesAndMessages) {
  RawFile r;
  r.kvs = {
      KvU32("a.u32", 7),
      Kv("a.u64", 10, Bytes().U64(7).b),
      Kv("a.f32", 6, Bytes().Put(1.25f).b),
      Kv("a.bool", 7, Bytes().U8(1).b),
      KvStr("a.str", "hi"),
      Kv("a.strs", 9, Bytes().U32(8).U64(2).Str("x").Str("y").b),
      Kv("a.u32s", 9, Bytes().U32(4).U64(3).U32(1).U32(2).U32(3).b),
      Kv("a.i32s", 9, Bytes().U32(5).U64(3).Put<int32_t>(4).Put<int32_t>(-1).Put<int32_t>(6).b),
      Kv("a.i32s_ok", 9, Bytes().U32(5).U64(3).Put<int32_t>(4).Put<int32_t>(0).Put<int32_t>(6).b),
      Kv("a.f32s", 9, Bytes().U32(6).U64(2).Put(0.5f).Put(-2.0f).b),
      Kv("a.f64s", 9, Bytes().U32(12).U64(1).Put(0.5).b),
      Kv("a.i32", 5, Bytes().Put<int32_t>(-3).b)};
  const auto b = r.Build();
  auto f = ParseBytes(b, "x.gguf");
  auto at = [&](int i) {
    return StrFormat("(byte %llu)", static_cast<unsigned long long>(r.kv_at[i]));
  };

  EXPECT_EQ(f->GetU32("a.u32"), 7u);
  EXPECT_EQ(f->GetU32Opt("missing"), std::nullopt);
  EXPECT_EQ(f->GetF32("a.f32"), 1.25f);
  EXPECT_EQ(f->GetF32Opt("missing"), std::nullopt);
  EXPECT_EQ(f->GetBoolOpt("a.bool"), std::optional<bool>(true));
  EXPECT_EQ(f->GetBoolOpt("missing"), std::nullopt);
  EXPECT_EQ(f->GetString("a.str"), "hi");
  EXPECT_EQ(f->GetStringOpt("missing"), std::nullopt);
  EXPECT_EQ(f->GetStringArray("a.strs"), (std::vector<std::string>{"x", "y"}));
  EXPECT_EQ(f->GetF32Array("a.f32s"), (std::vector<float>{0.5f, -2.0f}));
  EXPECT_EQ(f->GetI32Array("a.i32s"), (std::vector<int32_t>{4, -1, 6}));
  EXPECT_TRUE(f->Has("a.u64"));
  EXPECT_FALSE(f->Has("a.u6"));

  ExpectError([&] { f->GetU32("a.u64"); },
              {"x.gguf: key 'a.u64' " + at(1) + " has type u64 but expected u32"});
  ExpectError([&] { f->GetU32Opt("a.i32"); }, {"key 'a.i32'", "has type i32 but expected u32"});
  ExpectError([&] { f->GetU32("missing.key"); }, {"x.gguf: required key 'missing.key' is missing"});
  ExpectError([&] { f->GetF32("a.u32"); },
              {"key 'a.u32' " + at(0) + " has type u32 but expected f32"});
  ExpectError([&] { f->GetBoolOpt("a.u32"); }, {"has type u32 but expected bool"});
  ExpectError([&] { f->GetString("a.strs"); },
              {"key 'a.strs' " + at(5) + " has type array of string but expected string"});
  ExpectError([&] { f->GetString("nope"); }, {"required key 'nope' is missing"});
  ExpectError([&] { f->GetStringArray("a.u32s"); },
              {"has type array of u32 but expected array of string"});
  ExpectError([&] { f->GetStringArray("a.str"); },
              {"has type string but expected array of string"});
  ExpectError([&] { f->GetStringArray("nope"); }, {"required key 'nope' is missing"});
  ExpectError([&] { f->GetF32Array("a.f64s"); },
              {"has type array of f64 but expected array of f32"});
  ExpectError([&] { f->GetI32Array("a.u32s"); },
              {"has type array of u32 but expected array of i32"});

  using V = std::optional<std::vector<uint32_t>>;
  EXPECT_EQ(f->GetPerLayerOpt("a.u32", 4), V({7, 7, 7, 7}));
  EXPECT_EQ(f->GetPerLayerOpt("a.u32s", 3), V({1, 2, 3}));
  EXPECT_EQ(f->GetPerLayerOpt("a.i32s_ok", 3), V({4, 0, 6}));
  EXPECT_EQ(f->GetPerLayerOpt("missing", 3), std::nullopt);
  ExpectError([&] { f->GetPerLayerOpt("a.u32s", 4); },
              {"key 'a.u32s' " + at(6) + " is an array of 3 entries but the model has 4 layers"});
  ExpectError([&] { f->GetPerLayerOpt("a.i32s", 3); }, {"entry 1 is -1"});
  ExpectError([&] { f->GetPerLayerOpt("a.u64", 3); },
              {"has type u64 but expected u32 or an array of u32/i32"});
  ExpectError([&] { f->GetPerLayerOpt("a.f32s", 2); }, {"has type array of f32 but expected u32"});
}

TEST(GgufTypeNames, Names) {
  EXPECT_STREQ(GgufTypeName(GgufType::kU32), "u32");
  EXPECT_STREQ(GgufTypeName(GgufType::kString), "string");
  EXPECT_STREQ(GgufTypeName(GgufType::kArray), "array");
  EXPECT_STREQ(GgufTypeName(GgufType::kF64), "f64");
  EXPECT_STREQ(GgufTypeName(static_cast<GgufType>(77)), "invalid");
  EXPECT_STREQ(GgmlTypeName(23), "iq4_xs");
  EXPECT_STREQ(GgmlTypeName(12), "q4_K");
  EXPECT_STREQ(GgmlTypeName(39), "mxfp4");
  EXPECT_STREQ(GgmlTypeName(1000), "unknown");
  // Our names agree with the dtype table for every supported type.
  for (DType t : AllSupportedDTypes()) {
    EXPECT_STREQ(GgmlTypeName(static_cast<uint32_t>(t)), DTypeName(t));
  }
}

// ------------------------------------------------------------------------------------------------
// Open() on real files.

TEST(GgufOpen, FileSystemErrors) {
  TempDir tmp;
  const std::string missing = tmp.File("missing.gguf");
  ExpectError([&] { GgufFile::Open(missing); },
              {missing + ": cannot open: No such file or directory"});
  ExpectError([&] { GgufFile::Open(tmp.path()); }, {tmp.path() + ": is a directory"});
  gguf_test::WriteFileBytes(tmp.File("empty.gguf"), {});
  ExpectError([&] { GgufFile::Open(tmp.File("empty.gguf")); }, {"empty.gguf: file is empty"});

  // A truncated file on disk.
  GgufWriter w;
  w.SetString("general.architecture", "llama");
  std::vector<uint8_t> d(256 * 4 * 8, 1);
  w.AddTensor("a", DType::kF32, {256, 8}, d.data(), d.size());
  w.AddTensor("b", DType::kF32, {256, 8}, d.data(), d.size());
  w.Write(tmp.File("full.gguf"));
  auto full = gguf_test::ReadFileBytes(tmp.File("full.gguf"));
  auto f = GgufFile::Open(tmp.File("full.gguf"));
  const uint64_t b_end = f->data_section_offset() + f->tensors()[1].data_offset + d.size();
  f.reset();
  full.resize(full.size() - 100);
  const std::string cut = tmp.File("cut.gguf");
  gguf_test::WriteFileBytes(cut, full);
  ExpectError([&] { GgufFile::Open(cut); },
              {StrFormat("%s: tensor 'b' data ends at byte %llu but the file has %zu bytes "
                         "(truncated file?)",
                         cut.c_str(), static_cast<unsigned long long>(b_end), full.size())});
  full.resize(10);
  gguf_test::WriteFileBytes(cut, full);
  ExpectError([&] { GgufFile::Open(cut); }, {cut + ": file ends while reading"});
  // Not GGUF at all.
  gguf_test::WriteFileBytes(cut, std::vector<uint8_t>(100, 'x'));
  ExpectError([&] { GgufFile::Open(cut); }, {"bad magic \"xxxx\""});
}

}  // namespace
}  // namespace moe
