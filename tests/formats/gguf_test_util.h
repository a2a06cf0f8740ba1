// Helpers shared by the GGUF tests: a temp directory, a raw GGUF byte builder written from the
// format spec (independent of GgufWriter, so hand-crafted files can break any field), and file
// helpers.
#pragma once

#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <optional>
#include <string>
#include <vector>

#include "formats/gguf.h"
#include "tensor/dtype.h"
#include "util/error.h"

namespace moe::gguf_test {

// A fresh directory under $MOE_TEST_TMP (if set) or /tmp, removed when the object dies.
class TempDir {
 public:
  TempDir() {
    std::string root = "/tmp";
    if (const char* t = std::getenv("MOE_TEST_TMP"); t != nullptr && *t != '\0') {
      root = t;
      std::filesystem::create_directories(root);
    }
    std::string templ = root + "/gguf_test.XXXXXX";
    std::vector<char> buf(templ.begin(), templ.end());
    buf.push_back('\0');
    if (::mkdtemp(buf.data()) == nullptr) {
      ADD_FAILURE() << "mkdtemp failed under " << root << ": " << std::strerror(errno);
    }
    path_ = buf.data();
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  std::string File(const std::string& name) const { return path_ + "/" + name; }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

inline std::vector<uint8_t> ReadFileBytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

inline void WriteFileBytes(const std::string& path, const std::vector<uint8_t>& b) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// Little-endian byte appender.
struct Bytes {
  std::vector<uint8_t> b;
  template <typename T>
  Bytes& Put(T v) {
    uint8_t tmp[sizeof(T)];
    std::memcpy(tmp, &v, sizeof(T));
    b.insert(b.end(), tmp, tmp + sizeof(T));
    return *this;
  }
  Bytes& U8(uint8_t v) { return Put(v); }
  Bytes& U32(uint32_t v) { return Put(v); }
  Bytes& U64(uint64_t v) { return Put(v); }
  Bytes& Str(const std::string& s) {
    U64(s.size());
    b.insert(b.end(), s.begin(), s.end());
    return *this;
  }
  Bytes& Raw(const std::vector<uint8_t>& r) {
    b.insert(b.end(), r.begin(), r.end());
    return *this;
  }
};

// One serialized kv: key string, u32 type, then `payload` verbatim.
inline std::vector<uint8_t> Kv(const std::string& key, uint32_t type,
                               const std::vector<uint8_t>& payload) {
  return Bytes().Str(key).U32(type).Raw(payload).b;
}
inline std::vector<uint8_t> KvU32(const std::string& key, uint32_t v) {
  return Kv(key, 4, Bytes().U32(v).b);
}
inline std::vector<uint8_t> KvStr(const std::string& key, const std::string& v) {
  return Kv(key, 8, Bytes().Str(v).b);
}

struct RawTensor {
  std::string name;
  std::vector<uint64_t> ne;
  uint32_t type = 0;               // ggml type id
  std::optional<uint64_t> offset;  // default: the sequential offset ggml expects
  std::optional<uint32_t> n_dims;  // default: ne.size()
};

// Bytes of a tensor as ggml computes them, from the dtype table (0 for unknown types).
inline uint64_t RawNBytes(const RawTensor& t) {
  const DTypeTraits* tr = FindDTypeTraits(t.type);
  if (tr == nullptr || t.ne.empty()) return 0;
  uint64_t n = t.ne[0] / tr->block_size * tr->block_bytes;
  for (size_t d = 1; d < t.ne.size(); ++d) n *= t.ne[d];
  return n;
}

inline uint64_t Pad(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

// A GGUF file built field by field; every field can be set to a bad value.
struct RawFile {
  uint32_t magic = 0x46554747;
  uint32_t version = 3;
  std::optional<uint64_t> tensor_count;  // default: tensors.size()
  std::optional<uint64_t> kv_count;      // default: kvs.size()
  std::vector<std::vector<uint8_t>> kvs;
  std::vector<RawTensor> tensors;
  uint64_t alignment = 32;             // used for layout only; add the key to kvs yourself
  std::optional<uint64_t> data_bytes;  // default: every tensor's padded size
  uint8_t fill = 0x5a;                 // tensor data byte value

  // Filled by Build(): where each piece landed.
  std::vector<uint64_t> kv_at, tensor_info_at, offset_field_at;
  uint64_t data_start = 0;

  std::vector<uint8_t> Build() {
    Bytes o;
    o.U32(magic).U32(version);
    o.U64(tensor_count.value_or(tensors.size()));
    o.U64(kv_count.value_or(kvs.size()));
    kv_at.clear();
    tensor_info_at.clear();
    offset_field_at.clear();
    for (const auto& kv : kvs) {
      kv_at.push_back(o.b.size());
      o.Raw(kv);
    }
    uint64_t next = 0;
    for (const RawTensor& t : tensors) {
      tensor_info_at.push_back(o.b.size());
      o.Str(t.name).U32(t.n_dims.value_or(static_cast<uint32_t>(t.ne.size())));
      for (uint64_t n : t.ne) o.U64(n);
      o.U32(t.type);
      offset_field_at.push_back(o.b.size());
      o.U64(t.offset.value_or(next));
      next += Pad(RawNBytes(t), alignment);
    }
    data_start = Pad(o.b.size(), alignment);
    o.b.resize(data_start, 0);
    o.b.resize(data_start + data_bytes.value_or(next), fill);
    return o.b;
  }
};

// Runs fn, expects a moe::Error whose one-line message contains every `parts` substring.
template <typename Fn>
void ExpectError(Fn&& fn, const std::vector<std::string>& parts) {
  try {
    fn();
    ADD_FAILURE() << "expected moe::Error containing '" << parts.at(0) << "'";
  } catch (const moe::Error& e) {
    const std::string msg = e.what();
    EXPECT_EQ(msg.find('\n'), std::string::npos) << "message is not one line: " << msg;
    for (const std::string& p : parts) {
      EXPECT_NE(msg.find(p), std::string::npos) << "message lacks '" << p << "': " << msg;
    }
  }
}

// Parses bytes from an exactly-sized heap copy (so ASan sees any over-read).
inline std::unique_ptr<GgufFile> ParseBytes(const std::vector<uint8_t>& b,
                                            const std::string& label = "t.gguf") {
  return GgufFile::FromMemory(b.data(), b.size(), label);
}

}  // namespace moe::gguf_test
