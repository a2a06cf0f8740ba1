#include "model/quantize.h"

#include <sys/stat.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cctype>
#include <cstdio>
#include <cstring>
#include <map>
#include <regex>

#include "formats/gguf.h"
#include "kernels/kernels.h"
#include "model/imatrix.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe {
namespace {

// llama_ftype values (general.file_type) of the mixes the rules below distinguish.
enum Ftype : uint32_t {
  kAllF32 = 0, kF16 = 1, kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 7, kQ5_0 = 8, kQ5_1 = 9, kQ2_K = 10,
  kQ3_K_S = 11, kQ3_K_M = 12, kQ3_K_L = 13, kQ4_K_S = 14, kQ4_K_M = 15, kQ5_K_S = 16,
  kQ5_K_M = 17, kQ6_K = 18, kIQ2_XXS = 19, kIQ2_XS = 20, kQ2_K_S = 21, kIQ3_XS = 22, kIQ3_XXS = 23,
  kIQ1_S = 24, kIQ4_NL = 25, kIQ3_S = 26, kIQ3_M = 27, kIQ2_S = 28, kIQ2_M = 29, kIQ4_XS = 30,
  kIQ1_M = 31, kBF16 = 32, kMXFP4_MOE = 38,
};

const QuantMix kMixes[] = {
    {"F32", kAllF32, DType::kF32, "every matrix f32"},
    {"F16", kF16, DType::kF16, "every matrix f16"},
    {"BF16", kBF16, DType::kBF16, "every matrix bf16"},
    {"Q8_0", kQ8_0, DType::kQ8_0, "8.5 bpw"},
    {"Q6_K", kQ6_K, DType::kQ6_K, "6.56 bpw"},
    {"Q5_K_M", kQ5_K_M, DType::kQ5_K, "q5_K, q6_K for half of attn_v and ffn_down"},
    {"Q5_K_S", kQ5_K_S, DType::kQ5_K, "q5_K"},
    {"Q5_1", kQ5_1, DType::kQ5_1, "6 bpw"},
    {"Q5_0", kQ5_0, DType::kQ5_0, "5.5 bpw"},
    {"Q4_K_M", kQ4_K_M, DType::kQ4_K, "q4_K, q6_K for half of attn_v and ffn_down"},
    {"Q4_K_S", kQ4_K_S, DType::kQ4_K, "q4_K, q5_K for the first attn_v and ffn_down"},
    {"IQ4_XS", kIQ4_XS, DType::kIQ4_XS, "4.25 bpw non-linear grid, q5_K for the first ffn_down"},
    {"IQ4_NL", kIQ4_NL, DType::kIQ4_NL, "4.5 bpw non-linear grid, q5_K for the first ffn_down"},
    {"MXFP4_MOE", kMXFP4_MOE, DType::kMXFP4, "experts mxfp4 (4.25 bpw), every other matrix q8_0"},
    {"Q4_1", kQ4_1, DType::kQ4_1, "5 bpw"},
    {"Q4_0", kQ4_0, DType::kQ4_0, "4.5 bpw"},
    {"Q3_K_L", kQ3_K_L, DType::kQ3_K, "q3_K, q5_K for attn_v, attn_output and ffn_down"},
    {"Q3_K_M", kQ3_K_M, DType::kQ3_K, "q3_K, q4_K/q5_K for attn_v, attn_output, ffn_down"},
    {"Q3_K_S", kQ3_K_S, DType::kQ3_K, "q3_K"},
    {"IQ3_M", kIQ3_M, DType::kIQ3_S, "iq3_s, q4_K for attn_v, attn_output and the first ffn_down"},
    {"IQ3_S", kIQ3_S, DType::kIQ3_S, "3.44 bpw codebook"},
    {"IQ3_XS", kIQ3_XS, DType::kIQ3_S, "iq3_s, iq3_xxs for the middle layers' ffn and attn_q/k"},
    {"IQ3_XXS", kIQ3_XXS, DType::kIQ3_XXS, "3.06 bpw codebook, iq2_s for attn_q/k"},
    {"Q2_K", kQ2_K, DType::kQ2_K, "q2_K, q3_K/q4_K for attn_v, attn_output and ffn_down"},
    {"Q2_K_S", kQ2_K_S, DType::kQ2_K, "q2_K, q4_K for the first ffn_down (an imatrix mix)"},
    {"IQ2_M", kIQ2_M, DType::kIQ2_S, "iq2_s, iq3_s/q4_K where it matters"},
    {"IQ2_S", kIQ2_S, DType::kIQ2_XS, "iq2_xs, iq3_s/q4_K where it matters"},
    {"IQ2_XS", kIQ2_XS, DType::kIQ2_XS, "2.31 bpw codebook, q2_K/q4_K/q5_K where it matters"},
    {"IQ2_XXS", kIQ2_XXS, DType::kIQ2_XXS, "2.06 bpw codebook, q2_K/q4_K/q5_K where it matters"},
    {"IQ1_M", kIQ1_M, DType::kIQ1_M, "1.75 bpw ternary codebook, q2_K/q4_K/q5_K/iq2_xxs where it matters"},
    {"IQ1_S", kIQ1_S, DType::kIQ1_S, "1.56 bpw ternary codebook, q2_K/q4_K/q5_K/iq2_xxs where it matters"},
};

// llama-quantize's other names, for a clear refusal.
const char* const kMixesNotYet[] = {"TQ1_0", "TQ2_0"};

std::string Upper(std::string s) {
  for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  return s;
}

bool EndsWith(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}
bool Contains(const std::string& s, const char* part) { return s.find(part) != std::string::npos; }

// llama.cpp's tensor categories, matched on names in this order.
enum class Cat { kOutput, kTokenEmbd, kAttnV, kAttnK, kAttnQ, kAttnOutput, kFfnUp, kFfnGate, kFfnDown, kOther };

Cat CategoryOf(const std::string& n) {
  if (n == "output.weight") return Cat::kOutput;
  if (n == "token_embd.weight") return Cat::kTokenEmbd;
  // Fused QKV and DeepSeek's kv_b are treated as attention V.
  if (Contains(n, "attn_qkv.weight") || Contains(n, "attn_kv_b.weight") || Contains(n, "attn_v.weight"))
    return Cat::kAttnV;
  if (Contains(n, "attn_k.weight")) return Cat::kAttnK;
  if (Contains(n, "attn_q.weight")) return Cat::kAttnQ;
  if (Contains(n, "attn_output.weight")) return Cat::kAttnOutput;
  if (Contains(n, "ffn_up")) return Cat::kFfnUp;
  if (Contains(n, "ffn_gate")) return Cat::kFfnGate;
  if (Contains(n, "ffn_down")) return Cat::kFfnDown;
  return Cat::kOther;
}

// Matrices are quantized; vectors, norms and routers are copied.
bool AllowsQuantization(const TensorView& t) {
  const std::string& n = t.name;
  return t.n_dims >= 2 && EndsWith(n, "weight") && !Contains(n, "_norm.weight") &&
         !Contains(n, "ffn_gate_inp.weight");
}

int LayerOf(const std::string& name) {
  int il = -1;
  if (std::sscanf(name.c_str(), "blk.%d.", &il) != 1) return -1;
  return il;
}

// What the rules need of the model.
struct Hparams {
  int n_layer = 0;
  uint32_t n_expert = 0;
  uint32_t n_gqa = 1;
};

Hparams ReadHparams(const GgufFile& f) {
  Hparams h;
  const std::string arch = f.GetString("general.architecture");
  h.n_layer = static_cast<int>(f.GetU32(arch + ".block_count"));
  h.n_expert = f.GetU32Opt(arch + ".expert_count").value_or(0);
  const auto heads = f.GetPerLayerOpt(arch + ".attention.head_count", h.n_layer);
  const auto kv = f.GetPerLayerOpt(arch + ".attention.head_count_kv", h.n_layer);
  if (heads && !heads->empty() && (*heads)[0] > 0) {
    const uint32_t nkv = kv && !kv->empty() && (*kv)[0] > 0 ? (*kv)[0] : (*heads)[0];
    h.n_gqa = (*heads)[0] / nkv;
  }
  return h;
}

// llama.cpp's per-mix choices (llama_tensor_get_type_impl) for the mixes above.
class TypeRules {
 public:
  TypeRules(const Hparams& h, uint32_t ftype, int n_attn_v, bool tied, bool imatrix)
      : h_(h), ftype_(ftype), n_attn_v_(n_attn_v), tied_(tied), imatrix_(imatrix) {}

