#include "train/upcycle.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <numeric>
#include <random>

#include "kernels/kernels.h"
#include "util/error.h"

namespace moe {

namespace {

// The dense tensor `name` dequantized to float, checked against its expected shape.
std::vector<float> Read(const GgufFile& f, const std::string& name, const std::vector<int64_t>& ne) {
  const TensorView* t = f.FindTensor(name);
  if (!t) f.Throw("missing tensor '" + name + "' of a dense model");
  bool ok = t->n_dims == static_cast<int>(ne.size());
  for (size_t d = 0; ok && d < ne.size(); ++d) ok = t->ne[d] == ne[d];
  if (!ok) f.Throw("tensor '" + name + "' has shape " + ShapeString(t->ne, t->n_dims) + ", expected " +
                   ShapeString(ne.data(), static_cast<int>(ne.size())));
  if (FindDTypeTraits(static_cast<uint32_t>(t->dtype)) == nullptr || t->dtype == DType::kI32 || t->dtype == DType::kQ8_K)
    f.Throw(StrFormat("tensor '%s' has a type moe.cpp cannot read", name.c_str()));
  std::vector<float> out(static_cast<size_t>(t->NumElements()));
  const int64_t n = t->ne[0], rows = t->NumElements() / n;
  for (int64_t r = 0; r < rows; ++r) kernels::DequantizeRow(t->dtype, t->Row(r), out.data() + r * n, n);
  return out;
}

// Drop-Upcycling: re-initialise `n_drop` random neurons f (rows f of W_gate / W_up [F][D], column
// f of W_down [D][F]) of one expert with N(mean, std) of each dense matrix.
struct Stats {
  double mean = 0, sd = 0;
};
Stats StatsOf(const std::vector<float>& v) {
  double s = 0, s2 = 0;
  for (float x : v) {
    s += x;
    s2 += static_cast<double>(x) * x;
  }
  Stats st;
  st.mean = s / v.size();
  st.sd = std::sqrt(std::max(0.0, s2 / v.size() - st.mean * st.mean));
  return st;
}

}  // namespace

ModelParams<float> Upcycle(const std::string& dense_path, const UpcycleOptions& opt) {
  std::shared_ptr<const GgufFile> file = GgufFile::Open(dense_path);
  const GgufFile& f = *file;
  const std::string arch = f.GetString("general.architecture");
  ModelConfig c;
  if (arch == "llama") {
    c.arch = Arch::kLlama;
  } else if (arch == "qwen3") {
    c.arch = Arch::kQwen3Moe;
  } else {
    f.Throw("general.architecture '" + arch + "': moe upcycle reads dense llama or qwen3 models");
  }
  auto key = [&](const char* s) { return arch + "." + s; };
  if (f.GetU32Opt(key("expert_count")).value_or(0) > 0)
    f.Throw("this is already an MoE model (" + key("expert_count") + " > 0): upcycle a dense model");
  if (f.FindTensor("rope_freqs.weight")) f.Throw("tensor 'rope_freqs.weight' (RoPE frequency scaling) is not supported");
  if (auto s = f.GetStringOpt(key("rope.scaling.type")); s && *s != "none")
    f.Throw("rope.scaling.type '" + *s + "' is not supported yet (only none)");
  if (opt.n_expert < 1 || opt.n_expert > 512) Fail("--experts %d must be in 1..512", opt.n_expert);
  if (opt.n_expert_used < 1 || opt.n_expert_used > opt.n_expert)
    Fail("--experts-used %d must be in 1..--experts (%d)", opt.n_expert_used, opt.n_expert);
  if (!(opt.drop_ratio >= 0 && opt.drop_ratio <= 1)) Fail("--drop-upcycling %g must be in [0, 1]", opt.drop_ratio);
  if (!(opt.router_std >= 0)) Fail("--router-std must be >= 0");
  c.n_layer = f.GetU32(key("block_count"));
  c.n_embd = f.GetU32(key("embedding_length"));
  c.n_ctx_train = f.GetU32(key("context_length"));
  c.n_head = f.GetU32(key("attention.head_count"));
  c.n_head_kv = f.GetU32Opt(key("attention.head_count_kv")).value_or(c.n_head);
  if (c.n_head == 0 || c.n_layer == 0 || c.n_embd == 0) f.Throw("block_count, embedding_length and head_count must be > 0");
  c.n_embd_head_k = f.GetU32Opt(key("attention.key_length")).value_or(c.n_embd / c.n_head);
  c.n_embd_head_v = f.GetU32Opt(key("attention.value_length")).value_or(c.n_embd_head_k);
  c.n_rot = f.GetU32Opt(key("rope.dimension_count")).value_or(c.n_embd_head_k);
  c.rope_freq_base = f.GetF32Opt(key("rope.freq_base")).value_or(10000.0f);
  c.rms_eps = f.GetF32(key("attention.layer_norm_rms_epsilon"));
  c.n_ff = c.n_ff_exp = f.GetU32(key("feed_forward_length"));
  const TensorView* embd = f.FindTensor("token_embd.weight");
  if (!embd) f.Throw("missing tensor 'token_embd.weight'");
  c.n_vocab = static_cast<uint32_t>(embd->ne[1]);
  c.n_expert = static_cast<uint32_t>(opt.n_expert);
  c.n_expert_used = static_cast<uint32_t>(opt.n_expert_used);
  c.router_kind = opt.router;
  ApplyArchTraits(c);
  try {
    ValidateConfig(c);
  } catch (const Error& e) {
    f.Throw(e.what());
  }

  ModelParams<float> p;
  p.config = c;
  p.tied_output = f.FindTensor("output.weight") == nullptr;
  p.qkv_bias = false;
  p.Allocate();
  const int64_t D = c.n_embd, V = c.n_vocab, F = c.n_ff_exp, E = c.n_expert;
  p.token_embd = Read(f, "token_embd.weight", {D, V});
  p.output_norm = Read(f, "output_norm.weight", {D});
  if (!p.tied_output) p.output = Read(f, "output.weight", {D, V});
  std::mt19937_64 rng(opt.seed);
  for (uint32_t il = 0; il < c.n_layer; ++il) {
    const std::string b = "blk." + std::to_string(il) + ".";
    LayerParams<float>& L = p.layers[il];
    L.attn_norm = Read(f, b + "attn_norm.weight", {D});
    L.wq = Read(f, b + "attn_q.weight", {D, c.n_q()});
    L.wk = Read(f, b + "attn_k.weight", {D, c.n_k()});
    L.wv = Read(f, b + "attn_v.weight", {D, c.n_v()});
    L.wo = Read(f, b + "attn_output.weight", {c.n_q(), D});
    if (c.qk_norm == QkNorm::kPerHead) {
      L.q_norm = Read(f, b + "attn_q_norm.weight", {c.n_embd_head_k});
      L.k_norm = Read(f, b + "attn_k_norm.weight", {c.n_embd_head_k});
    }
    L.ffn_norm = Read(f, b + "ffn_norm.weight", {D});
    const std::vector<float> gate = Read(f, b + "ffn_gate.weight", {D, F});
    const std::vector<float> up = Read(f, b + "ffn_up.weight", {D, F});
    const std::vector<float> down = Read(f, b + "ffn_down.weight", {F, D});
    const Stats sg = StatsOf(gate), su = StatsOf(up), sd = StatsOf(down);
    const int64_t n_drop = static_cast<int64_t>(std::llround(opt.drop_ratio * F));
    MoeWeights<float>& M = L.moe;
    std::vector<int64_t> neurons(F);
    for (int64_t e = 0; e < E; ++e) {
      std::copy(gate.begin(), gate.end(), M.gate_exps.begin() + e * F * D);
      std::copy(up.begin(), up.end(), M.up_exps.begin() + e * F * D);
      std::copy(down.begin(), down.end(), M.down_exps.begin() + e * D * F);
      if (n_drop == 0) continue;
      std::iota(neurons.begin(), neurons.end(), 0);
      for (int64_t i = 0; i < n_drop; ++i) {  // a random subset of n_drop neurons (partial Fisher-Yates)
        const int64_t j = i + static_cast<int64_t>(rng() % static_cast<uint64_t>(F - i));
        std::swap(neurons[i], neurons[j]);
      }
      std::normal_distribution<double> ng(sg.mean, sg.sd), nu(su.mean, su.sd), nd(sd.mean, sd.sd);
      for (int64_t i = 0; i < n_drop; ++i) {
        const int64_t fn = neurons[i];
        for (int64_t d = 0; d < D; ++d) {
          M.gate_exps[(e * F + fn) * D + d] = static_cast<float>(ng(rng));
          M.up_exps[(e * F + fn) * D + d] = static_cast<float>(nu(rng));
          M.down_exps[(e * D + d) * F + fn] = static_cast<float>(nd(rng));
        }
      }
    }
    std::normal_distribution<double> nr(0.0, opt.router_std);
    for (float& w : M.router) w = static_cast<float>(nr(rng));
  }
  p.source = std::move(file);
  return p;
}

}  // namespace moe
