// GGUF v3 reader (mmap, zero-copy, strictly validated) and writer.
// Format facts: ../shared/GGUF-MOE.md §1-2. Every reader failure throws moe::Error with one line
// naming the key or tensor and the byte offset where the problem is, e.g.
//   "x.gguf: tensor 'blk.3.ffn_up_exps' data ends at byte 9123456 but the file has 9000000 bytes
//    (truncated file?)"
// No byte string may crash the reader (fuzzed, also under ASan/UBSan).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "tensor/tensor.h"

namespace moe {

enum class GgufType : uint32_t {
  kU8 = 0, kI8 = 1, kU16 = 2, kI16 = 3, kU32 = 4, kI32 = 5, kF32 = 6, kBool = 7,
  kString = 8, kArray = 9, kU64 = 10, kI64 = 11, kF64 = 12,
};
const char* GgufTypeName(GgufType t);  // "u32", "string", "array", ...
// Name of any ggml tensor type id, also those moe.cpp cannot use ("iq4_xs"); "unknown" if none.
const char* GgmlTypeName(uint32_t ggml_type);

// One metadata value, decoded. Scalars live in the union; strings and arrays are copied out
// (metadata is small next to tensor data; tokenizer arrays of 150k strings are fine).
struct GgufValue {
  GgufType type = GgufType::kU8;
  GgufType elem_type = GgufType::kU8;  // for arrays
  union {
    uint64_t u64;
    int64_t i64;
    double f64;
  } num{};                          // scalar value widened (f32 stored as double exactly)
  std::string str;                  // kString
  std::vector<std::string> strs;    // array of strings
  std::vector<uint64_t> arr_u;      // array of unsigned ints / bools
  std::vector<int64_t> arr_i;       // array of signed ints
  std::vector<double> arr_f;        // array of floats
  uint64_t arr_count = 0;
  uint64_t file_offset = 0;         // byte offset of the key in the file (for messages)
};

struct GgufTensorInfo {
  TensorView view;         // data points into the mapping
  uint64_t data_offset;    // relative to the data section
  uint64_t info_offset;    // byte offset of the tensor info record in the file
};

class GgufFile {
 public:
  // Maps and validates the file. Throws moe::Error (one line) on any problem.
  static std::unique_ptr<GgufFile> Open(const std::string& path);
  // Parses a buffer the caller keeps alive (fuzzing, tests). `label` prefixes messages.
  static std::unique_ptr<GgufFile> FromMemory(const void* data, size_t size,
                                              const std::string& label);
  ~GgufFile();
  GgufFile(const GgufFile&) = delete;
  GgufFile& operator=(const GgufFile&) = delete;

  const std::string& path() const { return path_; }
  uint32_t version() const { return version_; }
  uint64_t alignment() const { return alignment_; }
  uint64_t file_size() const { return size_; }
  uint64_t data_section_offset() const { return data_offset_; }

  // ---- metadata ----
  const std::vector<std::pair<std::string, GgufValue>>& kvs() const { return kvs_; }
  const GgufValue* Find(std::string_view key) const;
  bool Has(std::string_view key) const { return Find(key) != nullptr; }
  // Typed getters check the stored type exactly, as llama.cpp does:
  //   "x.gguf: key 'llama.block_count' (byte 123) has type u64 but expected u32".
  // The non-Opt forms throw "x.gguf: required key 'K' is missing".
  uint32_t GetU32(std::string_view key) const;
  std::optional<uint32_t> GetU32Opt(std::string_view key) const;
  float GetF32(std::string_view key) const;
  std::optional<float> GetF32Opt(std::string_view key) const;
  std::optional<bool> GetBoolOpt(std::string_view key) const;
  std::string GetString(std::string_view key) const;
  std::optional<std::string> GetStringOpt(std::string_view key) const;
  // Array getters check the element type (string / f32 / i32).
  const std::vector<std::string>& GetStringArray(std::string_view key) const;
  std::vector<float> GetF32Array(std::string_view key) const;
  std::vector<int32_t> GetI32Array(std::string_view key) const;
  // A per-layer count: scalar u32 (broadcast) or a u32/i32 array of exactly n_layer entries.
  std::optional<std::vector<uint32_t>> GetPerLayerOpt(std::string_view key, uint32_t n_layer) const;

