#include "model/forward.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "kernels/gemm.h"
#include "kernels/kernels.h"
#include "util/error.h"
#include "util/memory.h"

namespace moe {

namespace {

// Rows of a weight matrix handed to a thread at a time (ThreadPool::ParallelFor: each thread
// works through its own run of chunks in order, then takes the others' last ones). Decode (up to
// 4 tokens): four chunks per thread. The two CPUs of a VM need not stream memory at the same
// speed (on the 2-vCPU AMD VM one read 35 GB/s alone, the other 24), and with one chunk per thread
// the faster waited at every barrier for about a tenth of the token: four per thread cut that
// wait to 4-5% and decode rose 3-8% (medium q4_0, medium and Qwen3-like Q4_K_M; eight and sixteen
// were slower again, each chunk restarting its weight stream and preparing its activations).
// Earlier, on symmetric hosts, one chunk per thread had measured fastest. More tokens: about two
// chunks per thread (four measured no faster with 16 tokens).
int64_t RowGrain(int64_t rows, int64_t n_tok, int n_threads) {
  const int64_t per_thread = n_tok <= 4 ? 4 : 2;
  const int64_t g = (rows + per_thread * n_threads - 1) / (per_thread * n_threads);
  return std::max<int64_t>(32, (g + 15) / 16 * 16);
}

// The row chunk of an expert's work items (Forward::MoeFfn): RowGrain for its n_tok tokens,
// rounded up to whole activation blocks of align.
int64_t ExpertGrain(int64_t rows, int64_t n_tok, int n_threads, int64_t align) {
  return (RowGrain(rows, n_tok, n_threads) + align - 1) / align * align;
}

float* F(std::vector<float>& v, size_t i) { return v.data() + i; }

// Block-quantized weights: their products run on the integer kernels (f32, f16, bf16 in float).
bool IsBlockType(DType t) { return Traits(t).block_size > 1; }

// The type of attn_k_b's transpose (Forward::MlaKbT) for attn_k_b of type w with rows of Kr.
DType MlaKbTType(DType w, int64_t Kr) { return IsBlockType(w) && Kr % kQK8_0 == 0 ? DType::kQ8_0 : DType::kF32; }

// One query's row of n scores in batched attention: the first n_kv (the positions it sees)
// scaled and turned into probabilities, the rest zeroed so the value GEMM adds nothing for them.
void CausalSoftmaxRow(float* s, int n_kv, int n, float scale) {
  for (int j = 0; j < n_kv; ++j) s[j] *= scale;
  kernels::Softmax(s, n_kv);
  std::fill(s + n_kv, s + n, 0.0f);
}

// Batched causal attention of `rows` queries at positions first .. first + rows - 1 (query i at
// q + i q_stride, Dk floats) over positions 0 .. first + rows - 1 (key j at K + j k_stride, Dk
// floats; value j at V + j v_stride, Dv floats): the score GEMM, each row's causal softmax, the
// value GEMM into out (row i at out + i out_stride). S: rows x (first + rows) floats of scratch.
void CausalAttentionGemm(const float* q, int64_t q_stride, const float* K, int64_t k_stride, const float* V,
                         int64_t v_stride, int64_t Dk, int64_t Dv, int first, int rows, float scale, float* S,
                         float* out, int64_t out_stride) {
  const int n = first + rows;
  const auto i32 = [](int64_t v) { return static_cast<int>(v); };
  kernels::Gemm(kernels::GemmOp::kNT, rows, n, i32(Dk), q, i32(q_stride), K, i32(k_stride), S, n, false);
  for (int i = 0; i < rows; ++i) CausalSoftmaxRow(S + static_cast<size_t>(i) * n, first + i + 1, n, scale);
  kernels::Gemm(kernels::GemmOp::kNN, rows, i32(Dv), n, S, n, V, i32(v_stride), out, i32(out_stride), false);
}

// Queries per block of batched (prefill) attention; fewer queries take the per-token path.
constexpr int kAttnBlock = 32;
// Absorbed MLA prefill: (token, head) rows per block of its two GEMMs. Every head reads the same
// latent rows, so larger blocks pack them (the GEMMs' B) for more rows at once: 128 rows ran a
// 512-token prefill of the DeepSeek-like Q4_K_M file about 5% faster than 32, and 256 no faster.
// Up to the contexts where the scores of such a block stay within 2 MiB per thread.
constexpr int kMlaBlock = 128;
constexpr int64_t kMlaBlockKeys = 4096;

}  // namespace

kernels::RopeScaling RopeScalingOf(const ModelConfig& c) {
  kernels::RopeScaling r;
  if (c.rope_scaling == RopeScalingType::kNone) {
    r.attn_factor = c.rope_attn_factor;
    return r;
  }
  // llama.cpp's context setup (llama_context's yarn_attn_factor, ggml_rope_yarn_corr_dims), in
  // float as there.
  r.freq_scale = 1.0f / c.rope_scaling_factor;
  r.ext_factor = c.rope_scaling == RopeScalingType::kYarn ? 1.0f : 0.0f;
  float attn = 1.0f;
  if (r.ext_factor != 0.0f) {
    const auto get_mscale = [](float scale, float m) { return scale <= 1.0f ? 1.0f : 0.1f * m * std::log(scale) + 1.0f; };
    const float factor = 1.0f / r.freq_scale;
    // Only deepseek2 reads yarn_log_multiplier, stored as 0.1 * mscale_all_dim.
    const float log_mul = c.arch == Arch::kDeepseek2 ? c.rope_yarn_log_mul / 0.1f : 0.0f;
    if (log_mul != 0.0f) {
      const float mscale = c.arch == Arch::kDeepseek2 && log_mul != 1.0f ? log_mul : 1.0f;
      attn = get_mscale(factor, mscale) / get_mscale(factor, log_mul);
    } else {
      attn = get_mscale(factor, 1.0f);
    }
    attn *= 1.0f / (1.0f + 0.1f * std::log(factor));  // ggml's rope multiplies this back in
    const float n_ctx_orig = static_cast<float>(c.n_ctx_orig_yarn ? c.n_ctx_orig_yarn : c.n_ctx_train);
    const float n_dims = static_cast<float>(c.n_rot);
    const auto corr_dim = [&](float n_rot) {
      return n_dims * std::log(n_ctx_orig / (n_rot * 2 * static_cast<float>(M_PI))) / (2 * std::log(c.rope_freq_base));
    };
    r.corr_dims[0] = std::max(0.0f, std::floor(corr_dim(c.yarn_beta_fast)));
    r.corr_dims[1] = std::min(n_dims - 1, std::ceil(corr_dim(c.yarn_beta_slow)));
  }
  r.attn_factor = attn * c.rope_attn_factor;
  return r;
}

float AttentionScale(const ModelConfig& c) {
  if (!c.is_mla()) return 1.0f / std::sqrt(static_cast<float>(c.n_embd_head_k));
  // llama.cpp's deepseek2 graph: the original attention factor (the YaRN cancellation undone),
  // times DeepSeek's mscale, squared.
  const kernels::RopeScaling r = RopeScalingOf(c);
  const float attn_org = r.attn_factor * (1.0f + 0.1f * std::log(1.0f / r.freq_scale));
  const float log_mul = c.rope_yarn_log_mul / 0.1f;
  const float mscale = attn_org * (1.0f + 0.1f * log_mul * std::log(1.0f / r.freq_scale));
  return 1.0f * mscale * mscale / std::sqrt(static_cast<float>(c.n_embd_head_k));
}

KvCache::KvCache(const ModelConfig& c, int n_ctx, DType type, int page_positions) : n_ctx_(n_ctx) {
  if (n_ctx < 1) Fail("a KV cache needs at least one position (got %d)", n_ctx);
  if (page_positions < 1 || page_positions % kernels::kAttendKeys != 0)
    Fail("KV cache pages hold a multiple of %d positions (got %d)", static_cast<int>(kernels::kAttendKeys), page_positions);
  if (type != DType::kF32 && type != DType::kF16)
    Fail("a KV cache holds f32 or f16, not %s", DTypeName(type));
  type_ = type;
  // MLA: the latent cache only (values are its first Kr elements).
  n_layer_ = c.n_layer;
  k_heads_ = c.is_mla() ? 1 : c.n_head_kv;
  k_dim_ = c.is_mla() ? c.KvFloatsPerLayer() : c.n_embd_head_k;
  v_heads_ = c.is_mla() ? 0 : c.n_head_kv;
  v_dim_ = c.is_mla() ? 0 : c.n_embd_head_v;
  // Whole pages even for a shorter context (as llama.cpp pads its cache to 256 positions): a page
  // of a few MiB is then whole huge pages, where a context-sized one would end in small pages.
  page_ = page_positions;
  pos_bytes_ = static_cast<size_t>(n_layer_) * (k_heads_ * k_dim_ + v_heads_ * v_dim_) * elem();
  v_at_ = static_cast<size_t>(n_layer_) * k_heads_ * static_cast<size_t>(page_) * k_dim_ * elem();
  page_bytes_ = static_cast<size_t>(page_) * pos_bytes_;
  const size_t pages = static_cast<size_t>((n_ctx + page_ - 1) / page_);
  try {
    buf_ = HugePageBuffer(std::max<size_t>(pages * page_bytes_, 1));
  } catch (const Error&) {
    Fail("out of memory for a KV cache of %zu bytes", pages * page_bytes_);
  }
  // Not cleared: every position is written before it is read, and pages past the context used
  // are never touched (so they take no memory).
}

DType ParseCacheType(const std::string& s) {
  if (s == "f32") return DType::kF32;
  if (s == "f16") return DType::kF16;
  Fail("--cache-type %s: use f32 or f16", s.c_str());
}

Forward::MlaForm ParseMlaForm(const std::string& s) {
  if (s == "auto") return Forward::MlaForm::kAuto;
  if (s == "absorbed") return Forward::MlaForm::kAbsorbed;
  if (s == "expanded") return Forward::MlaForm::kExpanded;
  Fail("--mla %s: use auto, absorbed or expanded", s.c_str());
}

void KvCache::Load(const uint8_t* row, size_t dim, float* x) const {
  if (type_ == DType::kF16) {
    kernels::DequantizeRow(DType::kF16, row, x, static_cast<int64_t>(dim));
  } else {
    std::memcpy(x, row, dim * sizeof(float));
  }
}

void KvCache::Store(uint8_t* row, size_t dim, const float* x) {
  if (type_ == DType::kF16) {
    kernels::ConvertActivations(DType::kF16, x, row, static_cast<int64_t>(dim));  // round to nearest even
  } else {
    std::memcpy(row, x, dim * sizeof(float));
  }
}

void KvCache::Truncate(int n) {
  MOE_ASSERT(n >= 0 && n <= n_past_);
  n_past_ = n;
}

void KvCache::Reserve(int positions) {
  const int pages = (std::min(positions, n_ctx_) + page_ - 1) / page_;
  if (pages <= reserved_pages_) return;
  // Whole pages, in one call (unsupported: they fault in as they are written).
  PopulatePages(buf_.data() + static_cast<size_t>(reserved_pages_) * page_bytes_,
                static_cast<size_t>(pages - reserved_pages_) * page_bytes_);
  reserved_pages_ = pages;
}

int DefaultContext(const ModelConfig& c) {
  return static_cast<int>(std::min<uint32_t>(c.n_ctx_train ? c.n_ctx_train : 4096, 4096));
}

Forward::Forward(const Model& model, ThreadPool& pool, int n_ctx, int n_batch, DType kv_type)
    : model_(model), c_(model.config()), pool_(pool), n_ctx_(n_ctx > 0 ? n_ctx : DefaultContext(model.config())),
      n_batch_(n_batch > 0 ? n_batch : 256), own_(model.config(), n_ctx_, kv_type) {
  if (const std::string why = UnservableRouterReason(c_); !why.empty()) throw Error(why);
  rope_ = RopeScalingOf(c_);
  kq_scale_ = AttentionScale(c_);
  // Per thread: a batched block's [kAttnBlock][n_ctx] scores, or kernels::Attend's rows (at most
  // kAttnBlock) x kAttendKeys scratch, which is the larger when the context is under 16; MLA's
  // blocks of up to kMlaBlock rows over up to kMlaBlockKeys keys (MlaAbsorbed).
  scores_per_thread_ = static_cast<size_t>(kAttnBlock) * std::max<int64_t>(n_ctx_, kernels::kAttendKeys);
  if (c_.is_mla())
    scores_per_thread_ = std::max<size_t>(scores_per_thread_, static_cast<size_t>(kMlaBlock) *
                                                                  std::min<int64_t>(n_ctx_, kMlaBlockKeys));
  scores_.resize(static_cast<size_t>(pool_.size()) * scores_per_thread_);
  ReserveScratch();
}

// Sizes the scratch buffers for the largest chunk (n_batch tokens) once, here: grown on the
// first long prompt instead, their fresh pages faulted in during that prompt (a 128-token
// prefill after a 64-token one ran at two thirds of its speed on the 2-vCPU VM).
void Forward::ReserveScratch() {
  const size_t T = static_cast<size_t>(std::min(n_batch_, n_ctx_));
  const size_t E = c_.n_embd, Fx = c_.n_ff_exp, R = c_.moe.router_width(), K = c_.moe.k;
  const size_t S = T * K;  // expert rows
  size_t rb_in = 0, rb_e = 0, rb_d = 0;  // activation row bytes: Linear inputs, expert inputs, down
  for (const LayerWeights& L : model_.layers) {
    for (const TensorView* w : {L.wq, L.wo, L.gate_inp, L.gate_shexp, L.down_shexp, L.wq_a, L.wq_b, L.wkv_a,
                                L.ffn_gate, L.ffn_down})
      if (w) rb_in = std::max(rb_in, kernels::ActivationRowBytes(w->dtype, w->ne[0]));
    for (const TensorView* w : {L.wk_b, L.wv_b})  // one row per (token, head)
      if (w) rb_in = std::max(rb_in, c_.n_head * kernels::ActivationRowBytes(w->dtype, w->ne[0]));
    if (L.gate_exps) rb_e = std::max(rb_e, kernels::ActivationRowBytes(L.gate_exps->dtype, static_cast<int64_t>(E)));
    if (L.down_exps) rb_d = std::max(rb_d, kernels::ActivationRowBytes(L.down_exps->dtype, static_cast<int64_t>(Fx)));
  }
  rb_in = std::max(rb_in, rb_e);
  if (model_.output) rb_in = std::max(rb_in, kernels::ActivationRowBytes(model_.output->dtype, static_cast<int64_t>(E)));
  for (auto* v : {&x_, &h_, &tmp_, &shout_}) v->resize(T * E);
  q_.resize(T * c_.n_q());
  att_.resize(T * c_.n_q());
  k_.resize(T * c_.n_k());
  v_.resize(T * c_.n_v());
  router_.resize(T * R);
  probs_.resize(T * R);
  gate_w_.resize(T * K);
  act_.resize(T * rb_in);
  xg_.resize(S * rb_e);
  aq_.resize(S * rb_d);
  g_.resize(S * Fx);
  // Per thread, one work item's up-projection rows (MoeFfn): an expert's tokens (at most T) times
  // its row chunk (activation blocks are at most kQK_K).
  const auto grain = std::min<int64_t>(static_cast<int64_t>(Fx), ExpertGrain(static_cast<int64_t>(Fx), static_cast<int64_t>(T), pool_.size(), kQK_K));
  u_.resize(static_cast<size_t>(pool_.size()) * T * static_cast<size_t>(grain));
  y_.resize(S * E);
  const size_t ffn2 = std::max<size_t>(c_.n_ff_shexp, c_.n_layer_dense_lead > 0 ? c_.n_ff : 0);
  sg_.resize(T * ffn2);
  su_.resize(T * ffn2);
  if (c_.is_mla()) {
    const size_t H = c_.n_head, W = c_.KvFloatsPerLayer();
    att_.resize(T * H * c_.n_embd_head_v);
    qa_.resize(T * c_.n_lora_q);
    kva_.resize(T * W);
    qabs_.resize(T * H * W);
    lat_.resize(T * H * c_.n_lora_kv);
  }
}

void Forward::SetMlaForm(MlaForm form) {
  mla_form_ = c_.is_mla() ? form : MlaForm::kAuto;
  if (mla_form_ != MlaForm::kPlain || !mla_kb_.empty()) return;
  // f32 copies of every layer's attn_k_b [H][Kr][Dn] and attn_v_b [H][Dv][Kr].
  for (const LayerWeights& L : model_.layers) {
    for (auto [w, out] : {std::pair{L.wk_b, &mla_kb_}, std::pair{L.wv_b, &mla_vb_}}) {
      if (w->layout != WeightLayout::kRows)
        Fail("plain MLA attention needs %s in the file's layout: load the model without repacking", w->name.c_str());
      std::vector<float>& a = out->emplace_back(static_cast<size_t>(w->NumElements()));
      for (int64_t r = 0; r < w->ne[1] * w->ne[2]; ++r)
        kernels::DequantizeRow(w->dtype, w->Row(r), a.data() + r * w->ne[0], w->ne[0]);
    }
  }
  const size_t per_thread = static_cast<size_t>(n_ctx_) * (c_.n_embd_head_k + c_.n_embd_head_v);
  plain_kv_.resize(static_cast<size_t>(pool_.size()) * per_thread);
}

void Forward::CheckTokens(const int32_t* tokens, int n) const {
  for (int i = 0; i < n; ++i) {
    if (tokens[i] < 0 || static_cast<uint32_t>(tokens[i]) >= c_.n_vocab)
      Fail("token id %d is out of range: the vocabulary has %u tokens", tokens[i], c_.n_vocab);
  }
}

void Forward::Eval(const int32_t* tokens, int n, bool all_logits, std::vector<float>* logits) {
  if (n <= 0) return;
  if (own_.n_past() + n > own_.n_ctx())
    Fail("context is full: %d tokens in the cache + %d new > context size %d (use a shorter prompt or fewer tokens)",
         own_.n_past(), n, own_.n_ctx());
  CheckTokens(tokens, n);
  logits->resize(static_cast<size_t>(all_logits ? n : 1) * c_.n_vocab);
  std::vector<OutRow> outs;
  for (int b = 0; b < n; b += n_batch_) {
    const int m = std::min(n_batch_, n - b);
    outs.clear();
    float* contiguous = nullptr;
    if (all_logits) {
      contiguous = logits->data() + static_cast<size_t>(b) * c_.n_vocab;
      for (int t = 0; t < m; ++t) outs.push_back({t, contiguous + static_cast<size_t>(t) * c_.n_vocab});
    } else if (b + m == n) {
      contiguous = logits->data();
      outs.push_back({m - 1, contiguous});
    }
    segments_.assign(1, Segment{&own_, 0, m});
    EvalChunk(tokens + b, m, outs, contiguous);
  }
}

void Forward::EvalBatch(const SeqBatch* seqs, int n_seqs) {
  int T = 0;
  for (int i = 0; i < n_seqs; ++i) {
    const SeqBatch& s = seqs[i];
    if (s.cache == nullptr || s.n < 1) Fail("batch entry %d has no cache or no tokens", i);
    if (s.cache->n_ctx() > n_ctx_)
      Fail("batch entry %d: a cache of %d positions is longer than this forward's context (%d)", i,
           s.cache->n_ctx(), n_ctx_);
    if (s.cache->n_past() + s.n > s.cache->n_ctx())
      Fail("context is full: %d tokens in the cache + %d new > context size %d", s.cache->n_past(), s.n,
           s.cache->n_ctx());
    for (int j = 0; j < i; ++j)
      if (seqs[j].cache == s.cache) Fail("batch entries %d and %d share one cache", j, i);
    CheckTokens(s.tokens, s.n);
    T += s.n;
  }
  if (T > n_batch_) Fail("a batch of %d tokens is more than this forward's %d", T, n_batch_);
  if (T == 0) return;
  batch_tokens_.clear();
  segments_.clear();
  std::vector<OutRow> outs;
  for (int i = 0; i < n_seqs; ++i) {
    segments_.push_back({seqs[i].cache, static_cast<int>(batch_tokens_.size()), seqs[i].n});
    batch_tokens_.insert(batch_tokens_.end(), seqs[i].tokens, seqs[i].tokens + seqs[i].n);
    if (seqs[i].logits) outs.push_back({static_cast<int>(batch_tokens_.size()) - 1, seqs[i].logits});
  }
  EvalChunk(batch_tokens_.data(), T, outs, nullptr);
}

namespace {

// No NaN or Inf in x[n] (an exponent of all ones), in integer ops the compiler vectorises.
bool AllFinite(const float* x, int64_t n) {
  uint32_t bad = 0;
  for (int64_t i = 0; i < n; ++i) {
    uint32_t b;
    std::memcpy(&b, x + i, sizeof(b));
    bad |= static_cast<uint32_t>((~b & 0x7f800000u) == 0);
  }
  return bad == 0;
}

}  // namespace

void Forward::ReserveWidening(size_t floats_per_pos, bool batched_only) {
  bool any = false;
  for (const Segment& sg : segments_) {
    const bool copies = sg.cache->type() == DType::kF16 || sg.cache->n_past() + sg.n > sg.cache->page_;
    any = any || (copies && (sg.n >= kAttnBlock || !batched_only));
  }
  if (!any) return;
  widen_stride_ = static_cast<size_t>(n_ctx_) * floats_per_pos;
  const size_t want = static_cast<size_t>(pool_.size()) * widen_stride_;
  if (kv_f32_.size() < want) kv_f32_.resize(want);
}

const float* Forward::CacheRowsF32(const KvCache& cache, const kernels::KvRows& rows, int n, int thread,
                                   size_t offset, int from) {
  const bool f32 = cache.type() == DType::kF32;
  const int per = rows.page_rows ? static_cast<int>(rows.page_rows) : n;  // rows per contiguous run
  if (f32 && n <= per) return static_cast<const float*>(rows.base);
  float* room = kv_f32_.data() + static_cast<size_t>(thread) * widen_stride_ + offset;
  const size_t e = cache.elem();
  for (int j = from; j < n; j = (j / per + 1) * per) {  // a page's rows are contiguous
    const int m = std::min(n, (j / per + 1) * per) - j;
    const auto* src = static_cast<const uint8_t*>(rows.base) + static_cast<size_t>(rows.Offset(j)) * e;
    cache.Load(src, static_cast<size_t>(m) * rows.stride, room + static_cast<size_t>(j) * rows.stride);
  }
  return room;
}

template <class Fn>
void Forward::ForEachRow(int T, const Fn& fn) {  // (one row runs inline: ParallelFor's n <= grain)
  pool_.ParallelFor(T, 1, [&](int64_t b, int64_t e, int) {
    for (int64_t t = b; t < e; ++t) fn(static_cast<int>(t));
  });
}

int Forward::RowPos(int t) const {
  const Segment& sg = segments_[row_seg_[t]];
  return sg.cache->n_past() + (t - sg.t0);
}

KvCache* Forward::RowCache(int t) const { return segments_[row_seg_[t]].cache; }

void Forward::Linear(const TensorView& W, const float* x, int T, float* y) {
  const TensorView* w[1] = {&W};
  float* out[1] = {y};
  Linears(w, out, 1, x, T);
}

void Forward::Linears(const TensorView* const* W, float* const* y, int n, const float* x, int T) {
  const int64_t in = W[0]->ne[0];
  const DType dt = W[0]->dtype;
  for (int i = 1; i < n; ++i) {
    if (W[i]->dtype != dt || W[i]->ne[0] != in) {  // different activations: one at a time
      for (int j = 0; j < n; ++j) Linears(&W[j], &y[j], 1, x, T);
      return;
    }
  }
  if (input_observer_) {
    observed_rows_.resize(static_cast<size_t>(T));
    for (int t = 0; t < T; ++t) observed_rows_[t] = x + t * in;
    for (int i = 0; i < n; ++i) input_observer_(*W[i], 0, observed_rows_.data(), T);
  }
  const size_t rb = kernels::ActivationRowBytes(dt, in);
  act_.resize(rb * T);
  if (T >= 8) {
    pool_.ParallelFor(T, 4, [&](int64_t b, int64_t e, int) {
      for (int64_t t = b; t < e; ++t) kernels::ConvertActivations(dt, x + t * in, act_.data() + t * rb, in);
    });
  } else {
    for (int t = 0; t < T; ++t) kernels::ConvertActivations(dt, x + t * in, act_.data() + t * rb, in);
  }
  // (matrix, row chunk) work items over all n matrices: one pass of the pool.
  std::vector<LinearItem>& items = linear_items_;
  items.clear();
  for (int i = 0; i < n; ++i) {
    const int64_t rows = W[i]->ne[1] * W[i]->ne[2];
    const int64_t grain = RowGrain(rows, T, pool_.size());
    for (int64_t r = 0; r < rows; r += grain) items.push_back({i, r, std::min(rows, r + grain)});
  }
  pool_.ParallelFor(static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e, int) {
    for (int64_t k = b; k < e; ++k) {
      const LinearItem& it = items[k];
      const TensorView& w = *W[it.m];
      const int64_t rows = w.ne[1] * w.ne[2];
      kernels::MatMul(dt, w.data, in, it.r0, it.r1, act_.data(), rb, T, y[it.m] + it.r0, rows, w.layout);
    }
  });
}