  DType Choose(const TensorView& t, DType type) {
    const Cat cat = CategoryOf(t.name);
    const uint32_t ft = ftype_;
    const bool iq2_family = ft == kIQ2_XXS || ft == kIQ2_XS || ft == kIQ2_S || ft == kIQ2_M ||
                            ft == kIQ1_S || ft == kIQ1_M;
    const bool iq2_sm = ft == kIQ2_S || ft == kIQ2_M;  // these bump to iq3_s where the others use q2_K
    if (cat == Cat::kOutput || (tied_ && cat == Cat::kTokenEmbd)) {
      if (ft == kMXFP4_MOE || t.ne[0] % Traits(type).block_size != 0) return DType::kQ8_0;
      if (iq2_family || ft == kIQ3_XXS) return DType::kQ5_K;
      return type != DType::kQ8_0 ? DType::kQ6_K : type;
    }
    if (ft == kMXFP4_MOE) return t.n_dims > 2 && t.ne[2] > 1 ? DType::kMXFP4 : DType::kQ8_0;
    if (cat == Cat::kTokenEmbd) {
      return iq2_sm || ft == kIQ3_XXS ? DType::kIQ3_S : iq2_family ? DType::kQ2_K : type;
    }
    if (iq2_family) {
      const DType bump = iq2_sm ? DType::kIQ3_S : DType::kQ2_K;
      if (cat == Cat::kAttnV) {
        type = h_.n_gqa >= 4 || h_.n_expert >= 4 ? DType::kQ4_K : bump;
        ++i_attn_v_;
      } else if (h_.n_expert == 8 && cat == Cat::kAttnK) {
        type = DType::kQ4_K;
      } else if (cat == Cat::kFfnDown) {
        // (a count of ffn_down tensors here, not the layer: shared experts count too)
        if (i_ffn_down_ < h_.n_layer / 8) type = bump;
        ++i_ffn_down_;
      } else if (cat == Cat::kAttnOutput) {
        if (h_.n_expert == 8) {
          type = DType::kQ5_K;
        } else if (ft == kIQ1_S || ft == kIQ1_M) {
          type = DType::kIQ2_XXS;
        } else if (iq2_sm) {
          type = DType::kIQ3_S;
        }
      }
      return type;
    }
    if (cat == Cat::kAttnV) {
      if (ft == kQ2_K) {
        type = h_.n_gqa >= 4 ? DType::kQ4_K : DType::kQ3_K;
      } else if (ft == kQ2_K_S && h_.n_gqa >= 4) {
        type = DType::kQ4_K;
      } else if (ft == kIQ3_XXS) {
        type = h_.n_gqa >= 4 ? DType::kQ4_K : imatrix_ ? DType::kIQ3_XXS : DType::kIQ3_S;
      } else if (((ft == kIQ3_S || ft == kIQ3_XS) && h_.n_gqa >= 4) || ft == kIQ3_M) {
        type = DType::kQ4_K;
      } else if (ft == kQ3_K_M) {
        type = i_attn_v_ < 2 ? DType::kQ5_K : DType::kQ4_K;
      } else if (ft == kQ3_K_L) {
        type = DType::kQ5_K;
      } else if ((ft == kIQ4_NL || ft == kIQ4_XS) && h_.n_gqa >= 4) {
        type = DType::kQ5_K;
      } else if ((ft == kQ4_K_M || ft == kQ5_K_M) && UseMoreBits(i_attn_v_, n_attn_v_)) {
        type = DType::kQ6_K;
      } else if (ft == kQ4_K_S && i_attn_v_ < 4) {
        type = DType::kQ5_K;
      }
      if (h_.n_expert == 8) type = DType::kQ8_0;  // "trades just ~128MB" on Mixtral
      ++i_attn_v_;
      return type;
    }
    if (cat == Cat::kAttnK && h_.n_expert == 8) return DType::kQ8_0;
    if (cat == Cat::kAttnK || cat == Cat::kAttnQ) {
      return ft == kIQ3_XS ? DType::kIQ3_XXS : ft == kIQ3_XXS ? DType::kIQ2_S : type;
    }
    if (cat == Cat::kFfnDown) {
      // MoE models: the layer from the name (experts and shared experts of one layer share
      // it); dense ones count ffn_down tensors.
      int il = h_.n_expert > 1 ? LayerOf(t.name) : i_ffn_down_;
      const int n = h_.n_layer;
      if (il < 0 || il >= n) Fail("cannot determine the layer of tensor '%s'", t.name.c_str());
      if (ft == kQ2_K) {
        type = DType::kQ3_K;
      } else if (ft == kQ2_K_S) {
        if (il < n / 8) type = DType::kQ4_K;
      } else if (ft == kIQ3_XXS && !imatrix_) {
        type = il < n / 8 ? DType::kQ4_K : DType::kQ3_K;
      } else if (ft == kQ3_K_M) {
        type = il < n / 16 ? DType::kQ5_K : DType::kQ4_K;
      } else if (ft == kIQ3_M && (il < n / 8 || (h_.n_expert == 8 && UseMoreBits(il, n)))) {
        type = DType::kQ4_K;
      } else if (ft == kQ3_K_L) {
        type = DType::kQ5_K;
      } else if (ft == kQ4_K_M) {
        if (UseMoreBits(il, n)) type = DType::kQ6_K;
      } else if (il < n / 8 && (ft == kIQ4_NL || ft == kIQ4_XS) && !imatrix_) {
        type = DType::kQ5_K;
      } else if (ft == kQ5_K_M && UseMoreBits(il, n)) {
        type = DType::kQ6_K;
      } else if (ft == kQ4_K_S && il < n / 8) {
        type = DType::kQ5_K;
      } else if ((ft == kQ4_0 || ft == kQ5_0) && imatrix_ && il < n / 8) {
        type = ft == kQ4_0 ? DType::kQ4_1 : DType::kQ5_1;
      }
      ++i_ffn_down_;
      return type;
    }
    if (cat == Cat::kFfnGate || cat == Cat::kFfnUp) {
      int& counter = cat == Cat::kFfnGate ? i_ffn_gate_ : i_ffn_up_;
      const int il = h_.n_expert > 1 ? LayerOf(t.name) : counter;
      const int n = h_.n_layer;
      if (il < 0 || il >= n) Fail("cannot determine the layer of tensor '%s'", t.name.c_str());
      if (ft == kIQ3_XS && il >= n / 8 && il < 7 * n / 8) type = DType::kIQ3_XXS;
      ++counter;
      return type;
    }
    if (cat == Cat::kAttnOutput) {
      if (h_.n_expert == 8) {
        if (ft == kQ2_K || ft == kIQ3_XS || ft == kIQ3_XXS || ft == kQ3_K_S || ft == kQ3_K_M ||
            ft == kIQ4_NL || ft == kQ4_K_S || ft == kQ4_K_M || ft == kIQ3_S || ft == kIQ3_M ||
            ft == kIQ4_XS)
          type = DType::kQ5_K;
      } else if (ft == kQ2_K) {
        type = DType::kQ3_K;
      } else if (ft == kIQ3_XXS) {
        type = DType::kIQ3_S;
      } else if (ft == kQ3_K_M) {
        type = DType::kQ4_K;
      } else if (ft == kQ3_K_L) {
        type = DType::kQ5_K;
      } else if (ft == kIQ3_M) {
        type = DType::kQ4_K;
      }
      return type;
    }
    return type;
  }