  // ---- tensors ----
  const std::vector<GgufTensorInfo>& tensors() const { return tensors_; }
  const TensorView* FindTensor(std::string_view name) const;
  const GgufTensorInfo* FindTensorInfo(std::string_view name) const;

  // Formats "<label>: <msg>" and throws moe::Error.
  [[noreturn]] void Throw(const std::string& msg) const;

  // Gives the pages of a mapped file that lie wholly inside [p, p + n) back to the kernel (they
  // are read from the file again if touched): for data copied elsewhere, e.g. repacked weights.
  // No-op for a buffer (FromMemory) or a range outside the mapping.
  void ReleasePages(const void* p, size_t n) const;

 private:
  GgufFile() = default;
  void Parse();

  std::string path_;
  const uint8_t* base_ = nullptr;
  uint64_t size_ = 0;
  void* mapping_ = nullptr;  // non-null when this object owns an mmap
  uint64_t mapping_size_ = 0;
  uint32_t version_ = 0;
  uint64_t alignment_ = 32;
  uint64_t data_offset_ = 0;
  std::vector<std::pair<std::string, GgufValue>> kvs_;
  std::unordered_map<std::string, size_t> kv_index_;
  std::vector<GgufTensorInfo> tensors_;
  std::unordered_map<std::string, size_t> tensor_index_;
};

// Writes GGUF v3 with exactly the key types given (llama.cpp checks them strictly), tensor data
// in info order, each tensor padded with zeros to `alignment` (default 32).
class GgufWriter {
 public:
  void SetU32(const std::string& key, uint32_t v);
  void SetI32(const std::string& key, int32_t v);
  void SetU64(const std::string& key, uint64_t v);
  void SetF32(const std::string& key, float v);
  void SetBool(const std::string& key, bool v);
  void SetString(const std::string& key, const std::string& v);
  void SetStringArray(const std::string& key, const std::vector<std::string>& v);
  void SetF32Array(const std::string& key, const std::vector<float>& v);
  void SetI32Array(const std::string& key, const std::vector<int32_t>& v);
  void SetU32Array(const std::string& key, const std::vector<uint32_t>& v);
  // Copies a metadata value read from another file (for re-writing / quantizing models).
  void SetValue(const std::string& key, const GgufValue& v);
  void SetAlignment(uint32_t a);  // also writes general.alignment

  // ne[0] is the row length; data holds RowBytes(dtype, ne[0]) * prod(ne[1..]) bytes and is
  // copied. A second tensor of the same name is an error (moe::Error).
  void AddTensor(const std::string& name, DType dtype, const std::vector<int64_t>& ne,
                 const void* data, size_t nbytes);

  // A tensor whose data is produced only when the file is written: fill(dst) writes its
  // RowBytes(dtype, ne[0]) * prod(ne[1..]) bytes (converters keep one tensor in memory at a
  // time). fill may throw moe::Error; Write then leaves the old file in place.
  using TensorFill = std::function<void(uint8_t* dst)>;
  void AddTensorDeferred(const std::string& name, DType dtype, const std::vector<int64_t>& ne,
                         TensorFill fill);

  // Writes the file through util/atomic_file.h (complete or not at all; a reader never sees a
  // half-written file, an old file survives a failed write, a symlink or device at path is
  // refused). Throws moe::Error on I/O failure.
  void Write(const std::string& path) const;
  // The same bytes in memory (metadata-only files, tests).
  std::vector<uint8_t> Serialize() const;

 private:
  struct KV {
    std::string key;
    GgufValue value;
  };
  struct T {
    std::string name;
    DType dtype;
    std::vector<int64_t> ne;
    size_t nbytes = 0;
    std::vector<uint8_t> data;  // or, for deferred tensors, empty and:
    TensorFill fill;
  };
  void Put(const std::string& key, GgufValue v);
  // Validates name, type and shape (and *given, the byte count, if not null); appends the info.
  T& AddInfo(const std::string& name, DType dtype, const std::vector<int64_t>& ne,
             const size_t* given);
  static const uint8_t* Data(const T& t, std::vector<uint8_t>& buf);
  // Header and tensor infos; *padded_size = their size padded to the alignment.
  std::vector<uint8_t> Header(uint64_t* padded_size) const;
  std::vector<KV> kvs_;
  std::vector<T> tensors_;
  uint32_t alignment_ = 32;
};

}  // namespace moe