void Forward::EvalChunk(const int32_t* tokens, int T, const std::vector<OutRow>& outs, float* contiguous) {
  const int64_t E = c_.n_embd;
  row_seg_.resize(static_cast<size_t>(T));
  for (int si = 0; si < static_cast<int>(segments_.size()); ++si) {
    const Segment& sg = segments_[si];
    sg.cache->Reserve(sg.cache->n_past() + sg.n);
    std::fill(row_seg_.begin() + sg.t0, row_seg_.begin() + sg.t0 + sg.n, si);
  }
  x_.resize(T * E);
  h_.resize(T * E);
  tmp_.resize(T * E);
  // Each row's RoPE table, once for all its heads and layers.
  const size_t half = c_.n_rot / 2;
  rope_cos_.resize(T * half);
  rope_sin_.resize(T * half);
  ForEachRow(T, [&](int t) {
    kernels::RopeTables(static_cast<int>(c_.n_rot), c_.rope_freq_base, RowPos(t), 1, &rope_cos_[t * half],
                        &rope_sin_[t * half], rope_);
  });
  // Embeddings (ggml_get_rows: the rows of token_embd, dequantized) and the first block's
  // attn_norm.
  const LayerWeights* first = c_.n_layer ? &model_.layers[0] : nullptr;
  ForEachRow(T, [&](int t) {
    kernels::DequantizeRow(model_.token_embd->dtype, model_.token_embd->Row(tokens[t]), F(x_, t * E), E);
    if (first) kernels::RmsNorm(F(x_, t * E), first->attn_norm->F32(), E, c_.rms_eps, F(h_, t * E));
  });

  std::atomic<int> bad_row{T};  // the first row a block made non-finite
  for (uint32_t il = 0; il < c_.n_layer; ++il) {
    const LayerWeights& L = model_.layers[il];
    if (c_.is_mla()) {
      MlaAttention(static_cast<int>(il), T);
    } else {
      Attention(static_cast<int>(il), T);
    }
    ForEachRow(T, [&](int t) {  // ffn_inp = attn_out + residual; ffn_norm
      kernels::Add(F(x_, t * E), F(tmp_, t * E), F(x_, t * E), E);
      kernels::RmsNorm(F(x_, t * E), L.ffn_norm->F32(), E, c_.rms_eps, F(h_, t * E));
    });
    if (c_.IsMoeLayer(il)) {
      MoeFfn(static_cast<int>(il), tokens, T);
    } else {
      DenseFfn(static_cast<int>(il), T);
    }
    // The block's output (+ residual), checked: a NaN or Inf weight (or a hyper-parameter that
    // overflows) stops here, named, instead of flowing into the logits. Then the next block's
    // attn_norm.
    const LayerWeights* next = il + 1 < c_.n_layer ? &model_.layers[il + 1] : nullptr;
    ForEachRow(T, [&](int t) {
      float* x = F(x_, t * E);
      kernels::Add(x, F(tmp_, t * E), x, E);
      if (!AllFinite(x, E)) {
        int cur = bad_row.load(std::memory_order_relaxed);
        while (t < cur && !bad_row.compare_exchange_weak(cur, t, std::memory_order_relaxed)) {
        }
        return;
      }
      if (next) kernels::RmsNorm(x, next->attn_norm->F32(), E, c_.rms_eps, F(h_, t * E));
    });
    if (const int row = bad_row.load(); row < T) {
      const float* x = F(x_, static_cast<size_t>(row) * E);
      const bool nan = std::isnan(*std::find_if(x, x + E, [](float v) { return !std::isfinite(v); }));
      Fail("block %u gave a non-finite value (%s) for the token at position %d: the model's weights or "
           "hyper-parameters are broken (a NaN or Inf weight, or values that overflow float)",
           il, nan ? "NaN" : "Inf", RowPos(row));
    }
  }
  for (const Segment& sg : segments_) sg.cache->n_past_ += sg.n;

  if (!outs.empty()) {
    const int n_out = static_cast<int>(outs.size());
    for (int i = 0; i < n_out; ++i)
      kernels::RmsNorm(F(x_, outs[i].row * E), model_.output_norm->F32(), E, c_.rms_eps, F(h_, i * E));
    if (contiguous) {
      Linear(*model_.output, h_.data(), n_out, contiguous);
    } else {
      out_logits_.resize(static_cast<size_t>(n_out) * c_.n_vocab);
      Linear(*model_.output, h_.data(), n_out, out_logits_.data());
      for (int i = 0; i < n_out; ++i)
        std::memcpy(outs[i].dest, &out_logits_[static_cast<size_t>(i) * c_.n_vocab], c_.n_vocab * sizeof(float));
    }
  }
}

