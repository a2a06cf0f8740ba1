// GGUF v3 reader and writer. Format: ../shared/GGUF-MOE.md §1-2 and ggml/docs/gguf.md.
//
// The reader never trusts a count or length before checking it against the bytes that remain, so
// no allocation is larger than a small multiple of the file size and no read leaves the buffer.
// Every check throws moe::Error with one line "<path>: <what> at byte <offset>".
#include "formats/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>

#include "util/atomic_file.h"
#include "util/error.h"

namespace moe {

static_assert(
    std::endian::native == std::endian::little,
    "GGUF is little-endian and tensor data is used in place; big-endian hosts unsupported");

namespace {

using ull = unsigned long long;

constexpr uint32_t kGgufMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr uint32_t kGgufVersion = 3;
constexpr uint64_t kHeaderBytes = 4 + 4 + 8 + 8;
// Smallest possible records, used to reject implausible counts before allocating anything:
// a kv is key length (8) + key (>= 0) + value type (4) + value (>= 1: u8/i8/bool);
// a tensor info is name length (8) + name (>= 0) + n_dims (4) + ne[0] (8) + type (4) + offset (8).
constexpr uint64_t kMinKvBytes = 8 + 4 + 1;
constexpr uint64_t kMinTensorInfoBytes = 8 + 4 + 8 + 4 + 8;
constexpr size_t kMaxNameLen = 63;  // GGML_MAX_NAME (64) including the NUL
constexpr int kMaxDims = 4;
constexpr size_t kMaxQuotedLen = 96;  // names longer than this are cut in messages

// Names of every ggml type id, for messages about types moe.cpp cannot use.
const char* KnownGgmlTypeName(uint32_t t) {
  // clang-format off
  static const char* const kNames[] = {
      "f32", "f16", "q4_0", "q4_1", "q4_2", "q4_3",                       // 0-5 (4, 5 removed)
      "q5_0", "q5_1", "q8_0", "q8_1", "q2_K", "q3_K",                     // 6-11
      "q4_K", "q5_K", "q6_K", "q8_K", "iq2_xxs", "iq2_xs",                // 12-17
      "iq3_xxs", "iq1_s", "iq4_nl", "iq3_s", "iq2_s", "iq4_xs",           // 18-23
      "i8", "i16", "i32", "i64", "f64", "iq1_m",                          // 24-29
      "bf16", "q4_0_4_4", "q4_0_4_8", "q4_0_8_8", "tq1_0", "tq2_0",       // 30-35 (31-33 removed)
      "iq4_nl_4_4", "iq4_nl_4_8", "iq4_nl_8_8", "mxfp4", "nvfp4", "q1_0", // 36-41 (36-38 removed)
      "q2_0",                                                             // 42
  };
  // clang-format on
  return t < sizeof(kNames) / sizeof(kNames[0]) ? kNames[t] : nullptr;
}

std::string SupportedTypeList() {
  std::string s;
  for (uint32_t t = 0; t < 64; ++t) {
    const DTypeTraits* tr = FindDTypeTraits(t);
    if (tr == nullptr) continue;
    if (!s.empty()) s += ", ";
    s += tr->name;
  }
  return s;
}

// Length of the valid UTF-8 sequence starting at s[i], or 0 if the byte there does not start one.
size_t Utf8SequenceLength(std::string_view s, size_t i) {
  const unsigned char c = s[i];
  const size_t n = c >= 0xC2 && c <= 0xDF   ? 2
                   : c >= 0xE0 && c <= 0xEF ? 3
                   : c >= 0xF0 && c <= 0xF4 ? 4
                                            : 0;
  if (n == 0 || i + n > s.size()) return 0;
  for (size_t k = 1; k < n; ++k) {
    if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return 0;
  }
  return n;
}

// A name as it may appear in a one-line message: control bytes, quotes and invalid UTF-8
// escaped as \xNN, long names cut (names are untrusted bytes from the file).
std::string Quote(std::string_view s) {
  std::string out = "'";
  for (size_t i = 0; i < s.size();) {
    if (i >= kMaxQuotedLen) {
      out += StrFormat("...' (%zu bytes)", s.size());
      return out;
    }
    const unsigned char c = s[i];
    if (c >= 0x80) {
      const size_t n = Utf8SequenceLength(s, i);
      if (n != 0) {
        out.append(s.substr(i, n));
        i += n;
        continue;
      }
    }
    if (c < 0x20 || c >= 0x7f || c == '\\' || c == '\'') {
      out += StrFormat("\\x%02x", c);
    } else {
      out += static_cast<char>(c);
    }
    ++i;
  }
  return out + "'";
}

bool IsPowerOfTwo(uint64_t a) { return a != 0 && (a & (a - 1)) == 0; }

// Rounds x up to a multiple of the power of two `a`; false on overflow.
bool PadChecked(uint64_t x, uint64_t a, uint64_t* out) {
  uint64_t sum;
  if (__builtin_add_overflow(x, a - 1, &sum)) return false;
  *out = sum & ~(a - 1);
  return true;
}

// For sizes of data held in memory, which cannot come near 2^64.
uint64_t PadOrDie(uint64_t x, uint64_t a) {
  uint64_t out = 0;
  const bool ok = PadChecked(x, a, &out);
  MOE_ASSERT(ok);
  return out;
}

bool IsValidType(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::kF64); }

// Bytes of one scalar of type t; 0 for string and array (variable size).
size_t ScalarBytes(GgufType t) {
  switch (t) {
    case GgufType::kU8:
    case GgufType::kI8:
    case GgufType::kBool:
      return 1;
    case GgufType::kU16:
    case GgufType::kI16:
      return 2;
    case GgufType::kU32:
    case GgufType::kI32:
    case GgufType::kF32:
      return 4;
    case GgufType::kU64:
    case GgufType::kI64:
    case GgufType::kF64:
      return 8;
    case GgufType::kString:
    case GgufType::kArray:
      return 0;
  }
  return 0;
}

bool IsUnsigned(GgufType t) {
  return t == GgufType::kU8 || t == GgufType::kU16 || t == GgufType::kU32 || t == GgufType::kU64 ||
         t == GgufType::kBool;
}
bool IsSigned(GgufType t) {
  return t == GgufType::kI8 || t == GgufType::kI16 || t == GgufType::kI32 || t == GgufType::kI64;
}
bool IsFloat(GgufType t) { return t == GgufType::kF32 || t == GgufType::kF64; }

std::string TypeString(const GgufValue& v) {
  if (v.type == GgufType::kArray) return std::string("array of ") + GgufTypeName(v.elem_type);
  return GgufTypeName(v.type);
}

// Bounds-checked little-endian cursor over the file. Every failure names the byte offset.
class Cursor {
 public:
  Cursor(const GgufFile& file, const uint8_t* base, uint64_t size)
      : file_(file), base_(base), size_(size) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  [[noreturn]] void FailAt(uint64_t offset, const std::string& what) const {
    file_.Throw(StrFormat("%s at byte %llu", what.c_str(), static_cast<ull>(offset)));
  }