 private:
  // The first and last eighth of the layers, and every third one between.
  static bool UseMoreBits(int i, int n) { return i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2; }

  Hparams h_;
  uint32_t ftype_;
  int n_attn_v_, i_attn_v_ = 0, i_ffn_down_ = 0, i_ffn_gate_ = 0, i_ffn_up_ = 0;
  bool tied_;
  bool imatrix_;  // an importance matrix is given (some mixes choose differently with one)
};

// A type whose block does not divide the rows: the 32-block type llama.cpp uses instead,
// F16 if even that does not fit.
DType Fallback(const TensorView& t, DType type) {
  if (t.ne[0] % Traits(type).block_size == 0) return type;
  switch (type) {
    case DType::kQ2_K:
    case DType::kQ3_K: type = DType::kQ4_0; break;
    case DType::kQ4_K: type = DType::kQ5_0; break;
    case DType::kQ5_K: type = DType::kQ5_1; break;
    case DType::kQ6_K: type = DType::kQ8_0; break;
    case DType::kIQ4_XS:
    case DType::kIQ2_XXS:
    case DType::kIQ2_XS:
    case DType::kIQ2_S:
    case DType::kIQ1_S:
    case DType::kIQ1_M:
    case DType::kIQ3_XXS:
    case DType::kIQ3_S: type = DType::kIQ4_NL; break;
    default: break;
  }
  return t.ne[0] % Traits(type).block_size == 0 ? type : DType::kF16;
}

bool SameFile(const std::string& a, const std::string& b) {
  struct stat sa, sb;
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev &&
         sa.st_ino == sb.st_ino;
}

std::string FormatShape(const TensorView& t) {
  std::string s = "[";
  for (int d = 0; d < t.n_dims; ++d) s += (d ? ", " : "") + std::to_string(t.ne[d]);
  return s + "]";
}

}  // namespace