void Forward::Attention(int il, int T) {
  const LayerWeights& L = model_.layers[il];
  const int64_t E = c_.n_embd, nq = c_.n_q(), nk = c_.n_k(), nv = c_.n_v();
  const int D = static_cast<int>(c_.n_embd_head_k), H = static_cast<int>(c_.n_head);
  const int Hkv = static_cast<int>(c_.n_head_kv);
  q_.resize(T * nq);
  k_.resize(T * nk);
  v_.resize(T * nv);
  att_.resize(T * nq);
  // q [T][n_q], k [T][n_k], v [T][n_v] in one pass of the pool.
  const TensorView* qkv[3] = {L.wq, L.wk, L.wv};
  float* qkv_out[3] = {q_.data(), k_.data(), v_.data()};
  Linears(qkv, qkv_out, 3, h_.data(), T);
  const bool neox = c_.rope_type == RopeType::kNeox;
  const int n_rot = static_cast<int>(c_.n_rot);
  ForEachRow(T, [&](int t) {
    const int pos = RowPos(t);
    KvCache& cache = *RowCache(t);
    // The cache rows this token writes are fresh lines: start fetching them now, so the
    // misses overlap the norms and rotations below.
    for (int g = 0; g < Hkv; ++g) {
      const uint8_t* kr = cache.KRow(il, g, pos);
      const uint8_t* vr = cache.VRow(il, g, pos);
      for (size_t o = 0; o < D * cache.elem(); o += 64) {
        __builtin_prefetch(kr + o, 1);
        __builtin_prefetch(vr + o, 1);
      }
    }
    float* q = F(q_, t * nq);
    float* k = F(k_, t * nk);
    if (L.bq) kernels::Add(q, L.bq->F32(), q, nq);
    if (L.bk) kernels::Add(k, L.bk->F32(), k, nk);
    if (L.bv) kernels::Add(F(v_, t * nv), L.bv->F32(), F(v_, t * nv), nv);
    if (c_.qk_norm == QkNorm::kFull) {
      kernels::RmsNorm(q, L.q_norm->F32(), nq, c_.rms_eps, q);
      kernels::RmsNorm(k, L.k_norm->F32(), nk, c_.rms_eps, k);
    } else if (c_.qk_norm == QkNorm::kPerHead) {
      for (int h = 0; h < H; ++h) kernels::RmsNorm(q + h * D, L.q_norm->F32(), D, c_.rms_eps, q + h * D);
      for (int h = 0; h < Hkv; ++h) kernels::RmsNorm(k + h * D, L.k_norm->F32(), D, c_.rms_eps, k + h * D);
    }
    kernels::RopeApply(q, H, D, n_rot, RopeCos(t), RopeSin(t), neox);
    kernels::RopeApply(k, Hkv, D, n_rot, RopeCos(t), RopeSin(t), neox);
    for (int g = 0; g < Hkv; ++g) {
      cache.Store(cache.KRow(il, g, pos), D, k + g * D);
      cache.Store(cache.VRow(il, g, pos), D, F(v_, t * nv + g * D));
    }
  });
  const float scale = kq_scale_;
  const int group = H / Hkv;
  // Work items per sequence. Fewer than kAttnBlock new tokens (decode): (token, KV head, rows of
  // its group) and kernels::Attend, which reads each cached key once for the group's queries; a
  // group splits over the threads when there are fewer groups than threads. More tokens:
  // (block of kAttnBlock queries, head) and two GEMMs, the scores of every key any query of the
  // block sees (Q K^T), masked causally and normalised row by row, then P V. The path is the
  // sequence's own, whatever else is in the batch, and a row's result never depends on its
  // item-mates.
  attn_items_.clear();
  for (int si = 0; si < static_cast<int>(segments_.size()); ++si) {
    const Segment& sg = segments_[si];
    if (sg.n >= kAttnBlock) {
      for (int i = 0; i < sg.n; i += kAttnBlock)
        for (int h = 0; h < H; ++h) attn_items_.push_back({si, sg.t0 + i, std::min(kAttnBlock, sg.n - i), h, true});
      continue;
    }
    const int parts = std::min(group, (pool_.size() + sg.n * Hkv - 1) / (sg.n * Hkv));
    const int per = std::min(kAttnBlock, (group + parts - 1) / parts);
    for (int i = 0; i < sg.n; ++i)
      for (int g = 0; g < Hkv; ++g)
        for (int r = 0; r < group; r += per)
          attn_items_.push_back({si, sg.t0 + i, std::min(per, group - r), g * group + r, false});
  }
  ReserveWidening(2 * static_cast<size_t>(D), true);
  pool_.ParallelFor(static_cast<int64_t>(attn_items_.size()), 1, [&](int64_t b, int64_t e, int thread) {
    float* S = scores_.data() + thread * scores_per_thread_;  // [rows][n_keys]
    for (int64_t item = b; item < e; ++item) {
      const AttnItem& it = attn_items_[item];
      const Segment& sg = segments_[it.seg];
      const KvCache& cache = *sg.cache;
      const int g = it.head / group, first = cache.n_past() + (it.t - sg.t0);  // first query's position
      const kernels::KvRows Kc = cache.KRows(il, g), Vc = cache.VRows(il, g);
      float* out = att_.data() + it.t * nq + it.head * D;
      const float* q = q_.data() + it.t * nq + it.head * D;
      if (!it.batched) {  // it.rows heads of one token
        kernels::Attend(kernels::AttendRows{q, D, out, D, it.rows}, cache.type(), Kc, D, Vc, D, first + 1, scale, S);
        continue;
      }
      const int n_keys = first + it.rows;  // the last query's keys
      const float* K = CacheRowsF32(cache, Kc, n_keys, thread, 0);
      const float* V = CacheRowsF32(cache, Vc, n_keys, thread, static_cast<size_t>(n_keys) * D);
      CausalAttentionGemm(q, nq, K, D, V, D, D, D, first, it.rows, scale, S, out, nq);
    }
  });
  Linear(*L.wo, att_.data(), T, tmp_.data());  // [T][n_embd]
  (void)E;
}