  void Need(uint64_t n, const std::string& what) const {
    if (n > remaining()) {
      FailAt(pos_, StrFormat("file ends while reading %s (%llu bytes needed, %llu left in a "
                             "%llu-byte file; truncated file?)",
                             what.c_str(), static_cast<ull>(n), static_cast<ull>(remaining()),
                             static_cast<ull>(size_)));
    }
  }

  template <typename T>
  T Read(const std::string& what) {
    Need(sizeof(T), what);
    T v;
    std::memcpy(&v, base_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  // Reads a gguf_string: u64 length + bytes. `max_len` (if non-zero) bounds the length.
  std::string_view ReadString(const std::string& what, size_t max_len = 0) {
    const uint64_t len_at = pos_;
    const uint64_t len = Read<uint64_t>("the length of " + what);
    if (max_len != 0 && len > max_len) {
      FailAt(len_at, StrFormat("%s has length %llu but at most %zu bytes are allowed", what.c_str(),
                               static_cast<ull>(len), max_len));
    }
    if (len > remaining()) {
      FailAt(len_at, StrFormat("%s has length %llu but only %llu bytes remain in the file "
                               "(truncated or corrupt file?)",
                               what.c_str(), static_cast<ull>(len), static_cast<ull>(remaining())));
    }
    std::string_view s(reinterpret_cast<const char*>(base_ + pos_), len);
    pos_ += len;
    return s;
  }

 private:
  const GgufFile& file_;
  const uint8_t* base_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

// Reads one scalar of type t (not string/array) into v.num, widened.
void ReadScalar(Cursor& c, GgufType t, const std::string& what, GgufValue* v) {
  switch (t) {
    case GgufType::kU8:
      v->num.u64 = c.Read<uint8_t>(what);
      break;
    case GgufType::kI8:
      v->num.i64 = c.Read<int8_t>(what);
      break;
    case GgufType::kU16:
      v->num.u64 = c.Read<uint16_t>(what);
      break;
    case GgufType::kI16:
      v->num.i64 = c.Read<int16_t>(what);
      break;
    case GgufType::kU32:
      v->num.u64 = c.Read<uint32_t>(what);
      break;
    case GgufType::kI32:
      v->num.i64 = c.Read<int32_t>(what);
      break;
    case GgufType::kF32:
      v->num.f64 = c.Read<float>(what);
      break;
    case GgufType::kU64:
      v->num.u64 = c.Read<uint64_t>(what);
      break;
    case GgufType::kI64:
      v->num.i64 = c.Read<int64_t>(what);
      break;
    case GgufType::kF64:
      v->num.f64 = c.Read<double>(what);
      break;
    case GgufType::kBool: {
      const uint64_t at = c.pos();
      const uint8_t b = c.Read<uint8_t>(what);
      if (b > 1)
        c.FailAt(at,
                 StrFormat("%s: byte value %u is not a bool (must be 0 or 1)", what.c_str(), b));
      v->num.u64 = b;
      break;
    }
    case GgufType::kString:
    case GgufType::kArray:
      MOE_ASSERT(false && "not a scalar type");
  }
}

// Reads the value of key `key` (type already read) into *v.
void ReadValue(Cursor& c, const std::string& key_q, GgufType type, GgufValue* v) {
  v->type = type;
  if (type == GgufType::kString) {
    v->str = std::string(c.ReadString("the string value of key " + key_q));
    return;
  }
  if (type != GgufType::kArray) {
    ReadScalar(c, type, StrFormat("the %s value of key %s", GgufTypeName(type), key_q.c_str()), v);
    return;
  }
  const uint64_t elem_at = c.pos();
  const uint32_t elem = c.Read<uint32_t>("the element type of array key " + key_q);
  if (elem == static_cast<uint32_t>(GgufType::kArray)) {
    c.FailAt(elem_at, "key " + key_q +
                          " is an array of arrays, which GGUF readers (ggml) do "
                          "not support");
  }
  if (!IsValidType(elem)) {
    c.FailAt(elem_at, StrFormat("key %s is an array with unknown element type %u (valid: 0..12)",
                                key_q.c_str(), elem));
  }
  const GgufType et = static_cast<GgufType>(elem);
  v->elem_type = et;
  const uint64_t count_at = c.pos();
  const uint64_t count = c.Read<uint64_t>("the element count of array key " + key_q);
  // A string element is at least its 8-byte length.
  const uint64_t min_elem = et == GgufType::kString ? 8 : ScalarBytes(et);
  if (count > c.remaining() / min_elem) {
    c.FailAt(count_at, StrFormat("key %s is an array of %llu %s, which needs at least %llu "
                                 "bytes per element but only %llu bytes remain in the file",
                                 key_q.c_str(), static_cast<ull>(count), GgufTypeName(et),
                                 static_cast<ull>(min_elem), static_cast<ull>(c.remaining())));
  }
  v->arr_count = count;
  if (et == GgufType::kString) {
    v->strs.reserve(count);
    for (uint64_t j = 0; j < count; ++j) {
      v->strs.emplace_back(c.ReadString(
          StrFormat("string %llu of array key %s", static_cast<ull>(j), key_q.c_str())));
    }
    return;
  }
  const std::string what = "the elements of array key " + key_q;
  GgufValue tmp;
  if (IsUnsigned(et)) v->arr_u.reserve(count);
  if (IsSigned(et)) v->arr_i.reserve(count);
  if (IsFloat(et)) v->arr_f.reserve(count);
  for (uint64_t j = 0; j < count; ++j) {
    ReadScalar(c, et, what, &tmp);
    if (IsUnsigned(et)) v->arr_u.push_back(tmp.num.u64);
    if (IsSigned(et)) v->arr_i.push_back(tmp.num.i64);
    if (IsFloat(et)) v->arr_f.push_back(tmp.num.f64);
  }
}

}  // namespace

const char* GgufTypeName(GgufType t) {
  switch (t) {
    case GgufType::kU8:
      return "u8";
    case GgufType::kI8:
      return "i8";
    case GgufType::kU16:
      return "u16";
    case GgufType::kI16:
      return "i16";
    case GgufType::kU32:
      return "u32";
    case GgufType::kI32:
      return "i32";
    case GgufType::kF32:
      return "f32";
    case GgufType::kBool:
      return "bool";
    case GgufType::kString:
      return "string";
    case GgufType::kArray:
      return "array";
    case GgufType::kU64:
      return "u64";
    case GgufType::kI64:
      return "i64";
    case GgufType::kF64:
      return "f64";
  }
  return "invalid";
}

const char* GgmlTypeName(uint32_t ggml_type) {
  const char* n = KnownGgmlTypeName(ggml_type);
  return n != nullptr ? n : "unknown";
}

// ------------------------------------------------------------------------------------------------
// Reader

std::unique_ptr<GgufFile> GgufFile::Open(const std::string& path) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = path;
  // O_NONBLOCK: opening a FIFO for reading must not wait for a writer (it is refused below).
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd < 0) f->Throw(StrFormat("cannot open: %s", std::strerror(errno)));
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    ::close(fd);
    f->Throw(StrFormat("cannot stat: %s", std::strerror(err)));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    f->Throw("is a directory, not a GGUF file");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    f->Throw("is not a regular file (GGUF files are memory-mapped)");
  }
  if (st.st_size == 0) {
    ::close(fd);
    f->Throw("file is empty (0 bytes), not a GGUF file");
  }
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  void* m = ::mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd, 0);
  const int err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (m == MAP_FAILED)
    f->Throw(StrFormat("cannot mmap %llu bytes: %s", static_cast<ull>(size), std::strerror(err)));
  f->mapping_ = m;
  f->mapping_size_ = size;
  f->base_ = static_cast<const uint8_t*>(m);
  f->size_ = size;
  f->Parse();  // on a throw, ~GgufFile (via unique_ptr) unmaps
  return f;
}

