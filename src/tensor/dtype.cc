#include "tensor/dtype.h"

#include <cctype>
#include <cstring>
#include <string>

#include "util/error.h"

namespace moe {

namespace {
const DTypeTraits kF32{"f32", 1, 4};
const DTypeTraits kF16{"f16", 1, 2};
const DTypeTraits kBF16{"bf16", 1, 2};
const DTypeTraits kI32{"i32", 1, 4};
const DTypeTraits kQ8_0{"q8_0", kQK8_0, sizeof(BlockQ8_0)};
const DTypeTraits kQ4_0{"q4_0", kQK4_0, sizeof(BlockQ4_0)};
const DTypeTraits kQ4_K{"q4_K", kQK_K, sizeof(BlockQ4_K)};
const DTypeTraits kQ6_K{"q6_K", kQK_K, sizeof(BlockQ6_K)};
const DTypeTraits kQ8_K{"q8_K", kQK_K, sizeof(BlockQ8_K)};
}  // namespace

const DTypeTraits* FindDTypeTraits(uint32_t t) {
  switch (static_cast<DType>(t)) {
    case DType::kF32: return &kF32;
    case DType::kF16: return &kF16;
    case DType::kBF16: return &kBF16;
    case DType::kI32: return &kI32;
    case DType::kQ8_0: return &kQ8_0;
    case DType::kQ4_0: return &kQ4_0;
    case DType::kQ4_K: return &kQ4_K;
    case DType::kQ6_K: return &kQ6_K;
    case DType::kQ8_K: return &kQ8_K;
  }
  return nullptr;
}

const DTypeTraits& Traits(DType t) {
  const DTypeTraits* tr = FindDTypeTraits(static_cast<uint32_t>(t));
  MOE_ASSERT(tr != nullptr);
  return *tr;
}

bool ParseDType(const char* name, DType* out) {
  std::string s(name);
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  static const DType all[] = {DType::kF32, DType::kF16, DType::kBF16, DType::kQ8_0,
                              DType::kQ4_0, DType::kQ4_K, DType::kQ6_K};
  for (DType t : all) {
    std::string n = Traits(t).name;
    for (char& c : n) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (n == s) {
      *out = t;
      return true;
    }
  }
  return false;
}

DType VecDotType(DType w) {
  switch (w) {
    case DType::kF32: return DType::kF32;
    case DType::kF16: return DType::kF16;
    case DType::kBF16: return DType::kBF16;
    case DType::kQ8_0:
    case DType::kQ4_0: return DType::kQ8_0;
    case DType::kQ4_K:
    case DType::kQ6_K: return DType::kQ8_K;
    default: MOE_ASSERT(false && "no vec-dot type");
  }
  return DType::kF32;
}

}  // namespace moe
