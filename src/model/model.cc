#include "model/model.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <unordered_set>

#include "kernels/kernels.h"
#include "kernels/ref/quant_ref.h"
#include "util/error.h"
#include "util/memory.h"

namespace moe {

void ValidateModelTensors(const GgufFile& f, const ModelConfig& c,
                          const std::function<bool(const std::string&)>& extra_ok) {
  const bool has_output = f.FindTensor("output.weight") != nullptr;
  const bool has_bias = f.FindTensor("blk.0.attn_q.bias") != nullptr;
  std::vector<TensorSpec> specs = ExpectedTensors(c, has_output, has_bias);
  std::unordered_set<std::string> known;
  for (const TensorSpec& s : specs) {
    known.insert(s.name);
    const TensorView* t = f.FindTensor(s.name);
    if (!t) {
      if (s.optional) continue;
      f.Throw("missing tensor '" + s.name + "' required by architecture " + c.arch_name);
    }
    bool shape_ok = t->n_dims == static_cast<int>(s.ne.size());
    for (size_t d = 0; shape_ok && d < s.ne.size(); ++d) shape_ok = t->ne[d] == s.ne[d];
    if (!shape_ok)
      f.Throw("tensor '" + s.name + "' has shape " + ShapeString(t->ne, t->n_dims) +
              " but the hyper-parameters need " + ShapeString(s.ne.data(), static_cast<int>(s.ne.size())));
    const bool vector = s.role == TensorRole::kNorm || s.role == TensorRole::kBias ||
                        s.role == TensorRole::kGate || s.role == TensorRole::kRouterAux;
    if (vector ? t->dtype != DType::kF32 : !IsWeightType(t->dtype))
      f.Throw(StrFormat("tensor '%s' has type %s, which moe.cpp does not support here%s",
                        s.name.c_str(), DTypeName(t->dtype), vector ? " (norms, biases, gates and the router's small matrices must be f32)" : ""));
  }
  for (const GgufTensorInfo& ti : f.tensors()) {
    if (!known.count(ti.view.name) && !(extra_ok && extra_ok(ti.view.name)))
      f.Throw("tensor '" + ti.view.name + "' is not used by architecture " + c.arch_name +
              " (llama.cpp rejects such files too)");
  }
}

std::unique_ptr<Model> Model::Load(const std::string& path, bool allow_training_only) {
  auto m = std::unique_ptr<Model>(new Model());
  m->file_ = GgufFile::Open(path);
  const GgufFile& f = *m->file_;
  m->config_ = ReadConfig(f, allow_training_only);
  ModelConfig& c = m->config_;
  if (f.alignment() < 4)  // tensors are read in place as floats and f16-scaled blocks
    f.Throw(StrFormat("general.alignment %llu: moe.cpp reads tensors in place and needs them 4-byte "
                      "aligned (write the file with the default alignment, 32)",
                      static_cast<unsigned long long>(f.alignment())));

  ValidateModelTensors(f, c);
  m->Bind([&](const std::string& name) { return f.FindTensor(name); });
  m->SplitKvB([&](const std::string& name) { return f.FindTensor(name); });
  if (c.n_vocab != m->token_embd->ne[1])
    f.Throw(StrFormat("vocabulary has %u tokens but token_embd.weight has %lld rows", c.n_vocab,
                      static_cast<long long>(m->token_embd->ne[1])));
  m->tokenizer_ = Tokenizer::FromGguf(f, c.n_vocab);
  return m;
}

std::unique_ptr<Model> Model::FromParams(const ModelParams<float>& p, bool allow_training_only) {
  auto m = std::unique_ptr<Model>(new Model());
  GgufWriter w;
  WriteConfig(p.config, w);
  if (p.source && p.source->Has("tokenizer.ggml.model")) {
    CopyTokenizerKeys(*p.source, w);
  } else {
    w.SetString("tokenizer.ggml.model", "none");
  }
  m->meta_ = w.Serialize();
  m->file_ = GgufFile::FromMemory(m->meta_.data(), m->meta_.size(), "<in-memory model>");
  m->config_ = ReadConfig(*m->file_, allow_training_only);
  auto& mp = const_cast<ModelParams<float>&>(p);  // views only read the arrays
  for (const NamedArray<float>& a : NamedTensors(mp)) {
    TensorView v;
    v.name = a.name;
    v.dtype = DType::kF32;
    v.n_dims = static_cast<int>(a.ne.size());
    for (int d = 0; d < v.n_dims; ++d) v.ne[d] = a.ne[d];
    v.data = a.data->data();
    m->owned_views_.push_back(v);
  }
  const auto find = [&](const std::string& name) -> const TensorView* {
    for (const TensorView& v : m->owned_views_)
      if (v.name == name) return &v;
    return nullptr;
  };
  m->Bind(find);
  m->SplitKvB(find);
  m->tokenizer_ = Tokenizer::FromGguf(*m->file_, m->config_.n_vocab);
  return m;
}

void Model::Bind(const std::function<const TensorView*(const std::string&)>& get) {
  const ModelConfig& c = config_;
  token_embd = get("token_embd.weight");
  output_norm = get("output_norm.weight");
  const TensorView* out = get("output.weight");
  output = out ? out : token_embd;
  layers.assign(c.n_layer, LayerWeights());
  for (uint32_t i = 0; i < c.n_layer; ++i) {
    const std::string p = "blk." + std::to_string(i) + ".";
    LayerWeights& L = layers[i];
    L.attn_norm = get(p + "attn_norm.weight");
    L.wq = get(p + "attn_q.weight");
    L.wk = get(p + "attn_k.weight");
    L.wv = get(p + "attn_v.weight");
    L.bq = get(p + "attn_q.bias");
    L.bk = get(p + "attn_k.bias");
    L.bv = get(p + "attn_v.bias");
    L.wo = get(p + "attn_output.weight");
    L.q_norm = get(p + "attn_q_norm.weight");
    L.k_norm = get(p + "attn_k_norm.weight");
    L.ffn_norm = get(p + "ffn_norm.weight");
    L.wq_a = get(p + "attn_q_a.weight");
    L.q_a_norm = get(p + "attn_q_a_norm.weight");
    L.wq_b = get(p + "attn_q_b.weight");
    L.wkv_a = get(p + "attn_kv_a_mqa.weight");
    L.kv_a_norm = get(p + "attn_kv_a_norm.weight");
    L.wk_b = get(p + "attn_k_b.weight");
    L.wv_b = get(p + "attn_v_b.weight");
    L.ffn_gate = get(p + "ffn_gate.weight");
    L.ffn_up = get(p + "ffn_up.weight");
    L.ffn_down = get(p + "ffn_down.weight");
    // hash routing reads no router logits, so a present ffn_gate_inp is ignored.
    L.gate_inp = c.router_kind == MoeRouterKind::kHash ? nullptr : get(p + "ffn_gate_inp.weight");
    L.exp_probs_b = get(p + "exp_probs_b.bias");
    L.zc_mix = get(p + "ffn_zc_mix.weight");
    L.zc_const = get(p + "ffn_zc_const.weight");
    L.gate_res = get(p + "ffn_gate_res.weight");
    L.gate_exps = get(p + "ffn_gate_exps.weight");
    L.up_exps = get(p + "ffn_up_exps.weight");
    L.down_exps = get(p + "ffn_down_exps.weight");
    L.gate_inp_shexp = get(p + "ffn_gate_inp_shexp.weight");
    L.gate_shexp = get(p + "ffn_gate_shexp.weight");
    L.up_shexp = get(p + "ffn_up_shexp.weight");
    L.down_shexp = get(p + "ffn_down_shexp.weight");
  }
}

void Model::SplitKvB(const std::function<const TensorView*(const std::string&)>& get) {
  const ModelConfig& c = config_;
  if (!c.is_mla() || !c.mla_kv_b_legacy) return;
  const int64_t H = c.n_head, Dn = c.qk_nope(), Dv = c.n_embd_head_v, Kr = c.n_lora_kv;
  std::vector<float> row(static_cast<size_t>(Kr));
  for (uint32_t i = 0; i < c.n_layer; ++i) {
    const TensorView& kvb = *get("blk." + std::to_string(i) + ".attn_kv_b.weight");
    std::vector<float>& kb = derived_.emplace_back(static_cast<size_t>(H * Kr * Dn));  // [H][Kr][Dn]
    std::vector<float>& vb = derived_.emplace_back(static_cast<size_t>(H * Dv * Kr));  // [H][Dv][Kr]
    for (int64_t h = 0; h < H; ++h) {
      for (int64_t j = 0; j < Dn + Dv; ++j) {  // head h's rows: Dn of K, then Dv of V
        kernels::DequantizeRow(kvb.dtype, kvb.Row(h * (Dn + Dv) + j), row.data(), Kr);
        if (j < Dn) {
          for (int64_t r = 0; r < Kr; ++r) kb[static_cast<size_t>((h * Kr + r) * Dn + j)] = row[r];
        } else {
          std::copy(row.begin(), row.end(), vb.begin() + (h * Dv + j - Dn) * Kr);
        }
      }
    }
    const auto view = [&](const std::string& name, const std::vector<float>& a, int64_t ne0, int64_t ne1) {
      TensorView v;
      v.name = "blk." + std::to_string(i) + "." + name + " (from attn_kv_b)";
      v.dtype = DType::kF32;
      v.n_dims = 3;
      v.ne[0] = ne0;
      v.ne[1] = ne1;
      v.ne[2] = H;
      v.data = a.data();
      return &derived_views_.emplace_back(std::move(v));
    };
    layers[i].wk_b = view("attn_k_b", kb, Dn, Kr);
    layers[i].wv_b = view("attn_v_b", vb, Kr, Dv);
  }
}

// The first block with routed experts (deepseek2's leading blocks are dense).
static const LayerWeights& FirstMoeLayer(const std::vector<LayerWeights>& layers, const ModelConfig& c) {
  return layers[std::min<size_t>(c.n_layer_dense_lead, layers.size() - 1)];
}

uint64_t Model::BytesPerExpert() const {
  const LayerWeights& L = FirstMoeLayer(layers, config_);
  return (L.gate_exps->NumBytes() + L.up_exps->NumBytes() + L.down_exps->NumBytes()) /
         config_.n_expert;
}

// What one token's forward pass touches: the dense tensors of every layer (each read once), the
// routed experts' three tensors (k of n_expert read), and the head: dense(tensor) for each
// tensor read whole, experts(gate, up, down) for each MoE layer's routed experts.
template <class Dense, class Experts>
static void ForEachTokenTensor(const Model& m, const Dense& dense_fn, const Experts& experts_fn) {
  dense_fn(*m.output);
  dense_fn(*m.output_norm);
  for (const LayerWeights& L : m.layers) {
    const TensorView* dense[] = {L.attn_norm, L.wq, L.wk, L.wv, L.bq, L.bk, L.bv, L.wo,
                                 L.q_norm, L.k_norm, L.wq_a, L.q_a_norm, L.wq_b, L.wkv_a,
                                 L.kv_a_norm, L.wk_b, L.wv_b, L.ffn_gate, L.ffn_up, L.ffn_down,
                                 L.ffn_norm, L.gate_inp, L.exp_probs_b, L.zc_mix,
                                 L.zc_const, L.gate_res, L.gate_inp_shexp,
                                 L.gate_shexp, L.up_shexp, L.down_shexp};
    for (const TensorView* t : dense)
      if (t) dense_fn(*t);
    if (L.gate_exps) experts_fn(*L.gate_exps, *L.up_exps, *L.down_exps);
  }
}

uint64_t Model::BytesPerToken() const {
  uint64_t total = token_embd->RowBytes();
  ForEachTokenTensor(
      *this, [&](const TensorView& t) { total += t.NumBytes(); },
      [&](const TensorView& g, const TensorView& u, const TensorView& d) {
        total += (g.NumBytes() + u.NumBytes() + d.NumBytes()) / config_.n_expert * config_.n_expert_used;
      });
  return total;
}

uint64_t Model::MacsPerToken() const {
  uint64_t total = 0;
  ForEachTokenTensor(
      *this, [&](const TensorView& t) { total += t.n_dims >= 2 ? static_cast<uint64_t>(t.NumElements()) : 0; },
      [&](const TensorView& g, const TensorView& u, const TensorView& d) {
        total += static_cast<uint64_t>(g.NumElements() + u.NumElements() + d.NumElements()) / config_.n_expert *
                 config_.n_expert_used;
      });
  return total;
}

Model::~Model() = default;

// n q5_0 blocks as q8_0 blocks: the same scale, quants q - 16 (exact).
static void Q5_0ToQ8_0(const uint8_t* src, uint8_t* dst, size_t n) {
  const auto* x = reinterpret_cast<const BlockQ5_0*>(src);
  auto* y = reinterpret_cast<BlockQ8_0*>(dst);
  for (size_t b = 0; b < n; ++b) {
    y[b].d = x[b].d;
    for (int j = 0; j < kQK8_0; ++j) y[b].qs[j] = static_cast<int8_t>(kernels::ref::Q5Level(x[b].qs, x[b].qh, j) - 16);
  }
}

uint64_t Model::RepackForInference(ThreadPool& pool) {
  if (const char* off = std::getenv("MOE_NO_REPACK"); off && std::strcmp(off, "0") != 0) return 0;
  uint64_t total = 0;
  // Repacks *slot (each 2-D matrix, or each expert of a 3-D tensor) and points it at the copy.
  const auto repack = [&](const TensorView*& slot) {
    if (!slot || slot == token_embd || slot->layout != WeightLayout::kRows) return;
    const TensorView& t = *slot;
    const int64_t rows = t.ne[1];
    // q5_0 is q8_0 with 5-bit quants: the same blocks of 32 with an f16 scale and the same q8_0
    // activations, so its quants q - 16 widen to int8 exactly and the matrix takes q8_0's tiles,
    // with the same integer block products (12 more bytes per block of 22; llama.cpp's mixes put
    // q5_0 only where rows are not whole k-quant super-blocks, such as deepseek2's attn_k_b).
    const DType to = t.dtype == DType::kQ5_0 ? DType::kQ8_0 : t.dtype;
    const WeightLayout layout = kernels::RepackLayout(to, t.ne[0], rows);
    if (layout == WeightLayout::kRows) return;
    const size_t src_row = t.RowBytes(), row = RowBytes(to, t.ne[0]);
    const size_t n_slabs = static_cast<size_t>(t.ne[2] * t.ne[3]);
    const size_t bytes = row * static_cast<size_t>(rows) * n_slabs, slab = row * static_cast<size_t>(rows);
    // Anonymous pages (huge pages where the kernel gives them: fewer faults). On these VMs the
    // first touch of fresh memory, not the copy, is most of the repacking time.
    HugePageBuffer buf;
    try {
      buf = HugePageBuffer(bytes);
    } catch (const Error&) {
      throw Error(StrFormat("out of memory repacking %s (%zu bytes)", t.name.c_str(), bytes));
    }
    PopulatePages(buf.data(), bytes);  // in one call: a first-touch fault per page cost ~10 us on the VM
    uint8_t* dst = buf.data();
    repacked_.push_back(std::move(buf));
    // Work items of whole tiles (16 rows): the tiles of a slab are independent.
    const int64_t slabs = static_cast<int64_t>(bytes / slab), chunk = 256;
    const int64_t per_slab = (rows + chunk - 1) / chunk;
    const auto* src = static_cast<const uint8_t*>(t.data);
    pool.ParallelFor(slabs * per_slab, 1, [&](int64_t b, int64_t e, int) {
      std::vector<uint8_t> widened;  // q5_0 rows as q8_0
      for (int64_t i = b; i < e; ++i) {
        const int64_t r0 = (i % per_slab) * chunk, n = std::min(chunk, rows - r0);
        const size_t first = static_cast<size_t>(i / per_slab) * static_cast<size_t>(rows) + static_cast<size_t>(r0);
        const uint8_t* from = src + first * src_row;
        if (to != t.dtype) {
          widened.resize(static_cast<size_t>(n) * row);
          Q5_0ToQ8_0(from, widened.data(), static_cast<size_t>(n) * static_cast<size_t>(t.ne[0] / kQK8_0));
          from = widened.data();
        }
        kernels::Repack(to, layout, from, dst + first * row, t.ne[0], n);
      }
    });
    file_->ReleasePages(t.data, t.NumBytes());
    TensorView v = t;
    v.dtype = to;
    v.data = dst;
    v.layout = layout;
    repacked_views_.push_back(v);
    slot = &repacked_views_.back();
    total += bytes;
  };
  for (LayerWeights& L : layers) {
    for (const TensorView** w : {&L.wq, &L.wk, &L.wv, &L.wo, &L.wq_a, &L.wq_b, &L.wkv_a, &L.wk_b, &L.wv_b,
                                 &L.ffn_gate, &L.ffn_up, &L.ffn_down, &L.gate_exps, &L.up_exps,
                                 &L.down_exps, &L.gate_shexp, &L.up_shexp, &L.down_shexp}) {
      repack(*w);
    }
  }
  repack(output);
  return total;
}

}  // namespace moe