void Forward::HeadLinears(const TensorView& W, const float* x, int64_t x_tok, int64_t x_head, int T, float* y,
                          int64_t y_tok, int64_t y_head) {
  const int64_t in = W.ne[0], out = W.ne[1], H = W.ne[2];
  const DType dt = W.dtype;
  if (input_observer_) {
    observed_rows_.resize(static_cast<size_t>(T));
    for (int64_t h = 0; h < H; ++h) {
      for (int t = 0; t < T; ++t) observed_rows_[t] = x + t * x_tok + h * x_head;
      input_observer_(W, static_cast<int>(h), observed_rows_.data(), T);
    }
  }
  const size_t rb = kernels::ActivationRowBytes(dt, in);
  act_.resize(rb * static_cast<size_t>(T * H));  // [H][T] rows
  const auto convert = [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      const int64_t h = i / T, t = i % T;
      kernels::ConvertActivations(dt, x + t * x_tok + h * x_head, act_.data() + i * rb, in);
    }
  };
  if (T * H >= 8) {
    pool_.ParallelFor(T * H, 4, convert);
  } else {
    convert(0, T * H, 0);
  }
  std::vector<LinearItem>& items = linear_items_;
  items.clear();
  const int64_t grain = RowGrain(out, T, pool_.size());
  for (int64_t h = 0; h < H; ++h)
    for (int64_t r = 0; r < out; r += grain) items.push_back({static_cast<int>(h), r, std::min(out, r + grain)});
  pool_.ParallelFor(static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e, int) {
    for (int64_t k = b; k < e; ++k) {
      const LinearItem& it = items[k];
      kernels::MatMul(dt, W.Slab(it.m), in, it.r0, it.r1, act_.data() + static_cast<size_t>(it.m) * T * rb, rb, T,
                      y + it.m * y_head + it.r0, y_tok, W.layout);
    }
  });
}

