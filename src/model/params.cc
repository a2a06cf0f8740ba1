#include "model/params.h"

#include <algorithm>
#include <cstdio>
#include <type_traits>

#include "kernels/kernels.h"
#include "model/model.h"
#include "tokenizer/tokenizer.h"
#include "util/error.h"

namespace moe {

namespace {

// The tensors of a store: ExpectedTensors minus what the store has no array for (the optional
// router of hash routing, the output when tied, the Q/K/V biases when absent).
std::vector<TensorSpec> StoreSpecs(const ModelConfig& c, bool tied_output, bool qkv_bias) {
  if (c.is_mla() && c.mla_kv_b_legacy)
    Fail("training a %s file in the legacy attn_kv_b layout is not supported: start from a file with "
         "attn_k_b / attn_v_b (moe init writes them)", c.arch_name.c_str());
  if (c.rope_scaling != RopeScalingType::kNone || c.rope_attn_factor != 1.0f)
    Fail("training with RoPE scaling (rope.scaling.type) is not supported yet: the trainer rotates with "
         "the unscaled angles");
  std::vector<TensorSpec> out;
  for (TensorSpec& s : ExpectedTensors(c, !tied_output, qkv_bias)) {
    if (s.role == TensorRole::kRouter && c.router_kind == MoeRouterKind::kHash) continue;
    if (s.name == "output.weight" && tied_output) continue;
    out.push_back(std::move(s));
  }
  return out;
}

// The array of tensor `name` in a store (params or grads); nullptr when the store has none
// (exp_probs_b in gradients).
template <typename T, typename Layer>
std::vector<T>* Resolve(ModelArrays<T, Layer>& a, const std::string& name) {
  if (name == "token_embd.weight") return &a.token_embd;
  if (name == "output_norm.weight") return &a.output_norm;
  if (name == "output.weight") return &a.output;
  unsigned il = 0;
  int used = 0;
  if (std::sscanf(name.c_str(), "blk.%u.%n", &il, &used) != 1 || used == 0 || il >= a.layers.size())
    Fail("the parameter store has no tensor '%s'", name.c_str());
  Layer& L = a.layers[il];
  const std::string s = name.substr(static_cast<size_t>(used));
  if (s == "attn_norm.weight") return &L.attn_norm;
  if (s == "attn_q.weight") return &L.wq;
  if (s == "attn_k.weight") return &L.wk;
  if (s == "attn_v.weight") return &L.wv;
  if (s == "attn_q.bias") return &L.bq;
  if (s == "attn_k.bias") return &L.bk;
  if (s == "attn_v.bias") return &L.bv;
  if (s == "attn_output.weight") return &L.wo;
  if (s == "attn_q_norm.weight") return &L.q_norm;
  if (s == "attn_k_norm.weight") return &L.k_norm;
  if (s == "ffn_norm.weight") return &L.ffn_norm;
  if (s == "attn_q_a.weight") return &L.wq_a;
  if (s == "attn_q_a_norm.weight") return &L.q_a_norm;
  if (s == "attn_q_b.weight") return &L.wq_b;
  if (s == "attn_kv_a_mqa.weight") return &L.wkv_a;
  if (s == "attn_kv_a_norm.weight") return &L.kv_a_norm;
  if (s == "attn_k_b.weight") return &L.wk_b;
  if (s == "attn_v_b.weight") return &L.wv_b;
  if (s == "ffn_gate.weight") return &L.ffn_gate;
  if (s == "ffn_up.weight") return &L.ffn_up;
  if (s == "ffn_down.weight") return &L.ffn_down;
  if (s == "ffn_gate_inp.weight") return &L.moe.router;
  if (s == "ffn_gate_exps.weight") return &L.moe.gate_exps;
  if (s == "ffn_up_exps.weight") return &L.moe.up_exps;
  if (s == "ffn_down_exps.weight") return &L.moe.down_exps;
  if (s == "ffn_gate_inp_shexp.weight") return &L.moe.gate_inp_shexp;
  if (s == "ffn_gate_shexp.weight") return &L.moe.gate_shexp;
  if (s == "ffn_up_shexp.weight") return &L.moe.up_shexp;
  if (s == "ffn_down_shexp.weight") return &L.moe.down_shexp;
  if (s == "ffn_zc_mix.weight") return &L.moe.const_wc;
  if (s == "ffn_zc_const.weight") return &L.moe.const_v;
  if (s == "ffn_gate_res.weight") return &L.moe.gate_res;
  if (s == "exp_probs_b.bias") {
    if constexpr (std::is_same_v<Layer, LayerParams<T>>) return &L.moe.exp_probs_b;
    return nullptr;
  }
  Fail("the parameter store has no tensor '%s'", name.c_str());
}

int64_t Count(const std::vector<int64_t>& ne) {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  return n;
}

bool KeepsF32(TensorRole r) {
  return r == TensorRole::kNorm || r == TensorRole::kBias || r == TensorRole::kRouter ||
         r == TensorRole::kGate || r == TensorRole::kRouterAux;
}

}  // namespace

template <typename T>
void ModelGrads<T>::Zero() {
  auto zero = [](std::vector<T>& v) { std::fill(v.begin(), v.end(), T(0)); };
  zero(this->token_embd);
  zero(this->output_norm);
  zero(this->output);
  for (LayerGrads<T>& L : this->layers) {
    for (auto* v : {&L.attn_norm, &L.wq, &L.wk, &L.wv, &L.bq, &L.bk, &L.bv, &L.wo, &L.q_norm,
                    &L.k_norm, &L.ffn_norm, &L.wq_a, &L.q_a_norm, &L.wq_b, &L.wkv_a, &L.kv_a_norm,
                    &L.wk_b, &L.wv_b, &L.ffn_gate, &L.ffn_up, &L.ffn_down})
      zero(*v);
    L.moe.Zero();
  }
}

template <typename T>
MoeLayerConfig ModelParams<T>::LayerMoe(int il) const {
  MoeLayerConfig m = config.moe;
  if (il == 0) m.gating_residual = false;
  return m;
}

template <typename T>
void ModelParams<T>::Allocate() {
  ApplyArchTraits(config);
  this->layers.assign(config.n_layer, LayerParams<T>());
  for (uint32_t il = 0; il < config.n_layer; ++il)
    if (config.IsMoeLayer(il)) this->layers[il].moe.Resize(LayerMoe(static_cast<int>(il)));
  for (const TensorSpec& s : StoreSpecs(config, tied_output, qkv_bias)) {
    std::vector<T>* v = Resolve(*this, s.name);
    v->assign(static_cast<size_t>(Count(s.ne)), T(0));
  }
}

template <typename T>
ModelGrads<T> ModelParams<T>::NewGrads() const {
  ModelGrads<T> g;
  g.layers.resize(config.n_layer);
  for (uint32_t il = 0; il < config.n_layer; ++il)
    if (config.IsMoeLayer(il)) g.layers[il].moe.Resize(LayerMoe(static_cast<int>(il)));
  for (const TensorSpec& s : StoreSpecs(config, tied_output, qkv_bias)) {
    if (std::vector<T>* v = Resolve(g, s.name)) v->assign(static_cast<size_t>(Count(s.ne)), T(0));
  }
  return g;
}

template <typename T>
std::vector<NamedArray<T>> NamedTensors(ModelParams<T>& p) {
  std::vector<NamedArray<T>> out;
  for (TensorSpec& s : StoreSpecs(p.config, p.tied_output, p.qkv_bias)) {
    std::vector<T>* v = Resolve(p, s.name);
    MOE_ASSERT(static_cast<int64_t>(v->size()) == Count(s.ne));
    out.push_back({std::move(s.name), std::move(s.ne), s.role, v});
  }
  return out;
}

template <typename T>
std::vector<NamedArray<T>> NamedTensors(const ModelParams<T>& p, ModelGrads<T>& g) {
  std::vector<NamedArray<T>> out;
  for (TensorSpec& s : StoreSpecs(p.config, p.tied_output, p.qkv_bias)) {
    std::vector<T>* v = Resolve(g, s.name);
    if (v == nullptr) continue;
    MOE_ASSERT(static_cast<int64_t>(v->size()) == Count(s.ne));
    out.push_back({std::move(s.name), std::move(s.ne), s.role, v});
  }
  return out;
}

template <typename T>
ModelParams<T> LoadParams(const std::string& path, bool allow_training_only) {
  std::shared_ptr<const GgufFile> file = GgufFile::Open(path);
  return LoadParamsFrom<T>(file, allow_training_only, nullptr);
}

template <typename T>
ModelParams<T> LoadParamsFrom(std::shared_ptr<const GgufFile> file, bool allow_training_only,
                              const std::function<bool(const std::string&)>& extra_ok) {
  const GgufFile& f = *file;
  ModelParams<T> p;
  p.config = ReadConfig(f, allow_training_only);
  ValidateModelTensors(f, p.config, extra_ok);
  p.tied_output = f.FindTensor("output.weight") == nullptr;
  p.qkv_bias = f.FindTensor("blk.0.attn_q.bias") != nullptr;
  p.Allocate();
  std::vector<float> row;
  for (const NamedArray<T>& a : NamedTensors(p)) {
    const TensorView* t = f.FindTensor(a.name);
    MOE_ASSERT(t != nullptr);  // ValidateModelTensors checked presence and shape
    const int64_t n = t->ne[0], rows = t->NumElements() / n;
    row.resize(n);
    for (int64_t r = 0; r < rows; ++r) {
      kernels::DequantizeRow(t->dtype, t->Row(r), row.data(), n);
      std::copy(row.begin(), row.end(), a.data->begin() + r * n);
    }
  }
  if (p.config.n_vocab != static_cast<uint32_t>(p.token_embd.size() / p.config.n_embd))
    f.Throw("the vocabulary does not match token_embd.weight");
  p.source = std::move(file);
  return p;
}

void SaveParams(const ModelParams<float>& p, const std::string& path, DType type,
                const std::function<void(GgufWriter&)>& extra) {
  GgufWriter w;
  std::string name = "moe.cpp model";
  if (p.source) name = p.source->GetStringOpt("general.name").value_or(name);
  w.SetString("general.name", name);
  WriteConfig(p.config, w);
  w.SetU32("general.file_type", FileTypeOf(type));
  w.SetU32("general.quantization_version", 2);
  if (p.source && p.source->Has("tokenizer.ggml.model")) {
    CopyTokenizerKeys(*p.source, w);
  } else {
    w.SetString("tokenizer.ggml.model", "none");
  }
  auto& mp = const_cast<ModelParams<float>&>(p);  // NamedTensors hands out mutable arrays; we only read
  std::vector<uint8_t> bytes;
  for (const NamedArray<float>& a : NamedTensors(mp)) {
    const DType t = KeepsF32(a.role) ? DType::kF32 : type;
    const int64_t n = a.ne[0], rows = static_cast<int64_t>(a.data->size()) / n;
    if (n % Traits(t).block_size != 0)
      Fail("cannot write tensor '%s' as %s: its rows of %lld values are not whole blocks of %lld",
           a.name.c_str(), DTypeName(t), static_cast<long long>(n), static_cast<long long>(Traits(t).block_size));
    const size_t rb = RowBytes(t, n);
    bytes.resize(rb * rows);
    for (int64_t r = 0; r < rows; ++r) kernels::QuantizeRow(t, a.data->data() + r * n, bytes.data() + r * rb, n);
    w.AddTensor(a.name, t, a.ne, bytes.data(), bytes.size());
  }
  if (extra) extra(w);
  w.Write(path);
}

template struct ModelGrads<float>;
template struct ModelGrads<double>;
template struct ModelParams<float>;
template struct ModelParams<double>;
template std::vector<NamedArray<float>> NamedTensors(ModelParams<float>&);
template std::vector<NamedArray<double>> NamedTensors(ModelParams<double>&);
template std::vector<NamedArray<float>> NamedTensors(const ModelParams<float>&, ModelGrads<float>&);
template std::vector<NamedArray<double>> NamedTensors(const ModelParams<double>&, ModelGrads<double>&);
template ModelParams<float> LoadParams(const std::string&, bool);
template ModelParams<double> LoadParams(const std::string&, bool);
template ModelParams<float> LoadParamsFrom(std::shared_ptr<const GgufFile>, bool,
                                          const std::function<bool(const std::string&)>&);
template ModelParams<double> LoadParamsFrom(std::shared_ptr<const GgufFile>, bool,
                                           const std::function<bool(const std::string&)>&);

}  // namespace moe