const QuantMix* FindQuantMix(const std::string& name) {
  std::string u = Upper(name);
  if (u == "Q4_K" || u == "Q3_K" || u == "Q5_K") u += "_M";  // llama-quantize's aliases
  // A weight type spelt as ggml spells it ("iq2_s") means that type: the mix of that name when
  // its base is the type, else the first mix built on it (llama.cpp's IQ2_S mix is built on
  // iq2_xs, its IQ2_M on iq2_s), else a mix of that type alone (for --pure).
  DType t;
  if (ParseDType(name.c_str(), &t) && IsWeightType(t) && name == DTypeName(t)) {
    for (const QuantMix& m : kMixes)
      if (u == m.name && m.base == t) return &m;
    for (const QuantMix& m : kMixes)
      if (m.base == t) return &m;
    static std::map<DType, QuantMix> alone;
    auto it = alone.find(t);
    if (it == alone.end()) {
      it = alone.emplace(t, QuantMix{DTypeName(t), FileTypeOf(t), t, "this type alone (--pure)"}).first;
    }
    return &it->second;
  }
  for (const QuantMix& m : kMixes)
    if (u == m.name) return &m;
  return nullptr;
}

bool IsMixOfOneType(const QuantMix& mix) {
  for (const QuantMix& m : kMixes)
    if (&m == &mix) return false;
  return true;
}