void Forward::MlaAttention(int il, int T) {
  const LayerWeights& L = model_.layers[il];
  const int64_t H = c_.n_head, Dk = c_.n_embd_head_k, Dn = c_.qk_nope(), Dr = c_.n_rot;
  const int64_t Kr = c_.n_lora_kv, W = Kr + Dr, Rq = c_.n_lora_q;
  q_.resize(static_cast<size_t>(T * H * Dk));
  kva_.resize(static_cast<size_t>(T * W));
  att_.resize(static_cast<size_t>(T * H * c_.n_embd_head_v));
  if (L.wq_a) {  // q through the low-rank bottleneck: q_b(norm(q_a x))
    qa_.resize(static_cast<size_t>(T * Rq));
    const TensorView* w[2] = {L.wq_a, L.wkv_a};
    float* out[2] = {qa_.data(), kva_.data()};
    Linears(w, out, 2, h_.data(), T);
    ForEachRow(T, [&](int t) { kernels::RmsNorm(F(qa_, t * Rq), L.q_a_norm->F32(), Rq, c_.rms_eps, F(qa_, t * Rq)); });
    Linear(*L.wq_b, qa_.data(), T, q_.data());
  } else {
    const TensorView* w[2] = {L.wq, L.wkv_a};
    float* out[2] = {q_.data(), kva_.data()};
    Linears(w, out, 2, h_.data(), T);
  }
  // RoPE on each head's last Dr dims and on the shared key part; the cache takes the normalised
  // latent and the rotated key.
  ForEachRow(T, [&](int t) {
    const int pos = RowPos(t);
    kernels::RopeApply(F(q_, t * H * Dk + Dn), static_cast<int>(H), static_cast<int>(Dk), static_cast<int>(Dr),
                       RopeCos(t), RopeSin(t), false);
    float* kv = F(kva_, t * W);  // [c | k_pe], finished in place, then stored
    kernels::RmsNorm(kv, L.kv_a_norm->F32(), Kr, c_.rms_eps, kv);
    kernels::RopeApply(kv + Kr, 1, static_cast<int>(Dr), static_cast<int>(Dr), RopeCos(t), RopeSin(t), false);
    KvCache& cache = *RowCache(t);
    cache.Store(cache.KRow(il, 0, pos), W, kv);
  });
  if (mla_form_ == MlaForm::kPlain) {
    MlaPlain(il, T);
  } else {
    // Each sequence in its form; runs of absorbed sequences share their passes.
    const int n_seg = static_cast<int>(segments_.size());
    std::vector<char> expand(static_cast<size_t>(n_seg));
    for (int si = 0; si < n_seg; ++si) expand[si] = MlaPrefersExpanded(il, si);
    for (int s0 = 0; s0 < n_seg;) {
      if (expand[s0]) {
        MlaExpanded(il, s0++);
        continue;
      }
      int s1 = s0 + 1;
      while (s1 < n_seg && !expand[s1]) ++s1;
      MlaAbsorbed(il, segments_[s0].t0, segments_[s1 - 1].t0 + segments_[s1 - 1].n);
      s0 = s1;
    }
  }
  Linear(*L.wo, att_.data(), T, tmp_.data());
}

// The multiply-adds of the two forms for one sequence's n new rows over n_keys cached positions
// (the chunk's own included), each weighted by what a multiply-add costs on its path: the
// weight products run on the int8 kernels for quantized weights (1) or in f32 (4: a quarter of
// the rate on AVX-512 VNNI), the attention GEMMs in f32 (4).
//   absorbed: n H Kr (Dn + Dv) weight products (q_nope into the latent space, the latent mix
//             out of it) + n H keys (Kr + Dr + Kr) attention
//   expanded: n_keys H Kr (Dn + Dv) weight products (every position's keys and values) +
//             n H keys (Dn + Dr + Dv) attention
// with keys the mean number of positions a row attends to. Expanded wins once a chunk is long
// against its context: DeepSeek-V2's sizes, a fresh prompt of 512 tokens: less than half.
bool Forward::MlaPrefersExpanded(int il, int si) const {
  const LayerWeights& L = model_.layers[il];
  const bool exact = L.wk_b->dtype == DType::kF32 && L.wv_b->dtype == DType::kF32;
  if (mla_form_ != MlaForm::kExpanded && !(mla_form_ == MlaForm::kAuto && exact)) return false;
  // Importance statistics record what attn_k_b and attn_v_b multiply in llama.cpp's absorbed
  // graph (q_nope, the latent mix), which the expanded form never forms.
  if (input_observer_) return false;
  const Segment& sg = segments_[si];
  if (sg.n < kAttnBlock) return false;  // decode and short chunks
  const double H = static_cast<double>(c_.n_head), Dn = static_cast<double>(c_.qk_nope()), Dr = static_cast<double>(c_.n_rot),
               Dv = static_cast<double>(c_.n_embd_head_v), Kr = static_cast<double>(c_.n_lora_kv);
  const auto cost = [](DType t) { return IsBlockType(t) ? 1.0 : 4.0; };
  const double n = sg.n, n_keys = sg.cache->n_past() + sg.n, keys = sg.cache->n_past() + (sg.n + 1) / 2.0;
  const double ck = cost(MlaKbTType(L.wk_b->dtype, c_.n_lora_kv));
  const double absorbed = n * H * Kr * (Dn * cost(L.wk_b->dtype) + Dv * cost(L.wv_b->dtype)) + 4 * n * H * keys * (2 * Kr + Dr);
  const double expanded = n_keys * H * Kr * (Dn * ck + Dv * cost(L.wv_b->dtype)) + 4 * n * H * keys * (Dn + Dr + Dv);
  // The expanded keys and values of a sequence live in scratch: past 1 GiB, stay absorbed.
  const double bytes = n_keys * H * (Dn + Dr + Dv) * sizeof(float);
  return expanded < absorbed && bytes <= 1024.0 * 1024 * 1024;
}

