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
const DTypeTraits kQ4_1{"q4_1", kQK4_0, sizeof(BlockQ4_1)};
const DTypeTraits kQ5_0{"q5_0", kQK4_0, sizeof(BlockQ5_0)};
const DTypeTraits kQ5_1{"q5_1", kQK4_0, sizeof(BlockQ5_1)};
const DTypeTraits kQ8_1{"q8_1", kQK8_0, sizeof(BlockQ8_1)};
const DTypeTraits kQ2_K{"q2_K", kQK_K, sizeof(BlockQ2_K)};
const DTypeTraits kQ3_K{"q3_K", kQK_K, sizeof(BlockQ3_K)};
const DTypeTraits kQ4_K{"q4_K", kQK_K, sizeof(BlockQ4_K)};
const DTypeTraits kQ5_K{"q5_K", kQK_K, sizeof(BlockQ5_K)};
const DTypeTraits kQ6_K{"q6_K", kQK_K, sizeof(BlockQ6_K)};
const DTypeTraits kQ8_K{"q8_K", kQK_K, sizeof(BlockQ8_K)};
const DTypeTraits kIQ4_NL{"iq4_nl", kQK4_0, sizeof(BlockIQ4_NL)};
const DTypeTraits kIQ2_XXS{"iq2_xxs", kQK_K, sizeof(BlockIQ2_XXS)};
const DTypeTraits kIQ3_XXS{"iq3_xxs", kQK_K, sizeof(BlockIQ3_XXS)};
const DTypeTraits kIQ3_S{"iq3_s", kQK_K, sizeof(BlockIQ3_S)};
const DTypeTraits kIQ2_XS{"iq2_xs", kQK_K, sizeof(BlockIQ2_XS)};
const DTypeTraits kIQ2_S{"iq2_s", kQK_K, sizeof(BlockIQ2_S)};
const DTypeTraits kIQ1_S{"iq1_s", kQK_K, sizeof(BlockIQ1_S)};
const DTypeTraits kIQ1_M{"iq1_m", kQK_K, sizeof(BlockIQ1_M)};
const DTypeTraits kIQ4_XS{"iq4_xs", kQK_K, sizeof(BlockIQ4_XS)};
const DTypeTraits kMXFP4{"mxfp4", kQK4_0, sizeof(BlockMXFP4)};
}  // namespace

const DTypeTraits* FindDTypeTraits(uint32_t t) {
  switch (static_cast<DType>(t)) {
    case DType::kF32: return &kF32;
    case DType::kF16: return &kF16;
    case DType::kBF16: return &kBF16;
    case DType::kI32: return &kI32;
    case DType::kQ8_0: return &kQ8_0;
    case DType::kQ4_0: return &kQ4_0;
    case DType::kQ4_1: return &kQ4_1;
    case DType::kQ5_0: return &kQ5_0;
    case DType::kQ5_1: return &kQ5_1;
    case DType::kQ8_1: return &kQ8_1;
    case DType::kQ2_K: return &kQ2_K;
    case DType::kQ3_K: return &kQ3_K;
    case DType::kQ4_K: return &kQ4_K;
    case DType::kQ5_K: return &kQ5_K;
    case DType::kQ6_K: return &kQ6_K;
    case DType::kQ8_K: return &kQ8_K;
    case DType::kIQ4_NL: return &kIQ4_NL;
    case DType::kIQ2_XXS: return &kIQ2_XXS;
    case DType::kIQ3_XXS: return &kIQ3_XXS;
    case DType::kIQ3_S: return &kIQ3_S;
    case DType::kIQ2_XS: return &kIQ2_XS;
    case DType::kIQ2_S: return &kIQ2_S;
    case DType::kIQ1_S: return &kIQ1_S;
    case DType::kIQ1_M: return &kIQ1_M;
    case DType::kIQ4_XS: return &kIQ4_XS;
    case DType::kMXFP4: return &kMXFP4;
  }
  return nullptr;
}

const DTypeTraits& Traits(DType t) {
  const DTypeTraits* tr = FindDTypeTraits(static_cast<uint32_t>(t));
  MOE_ASSERT(tr != nullptr);
  return *tr;
}

namespace {
constexpr uint32_t kMaxTypeId = 64;  // ggml type ids are below this

std::string Lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}
}  // namespace

bool ParseDType(const char* name, DType* out) {
  const std::string s = Lower(name);
  for (uint32_t id = 0; id < kMaxTypeId; ++id) {
    const DType t = static_cast<DType>(id);
    if (IsWeightType(t) && Lower(Traits(t).name) == s) {
      *out = t;
      return true;
    }
  }
  return false;
}

std::string WeightTypeNames() {
  std::string out;
  for (uint32_t id = 0; id < kMaxTypeId; ++id) {
    const DType t = static_cast<DType>(id);
    if (!IsWeightType(t)) continue;
    if (!out.empty()) out += ", ";
    out += Traits(t).name;
  }
  return out;
}

DType VecDotType(DType w) {
  switch (w) {
    case DType::kF32: return DType::kF32;
    case DType::kF16: return DType::kF16;
    case DType::kBF16: return DType::kBF16;
    case DType::kQ8_0:
    case DType::kQ4_0:
    case DType::kQ5_0:
    case DType::kIQ4_NL:
    case DType::kMXFP4: return DType::kQ8_0;
    case DType::kQ4_1:
    case DType::kQ5_1: return DType::kQ8_1;
    case DType::kQ2_K:
    case DType::kQ3_K:
    case DType::kQ4_K:
    case DType::kQ5_K:
    case DType::kQ6_K:
    case DType::kIQ4_XS:
    case DType::kIQ2_XXS:
    case DType::kIQ3_XXS:
    case DType::kIQ3_S:
    case DType::kIQ2_XS:
    case DType::kIQ2_S:
    case DType::kIQ1_S:
    case DType::kIQ1_M: return DType::kQ8_K;
    default: MOE_ASSERT(false && "no vec-dot type");
  }
  return DType::kF32;
}

bool IsWeightType(DType t) {
  return FindDTypeTraits(static_cast<uint32_t>(t)) != nullptr && t != DType::kI32 &&
         t != DType::kQ8_1 && t != DType::kQ8_K;
}

uint32_t FileTypeOf(DType t) {
  switch (t) {
    case DType::kF16: return 1;
    case DType::kQ4_0: return 2;
    case DType::kQ4_1: return 3;
    case DType::kQ8_0: return 7;
    case DType::kQ5_0: return 8;
    case DType::kQ5_1: return 9;
    case DType::kQ2_K: return 10;
    case DType::kQ3_K: return 12;  // Q3_K_M
    case DType::kQ4_K: return 15;  // Q4_K_M
    case DType::kQ5_K: return 17;  // Q5_K_M
    case DType::kQ6_K: return 18;
    case DType::kIQ4_NL: return 25;
    case DType::kIQ2_XXS: return 19;
    case DType::kIQ3_XXS: return 23;
    case DType::kIQ3_S: return 26;
    case DType::kIQ2_XS: return 20;
    case DType::kIQ2_S: return 28;
    case DType::kIQ1_S: return 24;
    case DType::kIQ1_M: return 31;
    case DType::kIQ4_XS: return 30;
    case DType::kMXFP4: return 38;  // MXFP4_MOE
    case DType::kBF16: return 32;
    default: return 0;
  }
}

}  // namespace moe
