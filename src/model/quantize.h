// Model quantization: llama.cpp's named mixes ("file types": Q4_K_M, Q3_K_S, ...) and the rules
// that pick each tensor's type, applied to any GGUF model, and the converter `moe quantize` runs.
//
// The rules are llama.cpp's (llama-quant.cpp of the pinned release, as facts): a mix has a
// default type; matrices (2+ dimensions, names ending in "weight", not norms, not routers) get
// it, except where the mix bumps a tensor category (attention V / K / output, FFN down, the
// output matrix) by layer position, expert count (the "8-expert rule") and GQA ratio; a type
// whose block does not divide the rows falls back to a 32-block type (q4_K -> q5_0, ...), then to
// F16. With the same mix, moe.cpp and llama.cpp choose the same type for every tensor, and
// since the quantizers are ggml's reference quantizers the tensor bytes are the same too
// (tests/conformance/quantize_oracle.py checks both against llama_model_quantize).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "tensor/dtype.h"

namespace moe {

class GgufFile;
class Imatrix;

struct QuantMix {
  const char* name;   // "Q4_K_M"
  uint32_t ftype;     // general.file_type (llama_ftype)
  DType base;         // the mix's default type
  const char* about;  // one line for --help
};

// The named mixes moe quantize knows (llama-quantize's names, case-insensitive; "Q4_K" means
// Q4_K_M as there), or a weight type in ggml's spelling ("q4_K", "iq2_s": the mix built on that
// type; a type without one gives a mix of it alone, for --pure). Null if unknown.
const QuantMix* FindQuantMix(const std::string& name);
// Whether mix is such a one-type mix (it has no llama.cpp rules: --pure only).
bool IsMixOfOneType(const QuantMix& mix);
// "Q2_K, Q3_K_S, ..." for messages and help.
std::string QuantMixNames();

// The type of every tensor of `f` under `mix` (pure: every quantizable matrix in the base
// type, only the block-size fallback applies). Tensors are listed in llama.cpp's output order
// (non-layer tensors first, then by layer; by name within each).
struct TensorPlan {
  std::string name;
  DType from, to;
  bool quantized;  // false: copied as it is (norms, routers, 1-D tensors)
};
// overrides: (regular expression, type) pairs as llama-quantize's --tensor-type: the first
// pattern found in a quantizable tensor's name sets its type instead of the mix's rules (the
// block-size fallback still applies). imatrix: whether an importance matrix will weight the
// quantization (IQ3_XXS, IQ4_NL/XS, Q4_0/Q5_0 choose some tensors' types differently then).
using TypeOverrides = std::vector<std::pair<std::string, DType>>;
std::vector<TensorPlan> PlanQuantization(const GgufFile& f, const QuantMix& mix, bool pure,
                                         const TypeOverrides& overrides = {}, bool imatrix = false);

struct QuantizeOptions {
  std::string mix = "Q4_K_M";
  bool pure = false;
  TypeOverrides overrides;
  int threads = 0;  // 0: every available CPU
  // Importance matrix (model/imatrix.h): weights each column's error in the quantizers that
  // take one (kernels::QuantizerUsesImportance) and switches the mixes' imatrix rules on.
  const Imatrix* imatrix = nullptr;
  std::string imatrix_label;  // where it came from, recorded as quantize.imatrix.file
  // One line per tensor as it is written ("[  3/ 27] blk.0.attn_v.weight  f32 -> q6_K ...").
  std::function<void(const std::string&)> progress;
};

struct QuantizeSummary {
  uint64_t bytes_in = 0, bytes_out = 0;
  uint64_t params = 0;  // elements of all tensors
  std::vector<TensorPlan> plan;
};

// The mix opt names, after checking the options that need no file (the mix, --pure, the thread
// count); throws moe::Error naming the problem. QuantizeModel checks them too; callers that do
// expensive work first (gathering an importance matrix) call it before.
const QuantMix& CheckQuantizeOptions(const QuantizeOptions& opt);

// Reads `in`, writes `out` (atomically: a failure leaves any old `out` as it was). Throws
// moe::Error naming the problem (unknown mix, a type moe.cpp cannot write yet and the tensor
// that needs it, out == in, ...).
QuantizeSummary QuantizeModel(const std::string& in, const std::string& out,
                              const QuantizeOptions& opt);

}  // namespace moe