// attn_k_b {Dn, Kr, H} maps a head's q_nope into the latent space; the expanded keys need its
// transpose, c W_kb,h: per head Dn rows of Kr. Built once per layer from the file's rows: f32
// for float weights, q8_0 for quantized ones (re-quantized along Kr, in the CPU's tile layout
// where it has one), so the keys run on the same kernels as every other product.
const TensorView& Forward::MlaKbT(int il) {
  if (mla_kbt_.empty()) mla_kbt_.resize(c_.n_layer);
  KbT& kt = mla_kbt_[static_cast<size_t>(il)];
  if (kt.view.data) return kt.view;
  const TensorView* w = model_.layers[static_cast<size_t>(il)].wk_b;
  if (w->layout != WeightLayout::kRows) w = model_.file().FindTensor(w->name);  // repacked: the file's rows
  if (w == nullptr || w->layout != WeightLayout::kRows)
    Fail("expanded MLA attention needs %s in the file's layout", model_.layers[static_cast<size_t>(il)].wk_b->name.c_str());
  const int64_t Dn = w->ne[0], Kr = w->ne[1], H = w->ne[2];
  const DType to = MlaKbTType(w->dtype, Kr);
  const size_t row = RowBytes(to, Kr), slab = row * static_cast<size_t>(Dn);
  kt.bytes.resize(slab * static_cast<size_t>(H));
  pool_.ParallelFor(H, 1, [&](int64_t b, int64_t e, int) {
    std::vector<float> W(static_cast<size_t>(Kr * Dn)), col(static_cast<size_t>(Kr));
    for (int64_t h = b; h < e; ++h) {
      for (int64_t k = 0; k < Kr; ++k) kernels::DequantizeRow(w->dtype, w->Row(h * Kr + k), W.data() + k * Dn, Dn);
      for (int64_t d = 0; d < Dn; ++d) {
        for (int64_t k = 0; k < Kr; ++k) col[static_cast<size_t>(k)] = W[static_cast<size_t>(k * Dn + d)];
        uint8_t* dst = kt.bytes.data() + static_cast<size_t>(h) * slab + static_cast<size_t>(d) * row;
        if (to == DType::kF32) {
          std::memcpy(dst, col.data(), row);
        } else {
          kernels::QuantizeRow(to, col.data(), dst, Kr);
        }
      }
    }
  });
  kt.view.name = w->name + "^T";
  kt.view.dtype = to;
  kt.view.n_dims = 3;
  kt.view.ne[0] = Kr;
  kt.view.ne[1] = Dn;
  kt.view.ne[2] = H;
  kt.view.data = kt.bytes.data();
  const WeightLayout layout = kernels::RepackLayout(to, Kr, Dn);
  if (layout != WeightLayout::kRows) {
    kt.tiles = HugePageBuffer(kt.bytes.size());
    for (int64_t h = 0; h < H; ++h)
      kernels::Repack(to, layout, kt.bytes.data() + static_cast<size_t>(h) * slab, kt.tiles.data() + static_cast<size_t>(h) * slab, Kr, Dn);
    std::vector<uint8_t>().swap(kt.bytes);
    kt.view.data = kt.tiles.data();
    kt.view.layout = layout;
  }
  return kt.view;
}

// Expanded MLA for one sequence (segment si): its cached latent rows [c | k_pe] (this chunk's
// included) widened once; every position's keys [c W_kb,h^T | k_pe] and values W_vb,h c
// decompressed for all heads in one pass of the pool; then per head and block of queries two
// GEMMs and a causal softmax, as MlaPlain does.
void Forward::MlaExpanded(int il, int si) {
  const LayerWeights& L = model_.layers[il];
  const int64_t H = c_.n_head, Dk = c_.n_embd_head_k, Dn = c_.qk_nope(), Dr = c_.n_rot, Dv = c_.n_embd_head_v;
  const int64_t Kr = c_.n_lora_kv, W = Kr + Dr;
  const Segment& sg = segments_[si];
  const KvCache& cache = *sg.cache;
  const int first = cache.n_past();  // the chunk's rows are stored already
  const int n_keys = first + sg.n;
  const TensorView& kbt = MlaKbT(il);
  const TensorView& vb = *L.wv_b;
  // The latent rows as floats, and their first Kr values converted for both products.
  const kernels::KvRows Cc = cache.KRows(il);
  const size_t elem = cache.elem();
  mla_rows_.resize(static_cast<size_t>(n_keys) * W);
  const DType tk = kbt.dtype, tv = vb.dtype;
  const size_t rbk = kernels::ActivationRowBytes(tk, Kr), rbv = kernels::ActivationRowBytes(tv, Kr);
  mla_act_[0].resize(rbk * n_keys);
  mla_act_[1].resize(rbv * n_keys);
  ForEachRow(n_keys, [&](int j) {
    float* r = F(mla_rows_, static_cast<size_t>(j) * W);
    cache.Load(static_cast<const uint8_t*>(Cc.base) + static_cast<size_t>(Cc.Offset(j)) * elem, W, r);
    kernels::ConvertActivations(tk, r, mla_act_[0].data() + j * rbk, Kr);
    kernels::ConvertActivations(tv, r, mla_act_[1].data() + j * rbv, Kr);
  });
  // Keys [n_keys][H][Dk] (the nope part per head, then the shared rotated part) and values
  // [n_keys][H][Dv]: (head, row chunk) items of both products in one pass.
  mla_keys_.resize(static_cast<size_t>(n_keys) * H * Dk);
  mla_vals_.resize(static_cast<size_t>(n_keys) * H * Dv);
  struct Item { int kind, h; int64_t r0, r1; };
  std::vector<Item> items;
  for (int kind = 0; kind < 2; ++kind) {
    const int64_t rows = kind == 0 ? Dn : Dv;
    const int64_t grain = RowGrain(rows, n_keys, pool_.size());
    for (int h = 0; h < H; ++h)
      for (int64_t r = 0; r < rows; r += grain) items.push_back({kind, h, r, std::min(rows, r + grain)});
  }
  pool_.ParallelFor(static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) {
      const Item& it = items[static_cast<size_t>(i)];
      if (it.kind == 0) {
        kernels::MatMul(tk, kbt.Slab(it.h), Kr, it.r0, it.r1, mla_act_[0].data(), rbk, n_keys,
                        F(mla_keys_, static_cast<size_t>(it.h) * Dk + it.r0), H * Dk, kbt.layout);
      } else {
        kernels::MatMul(tv, vb.Slab(it.h), Kr, it.r0, it.r1, mla_act_[1].data(), rbv, n_keys,
                        F(mla_vals_, static_cast<size_t>(it.h) * Dv + it.r0), H * Dv, vb.layout);
      }
    }
  });
  ForEachRow(n_keys, [&](int j) {  // every head's rotated key part: the cache's k_pe
    for (int64_t h = 0; h < H; ++h)
      std::memcpy(F(mla_keys_, (static_cast<size_t>(j) * H + h) * Dk + Dn), F(mla_rows_, static_cast<size_t>(j) * W + Kr),
                  Dr * sizeof(float));
  });
  // Attention: (head, block of queries) items, each two GEMMs over the positions its last
  // query sees.
  attn_items_.clear();
  for (int i = 0; i < sg.n; i += kAttnBlock)
    for (int h = 0; h < H; ++h) attn_items_.push_back({si, sg.t0 + i, std::min(kAttnBlock, sg.n - i), h, true});
  pool_.ParallelFor(static_cast<int64_t>(attn_items_.size()), 1, [&](int64_t b, int64_t e, int thread) {
    float* S = scores_.data() + thread * scores_per_thread_;
    for (int64_t item = b; item < e; ++item) {
      const AttnItem& it = attn_items_[static_cast<size_t>(item)];
      const int64_t h = it.head;
      const int t0 = it.t, rows = it.rows, q0 = first + (it.t - sg.t0);  // the block's first position
      CausalAttentionGemm(F(q_, (t0 * H + h) * Dk), H * Dk, F(mla_keys_, h * Dk), H * Dk, F(mla_vals_, h * Dv), H * Dv, Dk,
                          Dv, q0, rows, kq_scale_, S, F(att_, (t0 * H + h) * Dv), H * Dv);
    }
  });
}