std::unique_ptr<GgufFile> GgufFile::FromMemory(const void* data, size_t size,
                                               const std::string& label) {
  std::unique_ptr<GgufFile> f(new GgufFile());
  f->path_ = label;
  f->base_ = static_cast<const uint8_t*>(data);
  f->size_ = size;
  if (size == 0 || data == nullptr) f->Throw("buffer is empty (0 bytes), not a GGUF file");
  f->Parse();
  return f;
}

void GgufFile::ReleasePages(const void* p, size_t n) const {
  if (mapping_ == nullptr) return;
  const auto lo = reinterpret_cast<uintptr_t>(mapping_), hi = lo + mapping_size_;
  const auto page = static_cast<uintptr_t>(::sysconf(_SC_PAGESIZE));
  uintptr_t a = reinterpret_cast<uintptr_t>(p), b = a + n;
  if (a < lo || b > hi) return;
  a = (a + page - 1) / page * page;
  b = b / page * page;
  if (b > a) ::madvise(reinterpret_cast<void*>(a), b - a, MADV_DONTNEED);
}

GgufFile::~GgufFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
}

void GgufFile::Throw(const std::string& msg) const { throw Error(path_ + ": " + msg); }

void GgufFile::Parse() {
  Cursor c(*this, base_, size_);

  // ---- header ----
  if (size_ < 4) {
    c.FailAt(0, StrFormat("file has only %llu bytes, too small for a GGUF header (%llu bytes)",
                          static_cast<ull>(size_), static_cast<ull>(kHeaderBytes)));
  }
  const uint32_t magic = c.Read<uint32_t>("the magic");
  if (magic != kGgufMagic) {
    std::string shown;
    for (int i = 0; i < 4; ++i) {
      const unsigned char b = base_[i];
      shown += (b >= 0x20 && b < 0x7f && b != '\\') ? std::string(1, static_cast<char>(b))
                                                    : StrFormat("\\x%02x", b);
    }
    c.FailAt(0, StrFormat("bad magic \"%s\", expected \"GGUF\": not a GGUF file", shown.c_str()));
  }
  version_ = c.Read<uint32_t>("the version");
  // Version 2 has the layout of version 3 for little-endian files (v3 only added big-endian
  // support), and llama.cpp reads both; version 1 used 32-bit counts.
  if (version_ != kGgufVersion && version_ != 2) {
    if ((version_ & 0xFFFF) == 0 && __builtin_bswap32(version_) == kGgufVersion) {
      c.FailAt(4, StrFormat("version field 0x%08x is a byte-swapped 3: big-endian GGUF files "
                            "are not supported",
                            version_));
    }
    c.FailAt(4, StrFormat("unsupported GGUF version %u; moe.cpp reads versions 2 and 3%s", version_,
                          version_ < 2 ? " (re-convert the model with a current llama.cpp "
                                         "convert script)"
                                       : ""));
  }
  const uint64_t tensor_count = c.Read<uint64_t>("the tensor count");
  const uint64_t kv_count = c.Read<uint64_t>("the metadata key count");
  if (tensor_count > c.remaining() / kMinTensorInfoBytes) {
    c.FailAt(8, StrFormat("tensor count %llu is implausible: each tensor info needs at least "
                          "%llu bytes but only %llu bytes follow the header",
                          static_cast<ull>(tensor_count), static_cast<ull>(kMinTensorInfoBytes),
                          static_cast<ull>(c.remaining())));
  }
  const uint64_t after_infos = c.remaining() - tensor_count * kMinTensorInfoBytes;
  if (kv_count > after_infos / kMinKvBytes) {
    c.FailAt(16, StrFormat("metadata key count %llu is implausible: each key needs at least "
                           "%llu bytes but only %llu bytes follow the header (less the "
                           "tensor infos)",
                           static_cast<ull>(kv_count), static_cast<ull>(kMinKvBytes),
                           static_cast<ull>(after_infos)));
  }

  // ---- metadata ----
  kvs_.reserve(kv_count);
  for (uint64_t i = 0; i < kv_count; ++i) {
    const uint64_t key_at = c.pos();
    std::string key(c.ReadString(StrFormat("the name of key %llu", static_cast<ull>(i))));
    const std::string key_q = Quote(key);
    auto dup = kv_index_.find(key);
    if (dup != kv_index_.end()) {
      c.FailAt(key_at, StrFormat("duplicate key %s (first at byte %llu)", key_q.c_str(),
                                 static_cast<ull>(kvs_[dup->second].second.file_offset)));
    }
    const uint64_t type_at = c.pos();
    const uint32_t type = c.Read<uint32_t>("the value type of key " + key_q);
    if (!IsValidType(type)) {
      c.FailAt(type_at,
               StrFormat("key %s has unknown value type %u (valid: 0..12)", key_q.c_str(), type));
    }
    GgufValue v;
    v.file_offset = key_at;
    ReadValue(c, key_q, static_cast<GgufType>(type), &v);
    if (key == "general.alignment") {
      if (v.type != GgufType::kU32) {
        c.FailAt(type_at, StrFormat("key 'general.alignment' has type %s but must be u32",
                                    TypeString(v).c_str()));
      }
      if (!IsPowerOfTwo(v.num.u64)) {
        c.FailAt(type_at + 4, StrFormat("general.alignment is %llu but must be a non-zero "
                                        "power of two",
                                        static_cast<ull>(v.num.u64)));
      }
      alignment_ = v.num.u64;
    }
    kv_index_.emplace(key, kvs_.size());
    kvs_.emplace_back(std::move(key), std::move(v));
  }

  // ---- tensor infos ----
  if (tensor_count > c.remaining() / kMinTensorInfoBytes) {
    c.FailAt(8, StrFormat("tensor count %llu is implausible: each tensor info needs at least "
                          "%llu bytes but only %llu bytes follow the metadata",
                          static_cast<ull>(tensor_count), static_cast<ull>(kMinTensorInfoBytes),
                          static_cast<ull>(c.remaining())));
  }
  tensors_.reserve(tensor_count);
  std::vector<uint64_t> offset_at(tensor_count);  // [tensor_count] position of each offset field
  std::vector<uint64_t> nbytes(tensor_count);     // [tensor_count]
  for (uint64_t i = 0; i < tensor_count; ++i) {
    GgufTensorInfo info;
    info.info_offset = c.pos();
    std::string name(
        c.ReadString(StrFormat("the name of tensor %llu", static_cast<ull>(i)), kMaxNameLen));
    const std::string q = Quote(name);
    auto dup = tensor_index_.find(name);
    if (dup != tensor_index_.end()) {
      c.FailAt(info.info_offset, StrFormat("duplicate tensor %s (first at byte %llu)", q.c_str(),
                                           static_cast<ull>(tensors_[dup->second].info_offset)));
    }
    const uint64_t dims_at = c.pos();
    const uint32_t n_dims = c.Read<uint32_t>("n_dims of tensor " + q);
    if (n_dims < 1 || n_dims > kMaxDims) {
      c.FailAt(dims_at,
               StrFormat("tensor %s has n_dims %u; must be 1..%d", q.c_str(), n_dims, kMaxDims));
    }
    TensorView& view = info.view;
    view.n_dims = static_cast<int>(n_dims);
    for (uint32_t d = 0; d < n_dims; ++d) {
      const uint64_t ne_at = c.pos();
      const uint64_t ne = c.Read<uint64_t>(StrFormat("ne[%u] of tensor %s", d, q.c_str()));
      if (ne == 0 || ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        c.FailAt(ne_at, StrFormat("tensor %s has ne[%u] = %lld; each dimension must be >= 1",
                                  q.c_str(), d, static_cast<long long>(ne)));
      }
      view.ne[d] = static_cast<int64_t>(ne);
    }
    const uint64_t type_at = c.pos();
    const uint32_t type = c.Read<uint32_t>("the type of tensor " + q);
    const DTypeTraits* tr = FindDTypeTraits(type);
    if (tr == nullptr) {
      const char* known = KnownGgmlTypeName(type);
      c.FailAt(type_at,
               StrFormat("tensor %s has ggml type %u%s which moe.cpp does not support "
                         "(supported: %s)",
                         q.c_str(), type,
                         known != nullptr ? StrFormat(" (%s)", known).c_str() : " (unknown)",
                         SupportedTypeList().c_str()));
    }
    view.dtype = static_cast<DType>(type);
    const std::string shape = ShapeString(view.ne, view.n_dims);
    if (view.ne[0] % tr->block_size != 0) {
      c.FailAt(type_at,
               StrFormat("tensor %s %s of type %s has a row length ne[0] = %lld that "
                         "is not a multiple of the block size %lld",
                         q.c_str(), shape.c_str(), tr->name, static_cast<long long>(view.ne[0]),
                         static_cast<long long>(tr->block_size)));
    }
    int64_t n_elem = view.ne[0];
    uint64_t rows = 1;
    uint64_t bytes = static_cast<uint64_t>(view.ne[0] / tr->block_size);
    bool overflow = __builtin_mul_overflow(bytes, static_cast<uint64_t>(tr->block_bytes), &bytes);
    for (int d = 1; d < kMaxDims; ++d) {
      overflow |= __builtin_mul_overflow(n_elem, view.ne[d], &n_elem);
      overflow |= __builtin_mul_overflow(rows, static_cast<uint64_t>(view.ne[d]), &rows);
    }
    overflow |= __builtin_mul_overflow(bytes, rows, &bytes);
    // TensorView::NumBytes computes in size_t; keep sizes well inside it.
    overflow |= bytes > static_cast<uint64_t>(std::numeric_limits<int64_t>::max());
    if (overflow) {
      c.FailAt(dims_at, StrFormat("tensor %s %s of type %s is too large: its element count or "
                                  "byte size overflows 64 bits",
                                  q.c_str(), shape.c_str(), tr->name));
    }
    offset_at[i] = c.pos();
    info.data_offset = c.Read<uint64_t>("the data offset of tensor " + q);
    nbytes[i] = bytes;
    view.name = std::move(name);
    tensor_index_.emplace(view.name, tensors_.size());
    tensors_.push_back(std::move(info));
  }

  // ---- data section: starts at the next multiple of the alignment; tensors are sequential ----
  if (!PadChecked(c.pos(), alignment_, &data_offset_)) {
    c.FailAt(c.pos(), "data section offset overflows");
  }
  uint64_t expected = 0;  // ggml: offset[i] == sum_{j<i} PAD(nbytes[j], alignment)
  for (size_t i = 0; i < tensors_.size(); ++i) {
    GgufTensorInfo& info = tensors_[i];
    const std::string q = Quote(info.view.name);
    const uint64_t off = info.data_offset;
    if (off % alignment_ != 0) {
      c.FailAt(offset_at[i],
               StrFormat("tensor %s has data offset %llu, which is not a "
                         "multiple of the alignment %llu",
                         q.c_str(), static_cast<ull>(off), static_cast<ull>(alignment_)));
    }
    if (off != expected) {
      c.FailAt(offset_at[i], StrFormat("tensor %s has data offset %llu, expected %llu (tensor "
                                       "data must be stored in info order, each padded to the "
                                       "alignment %llu)",
                                       q.c_str(), static_cast<ull>(off), static_cast<ull>(expected),
                                       static_cast<ull>(alignment_)));
    }
    uint64_t start, end;
    if (__builtin_add_overflow(data_offset_, off, &start) ||
        __builtin_add_overflow(start, nbytes[i], &end)) {
      c.FailAt(offset_at[i], StrFormat("tensor %s data (offset %llu, %llu bytes) ends beyond "
                                       "2^64 but the file has %llu bytes",
                                       q.c_str(), static_cast<ull>(off),
                                       static_cast<ull>(nbytes[i]), static_cast<ull>(size_)));
    }
    if (end > size_) {
      c.FailAt(offset_at[i], StrFormat("tensor %s data ends at byte %llu but the file has %llu "
                                       "bytes (truncated file?)",
                                       q.c_str(), static_cast<ull>(end), static_cast<ull>(size_)));
    }
    info.view.data = base_ + start;
    uint64_t padded;
    if (!PadChecked(nbytes[i], alignment_, &padded) ||
        __builtin_add_overflow(expected, padded, &expected)) {
      c.FailAt(offset_at[i], StrFormat("tensor %s: data offsets overflow", q.c_str()));
    }
  }
}