std::string QuantMixNames() {
  std::string s;
  for (const QuantMix& m : kMixes) s += std::string(s.empty() ? "" : ", ") + m.name;
  return s;
}

std::vector<TensorPlan> PlanQuantization(const GgufFile& f, const QuantMix& mix, bool pure,
                                         const TypeOverrides& overrides, bool imatrix) {
  std::vector<std::pair<std::regex, DType>> patterns;
  for (const auto& [pattern, type] : overrides) {
    try {
      patterns.emplace_back(std::regex(pattern), type);
    } catch (const std::regex_error& e) {
      Fail("--tensor-type '%s': not a regular expression (%s)", pattern.c_str(), e.what());
    }
  }
  std::vector<const TensorView*> order;
  for (const GgufTensorInfo& ti : f.tensors()) order.push_back(&ti.view);
  std::stable_sort(order.begin(), order.end(), [](const TensorView* a, const TensorView* b) {
    const int la = LayerOf(a->name), lb = LayerOf(b->name);
    return la != lb ? la < lb : a->name < b->name;
  });
  int n_attn_v = 0;
  bool tied = true;
  for (const TensorView* t : order) {
    n_attn_v += CategoryOf(t->name) == Cat::kAttnV;
    tied &= CategoryOf(t->name) != Cat::kOutput;
  }
  const bool quantized_mix = Traits(mix.base).block_size > 1;
  TypeRules rules(ReadHparams(f), mix.ftype, n_attn_v, tied, imatrix);
  std::vector<TensorPlan> plan;
  for (const TensorView* t : order) {
    TensorPlan p{t->name, t->dtype, t->dtype, false};
    if (AllowsQuantization(*t)) {
      DType type = mix.base;
      if (quantized_mix) {
        // A manual type skips the rules (and their counters, as in llama.cpp).
        bool manual = false;
        for (const auto& [re, ot] : patterns) {
          if (std::regex_search(t->name, re)) {
            type = ot;
            manual = true;
            break;
          }
        }
        if (!manual && !pure) type = rules.Choose(*t, type);
        type = Fallback(*t, type);
      }
      p.to = type;
      p.quantized = type != t->dtype;
    }
    plan.push_back(p);
  }
  return plan;
}