// Absorbed MLA (DeepSeek-V2's inference form, as llama.cpp runs it): head h's query against the
// latent c is q_nope W_kb,h (Kr wide) next to its rotated part, so all heads attend to the one
// shared cache row [c | k_pe] (MQA with head size Kr + Dr); the attention output, a mix of c, goes
// through W_vb,h. Rows of the score GEMMs are (token, head) pairs, H per token.
void Forward::MlaAbsorbed(int il, int r0, int r1) {
  const LayerWeights& L = model_.layers[il];
  const int64_t H = c_.n_head, Dk = c_.n_embd_head_k, Dn = c_.qk_nope(), Dr = c_.n_rot, Dv = c_.n_embd_head_v;
  const int64_t Kr = c_.n_lora_kv, W = Kr + Dr;
  const int T = r1 - r0;
  qabs_.resize(static_cast<size_t>(r1 * H * W));
  lat_.resize(static_cast<size_t>(r1 * H * Kr));
  HeadLinears(*L.wk_b, F(q_, r0 * H * Dk), H * Dk, Dk, T, F(qabs_, r0 * H * W), H * W, W);  // q_nope -> latent space
  for (int64_t g = r0 * H; g < r1 * H; ++g) std::memcpy(F(qabs_, g * W + Kr), F(q_, g * Dk + Dn), Dr * sizeof(float));
  // Blocks of (token, head) rows within one sequence (a row's results do not depend on its
  // block-mates: the value GEMM's extra keys have zero weights, and its sums are blocked at fixed
  // key offsets). Fewer than kAttnBlock new tokens (decode): one token's heads per item, at most
  // kAttnBlock, split over the threads, through kernels::Attend (each latent row read once for all
  // the item's heads, no packing); more: the sequence's rows split over the threads, at most
  // kMlaBlock per block, each block two GEMMs.
  attn_items_.clear();
  for (int si = 0; si < static_cast<int>(segments_.size()); ++si) {
    const Segment& sg = segments_[si];
    if (sg.t0 < r0 || sg.t0 >= r1) continue;
    if (sg.n < kAttnBlock) {
      const int64_t parts = std::min<int64_t>(H, (pool_.size() + sg.n - 1) / sg.n);
      const int per = static_cast<int>(std::min<int64_t>(kAttnBlock, (H + parts - 1) / parts));
      for (int i = 0; i < sg.n; ++i)
        for (int h = 0; h < H; h += per)
          attn_items_.push_back({si, static_cast<int>((sg.t0 + i) * H + h), std::min(per, static_cast<int>(H) - h), 0, false});
      continue;
    }
    const int64_t rows_all = sg.n * H;
    const int64_t fit = static_cast<int64_t>(scores_per_thread_) / (sg.cache->n_past() + sg.n);  // >= kAttnBlock
    const int64_t per = std::clamp<int64_t>((rows_all + pool_.size() - 1) / pool_.size(), 1,
                                            std::clamp<int64_t>(fit, kAttnBlock, kMlaBlock));
    for (int64_t g0 = 0; g0 < rows_all; g0 += per)
      attn_items_.push_back({si, static_cast<int>(sg.t0 * H + g0), static_cast<int>(std::min(per, rows_all - g0)), 0, true});
  }
  ReserveWidening(static_cast<size_t>(W), true);
  // Each thread widens a sequence's latent rows once and extends them as its items reach further.
  widened_.assign(static_cast<size_t>(pool_.size()), {-1, 0});
  pool_.ParallelFor(static_cast<int64_t>(attn_items_.size()), 1, [&](int64_t b, int64_t e, int thread) {
    float* S = scores_.data() + thread * scores_per_thread_;  // [rows][n_keys]
    auto& [widened_seg, widened_rows] = widened_[static_cast<size_t>(thread)];
    for (int64_t item = b; item < e; ++item) {
      const AttnItem& it = attn_items_[item];
      const Segment& sg = segments_[it.seg];
      const KvCache& cache = *sg.cache;
      const kernels::KvRows Cc = cache.KRows(il);
      const int64_t g0 = it.t, rows = it.rows;  // global (token, head) rows g = t * H + h
      const int base = cache.n_past() - sg.t0;  // position = base + token row
      if (!it.batched) {  // one token's heads: MQA over the latent rows [c | k_pe], values c
        kernels::Attend(kernels::AttendRows{F(qabs_, g0 * W), W, F(lat_, g0 * Kr), Kr, static_cast<int>(rows)},
                        cache.type(), Cc, W, Cc, Kr, base + g0 / H + 1, kq_scale_, S);
        continue;
      }
      const int n_keys = base + static_cast<int>((g0 + rows - 1) / H) + 1;  // the last row's keys
      if (widened_seg != it.seg) widened_seg = it.seg, widened_rows = 0;
      const float* C = CacheRowsF32(cache, Cc, std::max(n_keys, widened_rows), thread, 0, widened_rows);
      if (C != Cc.base) widened_rows = std::max(n_keys, widened_rows);
      kernels::Gemm(kernels::GemmOp::kNT, static_cast<int>(rows), n_keys, static_cast<int>(W), F(qabs_, g0 * W),
                    static_cast<int>(W), C, static_cast<int>(W), S, n_keys, false);
      for (int64_t i = 0; i < rows; ++i)
        CausalSoftmaxRow(S + i * n_keys, base + static_cast<int>((g0 + i) / H) + 1, n_keys, kq_scale_);
      kernels::Gemm(kernels::GemmOp::kNN, static_cast<int>(rows), static_cast<int>(Kr), n_keys, S, n_keys, C,
                    static_cast<int>(W), F(lat_, g0 * Kr), static_cast<int>(Kr), false);
    }
  });
  HeadLinears(*L.wv_b, F(lat_, r0 * H * Kr), H * Kr, Kr, T, F(att_, r0 * H * Dv), H * Dv, Dv);  // latent -> values
}

// Plain MLA: per head, the keys [c W_kb,h^T | k_pe] and values c W_vb,h^T of every cached
// position decompressed, then attention as in any multi-head model. The reference form of
// MlaAbsorbed (O(context) decompression per step).
void Forward::MlaPlain(int il, int T) {
  const int64_t H = c_.n_head, Dk = c_.n_embd_head_k, Dn = c_.qk_nope(), Dr = c_.n_rot, Dv = c_.n_embd_head_v;
  const int64_t Kr = c_.n_lora_kv, W = Kr + Dr;
  att_.resize(static_cast<size_t>(T * H * Dv));
  attn_items_.clear();
  for (int si = 0; si < static_cast<int>(segments_.size()); ++si)
    for (int i = 0; i < segments_[si].n; i += kAttnBlock)
      for (int h = 0; h < H; ++h)
        attn_items_.push_back({si, segments_[si].t0 + i, std::min(kAttnBlock, segments_[si].n - i), h, true});
  ReserveWidening(static_cast<size_t>(W), false);
  pool_.ParallelFor(static_cast<int64_t>(attn_items_.size()), 1, [&](int64_t b, int64_t e, int thread) {
    float* S = scores_.data() + thread * scores_per_thread_;
    float* Kp = plain_kv_.data() + static_cast<size_t>(thread) * n_ctx_ * (Dk + Dv);  // [n_keys][Dk]
    for (int64_t item = b; item < e; ++item) {
      const AttnItem& it = attn_items_[item];
      const Segment& sg = segments_[it.seg];
      const KvCache& cache = *sg.cache;
      const int n_keys_all = cache.n_past() + (it.t - sg.t0) + it.rows;
      const float* C = CacheRowsF32(cache, cache.KRows(il), n_keys_all, thread, 0);
      const int64_t h = it.head;
      const int t0 = it.t, rows = it.rows, first = sg.cache->n_past() + (it.t - sg.t0);
      const int n_keys = first + rows;
      float* Vp = Kp + static_cast<size_t>(n_keys) * Dk;  // [n_keys][Dv]
      const float* kb = mla_kb_[il].data() + h * Kr * Dn;  // [Kr][Dn]
      const float* vb = mla_vb_[il].data() + h * Dv * Kr;  // [Dv][Kr]
      kernels::Gemm(kernels::GemmOp::kNN, n_keys, static_cast<int>(Dn), static_cast<int>(Kr), C, static_cast<int>(W),
                    kb, static_cast<int>(Dn), Kp, static_cast<int>(Dk), false);
      for (int j = 0; j < n_keys; ++j) std::memcpy(Kp + j * Dk + Dn, C + j * W + Kr, Dr * sizeof(float));
      kernels::Gemm(kernels::GemmOp::kNT, n_keys, static_cast<int>(Dv), static_cast<int>(Kr), C, static_cast<int>(W),
                    vb, static_cast<int>(Kr), Vp, static_cast<int>(Dv), false);
      CausalAttentionGemm(F(q_, (t0 * H + h) * Dk), H * Dk, Kp, Dk, Vp, Dv, Dk, Dv, first, rows, kq_scale_, S,
                          F(att_, (t0 * H + h) * Dv), H * Dv);
    }
  });
}

void Forward::DenseFfn(int il, int T) {
  const LayerWeights& L = model_.layers[il];
  const int64_t N = c_.n_ff;
  sg_.resize(static_cast<size_t>(T) * N);
  su_.resize(static_cast<size_t>(T) * N);
  const TensorView* gu[2] = {L.ffn_gate, L.ffn_up};
  float* gu_out[2] = {sg_.data(), su_.data()};
  Linears(gu, gu_out, 2, h_.data(), T);
  for (int t = 0; t < T; ++t) kernels::SiluMul(F(sg_, t * N), F(su_, t * N), F(sg_, t * N), N);
  Linear(*L.ffn_down, sg_.data(), T, tmp_.data());
}