const GgufValue* GgufFile::Find(std::string_view key) const {
  auto it = kv_index_.find(std::string(key));
  return it == kv_index_.end() ? nullptr : &kvs_[it->second].second;
}

const GgufTensorInfo* GgufFile::FindTensorInfo(std::string_view name) const {
  auto it = tensor_index_.find(std::string(name));
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

const TensorView* GgufFile::FindTensor(std::string_view name) const {
  const GgufTensorInfo* info = FindTensorInfo(name);
  return info == nullptr ? nullptr : &info->view;
}

namespace {

[[noreturn]] void TypeMismatch(const GgufFile& f, std::string_view key, const GgufValue& v,
                               const char* expected) {
  f.Throw(StrFormat("key %s (byte %llu) has type %s but expected %s", Quote(key).c_str(),
                    static_cast<ull>(v.file_offset), TypeString(v).c_str(), expected));
}

const GgufValue& Required(const GgufFile& f, std::string_view key) {
  const GgufValue* v = f.Find(key);
  if (v == nullptr) f.Throw(StrFormat("required key %s is missing", Quote(key).c_str()));
  return *v;
}

// The value if present with exactly `type` (elem_type for arrays), nullptr if absent.
const GgufValue* Typed(const GgufFile& f, std::string_view key, GgufType type,
                       GgufType elem_type = GgufType::kU8) {
  const GgufValue* v = f.Find(key);
  if (v == nullptr) return nullptr;
  if (v->type != type || (type == GgufType::kArray && v->elem_type != elem_type)) {
    std::string want = type == GgufType::kArray ? std::string("array of ") + GgufTypeName(elem_type)
                                                : std::string(GgufTypeName(type));
    TypeMismatch(f, key, *v, want.c_str());
  }
  return v;
}

}  // namespace

std::optional<uint32_t> GgufFile::GetU32Opt(std::string_view key) const {
  const GgufValue* v = Typed(*this, key, GgufType::kU32);
  if (v == nullptr) return std::nullopt;
  return static_cast<uint32_t>(v->num.u64);
}

uint32_t GgufFile::GetU32(std::string_view key) const {
  Required(*this, key);
  return *GetU32Opt(key);
}

std::optional<float> GgufFile::GetF32Opt(std::string_view key) const {
  const GgufValue* v = Typed(*this, key, GgufType::kF32);
  if (v == nullptr) return std::nullopt;
  return static_cast<float>(v->num.f64);
}

float GgufFile::GetF32(std::string_view key) const {
  Required(*this, key);
  return *GetF32Opt(key);
}

std::optional<bool> GgufFile::GetBoolOpt(std::string_view key) const {
  const GgufValue* v = Typed(*this, key, GgufType::kBool);
  if (v == nullptr) return std::nullopt;
  return v->num.u64 != 0;
}

std::optional<std::string> GgufFile::GetStringOpt(std::string_view key) const {
  const GgufValue* v = Typed(*this, key, GgufType::kString);
  if (v == nullptr) return std::nullopt;
  return v->str;
}

std::string GgufFile::GetString(std::string_view key) const {
  Required(*this, key);
  return *GetStringOpt(key);
}

const std::vector<std::string>& GgufFile::GetStringArray(std::string_view key) const {
  Required(*this, key);
  return Typed(*this, key, GgufType::kArray, GgufType::kString)->strs;
}

std::vector<float> GgufFile::GetF32Array(std::string_view key) const {
  Required(*this, key);
  const GgufValue* v = Typed(*this, key, GgufType::kArray, GgufType::kF32);
  return std::vector<float>(v->arr_f.begin(), v->arr_f.end());
}

std::vector<int32_t> GgufFile::GetI32Array(std::string_view key) const {
  Required(*this, key);
  const GgufValue* v = Typed(*this, key, GgufType::kArray, GgufType::kI32);
  return std::vector<int32_t>(v->arr_i.begin(), v->arr_i.end());
}

std::optional<std::vector<uint32_t>> GgufFile::GetPerLayerOpt(std::string_view key,
                                                              uint32_t n_layer) const {
  const GgufValue* v = Find(key);
  if (v == nullptr) return std::nullopt;
  if (v->type == GgufType::kU32) {
    return std::vector<uint32_t>(n_layer, static_cast<uint32_t>(v->num.u64));
  }
  const bool is_u32 = v->type == GgufType::kArray && v->elem_type == GgufType::kU32;
  const bool is_i32 = v->type == GgufType::kArray && v->elem_type == GgufType::kI32;
  if (!is_u32 && !is_i32) {
    TypeMismatch(*this, key, *v, "u32 or an array of u32/i32 with one entry per layer");
  }
  if (v->arr_count != n_layer) {
    Throw(
        StrFormat("key %s (byte %llu) is an array of %llu entries but the model has %u "
                  "layers (expected a u32 or an array of exactly %u)",
                  Quote(key).c_str(), static_cast<ull>(v->file_offset),
                  static_cast<ull>(v->arr_count), n_layer, n_layer));
  }
  std::vector<uint32_t> out(n_layer);
  for (uint32_t i = 0; i < n_layer; ++i) {
    if (is_u32) {
      out[i] = static_cast<uint32_t>(v->arr_u[i]);
    } else {
      if (v->arr_i[i] < 0) {
        Throw(StrFormat("key %s (byte %llu) entry %u is %lld; per-layer counts must be >= 0",
                        Quote(key).c_str(), static_cast<ull>(v->file_offset), i,
                        static_cast<long long>(v->arr_i[i])));
      }
      out[i] = static_cast<uint32_t>(v->arr_i[i]);
    }
  }
  return out;
}

// ------------------------------------------------------------------------------------------------
// Writer

namespace {

constexpr const char* kWriterPrefix = "gguf writer: ";

// Checks that a scalar (already widened) fits its declared type.
bool ScalarFits(GgufType t, uint64_t u, int64_t i) {
  switch (t) {
    case GgufType::kU8:
      return u <= 0xFF;
    case GgufType::kU16:
      return u <= 0xFFFF;
    case GgufType::kU32:
      return u <= 0xFFFFFFFFull;
    case GgufType::kBool:
      return u <= 1;
    case GgufType::kI8:
      return i >= -128 && i <= 127;
    case GgufType::kI16:
      return i >= -32768 && i <= 32767;
    case GgufType::kI32:
      return i >= std::numeric_limits<int32_t>::min() && i <= std::numeric_limits<int32_t>::max();
    default:
      return true;
  }
}

class ByteSink {
 public:
  template <typename T>
  void Put(T v) {
    const size_t n = buf_.size();
    buf_.resize(n + sizeof(T));
    std::memcpy(buf_.data() + n, &v, sizeof(T));
  }
  void PutString(const std::string& s) {
    Put<uint64_t>(s.size());
    buf_.insert(buf_.end(), s.begin(), s.end());
  }
  void PutScalar(GgufType t, uint64_t u, int64_t i, double f) {
    switch (t) {
      case GgufType::kU8:
        Put<uint8_t>(static_cast<uint8_t>(u));
        break;
      case GgufType::kBool:
        Put<uint8_t>(u != 0 ? 1 : 0);
        break;
      case GgufType::kI8:
        Put<int8_t>(static_cast<int8_t>(i));
        break;
      case GgufType::kU16:
        Put<uint16_t>(static_cast<uint16_t>(u));
        break;
      case GgufType::kI16:
        Put<int16_t>(static_cast<int16_t>(i));
        break;
      case GgufType::kU32:
        Put<uint32_t>(static_cast<uint32_t>(u));
        break;
      case GgufType::kI32:
        Put<int32_t>(static_cast<int32_t>(i));
        break;
      case GgufType::kF32:
        Put<float>(static_cast<float>(f));
        break;
      case GgufType::kU64:
        Put<uint64_t>(u);
        break;
      case GgufType::kI64:
        Put<int64_t>(i);
        break;
      case GgufType::kF64:
        Put<double>(f);
        break;
      case GgufType::kString:
      case GgufType::kArray:
        MOE_ASSERT(false && "not a scalar");
    }
  }
  std::vector<uint8_t>& bytes() { return buf_; }

 private:
  std::vector<uint8_t> buf_;
};

// Validates a value before it is stored (SetValue accepts values built by hand).
void CheckValue(const std::string& key, const GgufValue& v) {
  const std::string q = Quote(key);
  if (!IsValidType(static_cast<uint32_t>(v.type))) {
    Fail("%skey %s has invalid type %u", kWriterPrefix, q.c_str(), static_cast<uint32_t>(v.type));
  }
  if (v.type == GgufType::kString) return;
  if (v.type != GgufType::kArray) {
    if (!ScalarFits(v.type, v.num.u64, v.num.i64)) {
      Fail("%skey %s: value does not fit type %s", kWriterPrefix, q.c_str(), GgufTypeName(v.type));
    }
    return;
  }
  const GgufType et = v.elem_type;
  if (et == GgufType::kArray || !IsValidType(static_cast<uint32_t>(et))) {
    Fail("%skey %s: arrays of %s are not supported", kWriterPrefix, q.c_str(),
         IsValidType(static_cast<uint32_t>(et)) ? "arrays" : "invalid types");
  }
  size_t n = 0;
  if (et == GgufType::kString) n = v.strs.size();
  if (IsUnsigned(et)) n = v.arr_u.size();
  if (IsSigned(et)) n = v.arr_i.size();
  if (IsFloat(et)) n = v.arr_f.size();
  if (n != v.arr_count) {
    Fail("%skey %s: array of %s has arr_count %llu but holds %zu values", kWriterPrefix, q.c_str(),
         GgufTypeName(et), static_cast<ull>(v.arr_count), n);
  }
  for (size_t j = 0; j < n; ++j) {
    const bool ok = IsUnsigned(et) ? ScalarFits(et, v.arr_u[j], 0)
                    : IsSigned(et) ? ScalarFits(et, 0, v.arr_i[j])
                                   : true;
    if (!ok) {
      Fail("%skey %s: element %zu does not fit type %s", kWriterPrefix, q.c_str(), j,
           GgufTypeName(et));
    }
  }
}

void PutValue(ByteSink& s, const GgufValue& v) {
  s.Put<uint32_t>(static_cast<uint32_t>(v.type));
  if (v.type == GgufType::kString) {
    s.PutString(v.str);
    return;
  }
  if (v.type != GgufType::kArray) {
    s.PutScalar(v.type, v.num.u64, v.num.i64, v.num.f64);
    return;
  }
  const GgufType et = v.elem_type;
  s.Put<uint32_t>(static_cast<uint32_t>(et));
  s.Put<uint64_t>(v.arr_count);
  for (uint64_t j = 0; j < v.arr_count; ++j) {
    if (et == GgufType::kString) {
      s.PutString(v.strs[j]);
    } else if (IsUnsigned(et)) {
      s.PutScalar(et, v.arr_u[j], 0, 0);
    } else if (IsSigned(et)) {
      s.PutScalar(et, 0, v.arr_i[j], 0);
    } else {
      s.PutScalar(et, 0, 0, v.arr_f[j]);
    }
  }
}

GgufValue Scalar(GgufType t) {
  GgufValue v;
  v.type = t;
  return v;
}

GgufValue ArrayOf(GgufType et, size_t n) {
  GgufValue v;
  v.type = GgufType::kArray;
  v.elem_type = et;
  v.arr_count = n;
  return v;
}

}  // namespace

void GgufWriter::Put(const std::string& key, GgufValue v) {
  CheckValue(key, v);
  if (key == "general.alignment") {
    // The reader requires this exact type; keep alignment_ and the key consistent.
    if (v.type != GgufType::kU32 || !IsPowerOfTwo(v.num.u64)) {
      Fail("%skey 'general.alignment' must be a u32 non-zero power of two (got %s %llu)",
           kWriterPrefix, TypeString(v).c_str(), static_cast<ull>(v.num.u64));
    }
    alignment_ = static_cast<uint32_t>(v.num.u64);
  }
  v.file_offset = 0;
  for (KV& kv : kvs_) {
    if (kv.key == key) {
      kv.value = std::move(v);
      return;
    }
  }
  kvs_.push_back(KV{key, std::move(v)});
}

void GgufWriter::SetU32(const std::string& key, uint32_t x) {
  GgufValue v = Scalar(GgufType::kU32);
  v.num.u64 = x;
  Put(key, std::move(v));
}

void GgufWriter::SetI32(const std::string& key, int32_t x) {
  GgufValue v = Scalar(GgufType::kI32);
  v.num.i64 = x;
  Put(key, std::move(v));
}

void GgufWriter::SetU64(const std::string& key, uint64_t x) {
  GgufValue v = Scalar(GgufType::kU64);
  v.num.u64 = x;
  Put(key, std::move(v));
}

void GgufWriter::SetF32(const std::string& key, float x) {
  GgufValue v = Scalar(GgufType::kF32);
  v.num.f64 = x;
  Put(key, std::move(v));
}

void GgufWriter::SetBool(const std::string& key, bool x) {
  GgufValue v = Scalar(GgufType::kBool);
  v.num.u64 = x ? 1 : 0;
  Put(key, std::move(v));
}

void GgufWriter::SetString(const std::string& key, const std::string& x) {
  GgufValue v = Scalar(GgufType::kString);
  v.str = x;
  Put(key, std::move(v));
}

void GgufWriter::SetStringArray(const std::string& key, const std::vector<std::string>& x) {
  GgufValue v = ArrayOf(GgufType::kString, x.size());
  v.strs = x;
  Put(key, std::move(v));
}

void GgufWriter::SetF32Array(const std::string& key, const std::vector<float>& x) {
  GgufValue v = ArrayOf(GgufType::kF32, x.size());
  v.arr_f.assign(x.begin(), x.end());
  Put(key, std::move(v));
}

void GgufWriter::SetI32Array(const std::string& key, const std::vector<int32_t>& x) {
  GgufValue v = ArrayOf(GgufType::kI32, x.size());
  v.arr_i.assign(x.begin(), x.end());
  Put(key, std::move(v));
}

void GgufWriter::SetU32Array(const std::string& key, const std::vector<uint32_t>& x) {
  GgufValue v = ArrayOf(GgufType::kU32, x.size());
  v.arr_u.assign(x.begin(), x.end());
  Put(key, std::move(v));
}

void GgufWriter::SetValue(const std::string& key, const GgufValue& v) { Put(key, v); }

void GgufWriter::SetAlignment(uint32_t a) {
  if (!IsPowerOfTwo(a)) {
    Fail("%salignment %u must be a non-zero power of two", kWriterPrefix, a);
  }
  SetU32("general.alignment", a);
}

void GgufWriter::AddTensor(const std::string& name, DType dtype, const std::vector<int64_t>& ne,
                           const void* data, size_t nbytes) {
  T& t = AddInfo(name, dtype, ne, &nbytes);
  const uint8_t* src = static_cast<const uint8_t*>(data);
  t.data.assign(src, src + nbytes);
}

void GgufWriter::AddTensorDeferred(const std::string& name, DType dtype,
                                   const std::vector<int64_t>& ne, TensorFill fill) {
  T& t = AddInfo(name, dtype, ne, nullptr);
  t.fill = std::move(fill);
}

GgufWriter::T& GgufWriter::AddInfo(const std::string& name, DType dtype,
                                   const std::vector<int64_t>& ne, const size_t* given) {
  const std::string q = Quote(name);
  if (name.empty() || name.size() > kMaxNameLen) {
    Fail("%stensor %s: name must be 1..%zu bytes long", kWriterPrefix, q.c_str(), kMaxNameLen);
  }
  for (const T& t : tensors_) {
    if (t.name == name) Fail("%sduplicate tensor %s", kWriterPrefix, q.c_str());
  }
  const DTypeTraits* tr = FindDTypeTraits(static_cast<uint32_t>(dtype));
  if (tr == nullptr) {
    Fail("%stensor %s: unsupported dtype %u", kWriterPrefix, q.c_str(),
         static_cast<uint32_t>(dtype));
  }
  if (ne.empty() || ne.size() > static_cast<size_t>(kMaxDims)) {
    Fail("%stensor %s: %zu dimensions given, must be 1..%d", kWriterPrefix, q.c_str(), ne.size(),
         kMaxDims);
  }
  const std::string shape = ShapeString(ne.data(), static_cast<int>(ne.size()));
  uint64_t rows = 1;
  bool overflow = false;
  for (size_t d = 0; d < ne.size(); ++d) {
    if (ne[d] < 1) {
      Fail("%stensor %s %s: every dimension must be >= 1", kWriterPrefix, q.c_str(), shape.c_str());
    }
    if (d > 0) overflow |= __builtin_mul_overflow(rows, static_cast<uint64_t>(ne[d]), &rows);
  }
  if (ne[0] % tr->block_size != 0) {
    Fail("%stensor %s %s: row length %lld is not a multiple of the %s block size %lld",
         kWriterPrefix, q.c_str(), shape.c_str(), static_cast<long long>(ne[0]), tr->name,
         static_cast<long long>(tr->block_size));
  }
  uint64_t want = static_cast<uint64_t>(ne[0] / tr->block_size);
  overflow |= __builtin_mul_overflow(want, static_cast<uint64_t>(tr->block_bytes), &want);
  overflow |= __builtin_mul_overflow(want, rows, &want);
  if (overflow) Fail("%stensor %s %s: size overflows", kWriterPrefix, q.c_str(), shape.c_str());
  if (given != nullptr && want != *given) {
    Fail("%stensor %s %s of type %s needs %llu bytes but %zu were given", kWriterPrefix, q.c_str(),
         shape.c_str(), tr->name, static_cast<ull>(want), *given);
  }
  T t;
  t.name = name;
  t.dtype = dtype;
  t.ne = ne;
  t.nbytes = static_cast<size_t>(want);
  tensors_.push_back(std::move(t));
  return tensors_.back();
}

// The data of tensor t: its copy, or what its fill writes into buf.
const uint8_t* GgufWriter::Data(const T& t, std::vector<uint8_t>& buf) {
  if (!t.fill) return t.data.data();
  buf.resize(t.nbytes);
  t.fill(buf.data());
  return buf.data();
}

std::vector<uint8_t> GgufWriter::Header(uint64_t* padded_size) const {
  const uint64_t align = alignment_;
  ByteSink s;
  s.Put<uint32_t>(kGgufMagic);
  s.Put<uint32_t>(kGgufVersion);
  s.Put<uint64_t>(tensors_.size());
  s.Put<uint64_t>(kvs_.size());
  for (const KV& kv : kvs_) {
    s.PutString(kv.key);
    PutValue(s, kv.value);
  }
  uint64_t offset = 0;
  for (const T& t : tensors_) {
    s.PutString(t.name);
    s.Put<uint32_t>(static_cast<uint32_t>(t.ne.size()));
    for (int64_t n : t.ne) s.Put<uint64_t>(static_cast<uint64_t>(n));
    s.Put<uint32_t>(static_cast<uint32_t>(t.dtype));
    s.Put<uint64_t>(offset);
    offset += PadOrDie(t.nbytes, align);
  }
  *padded_size = PadOrDie(s.bytes().size(), align);
  return s.bytes();
}

std::vector<uint8_t> GgufWriter::Serialize() const {
  uint64_t header_end = 0;
  std::vector<uint8_t> out = Header(&header_end);
  out.resize(header_end, 0);
  std::vector<uint8_t> buf;
  for (const T& t : tensors_) {
    const uint8_t* data = Data(t, buf);
    out.insert(out.end(), data, data + t.nbytes);
    out.resize(PadOrDie(out.size(), alignment_), 0);
  }
  return out;
}

void GgufWriter::Write(const std::string& path) const {
  const uint64_t align = alignment_;
  uint64_t header_end = 0;
  const std::vector<uint8_t> header = Header(&header_end);

  AtomicFile out(path);
  out.Write(header.data(), header.size());
  out.Zeros(header_end - header.size());
  std::vector<uint8_t> buf;
  for (const T& t : tensors_) {
    out.Write(Data(t, buf), t.nbytes);
    out.Zeros(PadOrDie(t.nbytes, align) - t.nbytes);
  }
  out.Commit();
}

}  // namespace moe