const QuantMix& CheckQuantizeOptions(const QuantizeOptions& opt) {
  const QuantMix* mix = FindQuantMix(opt.mix);
  if (mix == nullptr) {
    const std::string u = Upper(opt.mix);
    for (const char* n : kMixesNotYet)
      if (u == n) Fail("--type %s: moe.cpp cannot write this mix yet (it writes: %s)", n, QuantMixNames().c_str());
    Fail("--type '%s' is not a quantization type (use one of: %s)", opt.mix.c_str(), QuantMixNames().c_str());
  }
  if (IsMixOfOneType(*mix) && !opt.pure)
    Fail("--type %s: moe.cpp has no llama.cpp mix built on %s yet; --pure writes every matrix in it",
         opt.mix.c_str(), mix->name);
  CheckThreadCount(opt.threads);
  return *mix;
}

QuantizeSummary QuantizeModel(const std::string& in, const std::string& out,
                              const QuantizeOptions& opt) {
  const QuantMix* mix = &CheckQuantizeOptions(opt);
  const std::unique_ptr<GgufFile> file = GgufFile::Open(in);
  const GgufFile& f = *file;
  if (SameFile(in, out)) Fail("%s: the output would replace the input; write to another file", out.c_str());

  QuantizeSummary sum;
  sum.plan = PlanQuantization(f, *mix, opt.pure, opt.overrides, opt.imatrix != nullptr);
  for (const TensorPlan& p : sum.plan) {
    if (!IsWeightType(p.to) && p.to != DType::kF32)
      Fail("tensor '%s' would be %s, which moe.cpp cannot write yet", p.name.c_str(), DTypeName(p.to));
  }

  GgufWriter w;
  for (const auto& [key, value] : f.kvs()) {
    if (key == "general.alignment") {
      w.SetAlignment(static_cast<uint32_t>(value.num.u64));
    } else if (key != "general.file_type" && key != "general.quantization_version") {
      w.SetValue(key, value);
    }
  }
  w.SetU32("general.quantization_version", 2);
  w.SetU32("general.file_type", mix->ftype);
  if (opt.imatrix) {  // the keys llama-quantize records
    w.SetString("quantize.imatrix.file", opt.imatrix_label);
    if (!opt.imatrix->datasets.empty()) w.SetString("quantize.imatrix.dataset", opt.imatrix->datasets[0]);
    w.SetI32("quantize.imatrix.entries_count", static_cast<int32_t>(opt.imatrix->entries().size()));
    w.SetI32("quantize.imatrix.chunks_count", static_cast<int32_t>(opt.imatrix->chunk_count));
  }

  ThreadPool pool(opt.threads);
  const int n_total = static_cast<int>(sum.plan.size());
  for (int i = 0; i < n_total; ++i) {
    const TensorPlan& p = sum.plan[i];
    const TensorView& t = *f.FindTensor(p.name);
    std::vector<int64_t> ne(t.ne, t.ne + t.n_dims);
    const int64_t n = t.ne[0], rows = t.NumElements() / n;
    const size_t out_bytes = RowBytes(p.to, n) * static_cast<size_t>(rows);
    sum.bytes_in += t.NumBytes();
    sum.bytes_out += out_bytes;
    sum.params += static_cast<uint64_t>(t.NumElements());
    // The importance of each matrix (expert) of the tensor, where the type's quantizer uses one.
    const int n_mat = static_cast<int>(t.ne[2]);
    std::vector<std::vector<float>> importance;
    std::string note;
    if (opt.imatrix && p.quantized) {
      if (!kernels::QuantizerUsesImportance(p.to)) {
        note = " (imatrix unused by this type)";
      } else {
        for (int e = 0; e < n_mat; ++e) {
          importance.push_back(opt.imatrix->Values(p.name, e, n_mat, n));
          if (importance.back().empty()) {
            importance.clear();
            note = " (no imatrix entry)";
            break;
          }
        }
        if (!importance.empty()) note = " (imatrix)";
      }
    }
    const std::string line =
        StrFormat("[%4d/%4d] %-36s %-22s %6s -> %-6s %9.2f MiB -> %8.2f MiB%s", i + 1, n_total,
                  p.name.c_str(), FormatShape(t).c_str(), DTypeName(p.from), DTypeName(p.to),
                  t.NumBytes() / 1048576.0, out_bytes / 1048576.0, note.c_str());
    const int64_t rows_per_mat = t.ne[1];
    w.AddTensorDeferred(p.name, p.to, ne, [&pool, &t, p, n, rows, line, &opt, importance = std::move(importance),
                                           rows_per_mat](uint8_t* dst) {
      if (!p.quantized) {
        std::memcpy(dst, t.data, t.NumBytes());
      } else {
        const size_t rb = RowBytes(p.to, n);
        // Rows are independent: quantized in parallel, each thread with its own f32 row. A
        // non-finite weight is an error (ggml's quantizers would store garbage scales); worker
        // threads must not throw, so the first bad row is recorded and reported after.
        std::atomic<int64_t> bad_row{rows};
        pool.ParallelFor(rows, std::max<int64_t>(1, 65536 / n), [&](int64_t r0, int64_t r1, int) {
          std::vector<float> row(static_cast<size_t>(n));
          for (int64_t r = r0; r < r1; ++r) {
            kernels::DequantizeRow(t.dtype, t.Row(r), row.data(), n);
            if (!std::all_of(row.begin(), row.end(), [](float v) { return std::isfinite(v); })) {
              int64_t cur = bad_row.load();
              while (r < cur && !bad_row.compare_exchange_weak(cur, r)) {
              }
              continue;
            }
            const float* imp = importance.empty() ? nullptr : importance[r / rows_per_mat % importance.size()].data();
            kernels::QuantizeRow(p.to, row.data(), dst + static_cast<size_t>(r) * rb, n, imp);
          }
        });
        if (bad_row.load() < rows)
          Fail("tensor '%s' row %lld has a non-finite weight (NaN or Inf); nothing was written",
               p.name.c_str(), static_cast<long long>(bad_row.load()));
      }
      if (opt.progress) opt.progress(line);
    });
  }
  w.Write(out);
  return sum;
}

}  // namespace moe