void Forward::MoeFfn(int il, const int32_t* tokens, int T) {
  const LayerWeights& L = model_.layers[il];
  const MoeLayerConfig& mc = c_.moe;
  const int64_t E = c_.n_embd, Fx = c_.n_ff_exp;
  const int X = mc.n_expert, K = mc.k, R = mc.router_width();
  const float* logits = nullptr;
  if (mc.router != MoeRouterKind::kHash) {  // hash routing needs no router logits
    router_.resize(static_cast<size_t>(T) * R);
    Linear(*L.gate_inp, h_.data(), T, router_.data());  // ffn_moe_logits [T][R]
    if (mc.gating_residual) {
      if (L.gate_res) {  // logits += W_g . (the previous layer's logits)
        for (int t = 0; t < T; ++t) {
          const float* prev = F(prev_router_, static_cast<size_t>(t) * R);
          for (int e = 0; e < R; ++e)
            router_[static_cast<size_t>(t) * R + e] += kernels::DotF32(L.gate_res->F32() + static_cast<size_t>(e) * R, prev, R);
        }
      }
      prev_router_ = router_;
    }
    logits = router_.data();
  }
  probs_.resize(static_cast<size_t>(T) * R);
  gate_w_.resize(static_cast<size_t>(T) * K);
  RouteOptions ro;
  ro.token_ids = tokens;
  Route(mc, logits, T, L.exp_probs_b ? L.exp_probs_b->F32() : nullptr, ro, probs_.data(),
        static_cast<float*>(nullptr), gate_w_.data(), &plan_);
  if (observer_) observer_(il, T, logits, logits ? probs_.data() : nullptr, tokens, plan_);

  const int S = plan_.n_rows();  // rows of the FFN experts, in expert order below
  const DType gt = L.gate_exps->dtype, ut = L.up_exps->dtype, dt = L.down_exps->dtype;
  const size_t rbg = kernels::ActivationRowBytes(gt, E);
  const size_t rbu = kernels::ActivationRowBytes(ut, E);
  const bool same_up = VecDotType(gt) == VecDotType(ut);
  // Convert each token once, and copy it to its rows in expert order.
  act_.resize(rbg * T);
  xg_.resize(rbg * S);
  if (!same_up) {
    act2_.resize(rbu * T);
    xg2_.resize(rbu * S);
  }
  ForEachRow(T, [&](int t) {
    kernels::ConvertActivations(gt, F(h_, t * E), act_.data() + t * rbg, E);
    if (!same_up) kernels::ConvertActivations(ut, F(h_, t * E), act2_.data() + t * rbu, E);
    for (int j = 0; j < K; ++j) {
      const int p = plan_.slot_position[t * K + j];
      if (p < 0) continue;
      std::memcpy(xg_.data() + p * rbg, act_.data() + t * rbg, rbg);
      if (!same_up) std::memcpy(xg2_.data() + p * rbu, act2_.data() + t * rbu, rbu);
    }
  });
  const uint8_t* xu = same_up ? xg_.data() : xg2_.data();
  const size_t rbu_eff = same_up ? rbg : rbu;

  // Work items: (expert, row chunk) over the active experts only.
  // One expert projection over the active experts: out[pos][rows] for the expert-sorted
  // activation rows x (row bytes rb), split into (expert, row chunk) work items.
  // align: row chunks start at multiples of it (the gate/up chunks convert their SwiGLU outputs
  // for the down projection themselves, in whole activation blocks).
  // plan_items returns the largest item's outputs (tokens x rows); product gets the thread too.
  struct Item { int e; int64_t r0, r1; };
  std::vector<Item> items;
  auto plan_items = [&](int64_t rows, int64_t align) {
    items.clear();
    int64_t most = 0;
    for (int e = 0; e < X; ++e) {
      const int n = plan_.tokens_per_expert[e];
      if (n == 0) continue;
      const int64_t grain = ExpertGrain(rows, n, pool_.size(), align);
      for (int64_t r = 0; r < rows; r += grain) {
        const int64_t r1 = std::min(rows, r + grain);
        items.push_back({e, r, r1});
        most = std::max(most, n * (r1 - r));
      }
    }
    return most;
  };
  auto run_items = [&](auto&& product) {
    pool_.ParallelFor(static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e, int thread) {
      for (int64_t i = b; i < e; ++i) {
        const Item& it = items[i];
        product(it.e, plan_.expert_offsets[it.e], plan_.tokens_per_expert[it.e], it.r0, it.r1, thread);
      }
    });
  };
  // Importance statistics: each expert's input rows (its tokens' normalised states), and below
  // the down projection's (the SwiGLU outputs).
  const auto observe_experts = [&](const TensorView& w, const float* base, int64_t stride, bool by_token) {
    if (!input_observer_) return;
    for (int e = 0; e < X; ++e) {
      const int n = plan_.tokens_per_expert[e], off = plan_.expert_offsets[e];
      if (n == 0) continue;
      observed_rows_.resize(static_cast<size_t>(n));
      for (int i = 0; i < n; ++i) {
        const int p = off + i;
        observed_rows_[i] = base + (by_token ? plan_.sorted_slots[p] / K : p) * stride;
      }
      input_observer_(w, e, observed_rows_.data(), n);
    }
  };
  observe_experts(*L.gate_exps, h_.data(), E, true);
  observe_experts(*L.up_exps, h_.data(), E, true);
  g_.resize(static_cast<size_t>(S) * Fx);
  // Each gate/up chunk also applies SwiGLU to its rows and converts them for the down
  // projection (whole blocks of the down weights' activation type: one pass of the pool less
  // per layer, and no single-threaded SwiGLU when a step has few tokens). Its up-projection rows
  // live only until then, in its thread's part of u_ (a 512-token chunk of the DeepSeek-like
  // model held 19 MB of them in a buffer for all the expert rows).
  const size_t rbd = kernels::ActivationRowBytes(dt, Fx);
  const int64_t act_block = Traits(VecDotType(dt)).block_size;
  aq_.resize(rbd * S);
  const size_t u_per_thread = static_cast<size_t>(plan_items(Fx, act_block));
  u_.resize(std::max(u_.size(), u_per_thread * pool_.size()));
  run_items([&](int e, int off, int n, int64_t r0, int64_t r1, int thread) {
    float* u = u_.data() + thread * u_per_thread;  // [n][r1 - r0]
    kernels::MatMul(gt, L.gate_exps->Slab(e), E, r0, r1, xg_.data() + off * rbg, rbg, n,
                    F(g_, static_cast<size_t>(off) * Fx + r0), Fx, L.gate_exps->layout);
    kernels::MatMul(ut, L.up_exps->Slab(e), E, r0, r1, xu + off * rbu_eff, rbu_eff, n, u, r1 - r0,
                    L.up_exps->layout);
    for (int64_t p = off; p < off + n; ++p) {
      float* g = F(g_, p * Fx + r0);
      kernels::SiluMul(g, u + (p - off) * (r1 - r0), g, r1 - r0);
      kernels::ConvertActivations(dt, g, aq_.data() + p * rbd + kernels::ActivationRowBytes(dt, r0), r1 - r0);
    }
  });
  observe_experts(*L.down_exps, g_.data(), Fx, false);
  y_.resize(static_cast<size_t>(S) * E);
  plan_items(E, 1);
  run_items([&](int e, int off, int n, int64_t r0, int64_t r1, int) {
    kernels::MatMul(dt, L.down_exps->Slab(e), Fx, r0, r1, aq_.data() + off * rbd, rbd, n,
                    F(y_, static_cast<size_t>(off) * E + r0), E, L.down_exps->layout);
  });
  // Combine in selection order (deterministic and independent of batch-mates): FFN rows, and the
  // zero-computation targets (null and zero: nothing; copy: x; constant: a1 x + a2 v).
  const int const0 = R - mc.n_const;
  ForEachRow(T, [&](int t) {
    float* out = F(tmp_, t * E);
    const float* xt = F(h_, t * E);
    std::fill(out, out + E, 0.0f);
    for (int j = 0; j < K; ++j) {
      const int slot = t * K + j;
      const int id = plan_.expert_ids[slot];
      if (id < 0) continue;  // unused slot (top_p)
      const float w = plan_.weights[slot];
      switch (mc.TargetKind(id)) {
        case MoeTargetKind::kFfn:
          kernels::Axpy(w, F(y_, static_cast<size_t>(plan_.slot_position[slot]) * E), out, E);
          break;
        case MoeTargetKind::kNull:
        case MoeTargetKind::kZero:
          break;
        case MoeTargetKind::kCopy:
          kernels::Axpy(w, xt, out, E);
          break;
        case MoeTargetKind::kConst: {
          const int ci = id - const0;
          const float* wc = L.zc_mix->F32() + static_cast<size_t>(ci) * 2 * E;
          float a[2] = {kernels::DotF32(wc, xt, E), kernels::DotF32(wc + E, xt, E)};
          kernels::Softmax(a, 2);
          kernels::Axpy(w * a[0], xt, out, E);
          kernels::Axpy(w * a[1], L.zc_const->F32() + static_cast<size_t>(ci) * E, out, E);
          break;
        }
      }
    }
  });

  if (L.gate_shexp) {  // shared expert (qwen2moe: scaled by sigmoid(gate_inp_shexp . x))
    const int64_t Sh = c_.n_ff_shexp;
    sg_.resize(static_cast<size_t>(T) * Sh);
    su_.resize(static_cast<size_t>(T) * Sh);
    const TensorView* gu[2] = {L.gate_shexp, L.up_shexp};
    float* gu_out[2] = {sg_.data(), su_.data()};
    Linears(gu, gu_out, 2, h_.data(), T);
    for (int t = 0; t < T; ++t) kernels::SiluMul(F(sg_, t * Sh), F(su_, t * Sh), F(sg_, t * Sh), Sh);
    shout_.resize(static_cast<size_t>(T) * E);
    Linear(*L.down_shexp, sg_.data(), T, shout_.data());  // [T][n_embd]
    for (int t = 0; t < T; ++t) {
      float gate = 1.0f;
      if (L.gate_inp_shexp) {
        const float z = kernels::DotF32(L.gate_inp_shexp->F32(), F(h_, t * E), E);
        gate = 1.0f / (1.0f + std::exp(-z));
      }
      kernels::Axpy(gate, F(shout_, t * E), F(tmp_, t * E), E);
    }
  }
}

}  // namespace moe
