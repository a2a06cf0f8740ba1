// The forward pass of every supported architecture (they differ only in the traits of
// ModelConfig), with its KV cache and scratch buffers. Tokens are evaluated in batches
// (prefill) or one at a time (decode); routed experts run grouped by expert (RoutingPlan).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "kernels/kernels.h"
#include "model/model.h"
#include "moe/routing.h"
#include "util/memory.h"
#include "util/threadpool.h"

namespace moe {

// llama.cpp's RoPE scaling for a config (linear, or YaRN with its attention factor and
// correction dimensions), and the scale of its attention scores (deepseek2: YaRN's mscale^2 /
// sqrt(qk_nope + qk_rope); else 1 / sqrt(head_dim)).
kernels::RopeScaling RopeScalingOf(const ModelConfig& c);
// The context a Forward (or a server's sequence) gets when none is asked for: the model's
// training context, at most 4096.
int DefaultContext(const ModelConfig& c);
float AttentionScale(const ModelConfig& c);

// Bytes of one KV cache element, and the --cache-type value it comes from ("f32" or "f16";
// anything else throws moe::Error naming the flag).
inline size_t KvElementBytes(DType t) { return t == DType::kF16 ? 2 : sizeof(float); }
DType ParseCacheType(const std::string& s);

// One sequence's KV cache: the keys and values (MLA: the latent rows) of positions
// 0 .. n_past()-1 of every layer, for up to n_ctx positions, in F32 or F16 (type: half the
// memory and half the bytes attention reads, llama.cpp's default; the rows are rounded to
// nearest even as they are stored, and attention widens them to F32 as it loads them). Forward
// owns one for its single-sequence API; a server gives each of its sequences its own
// (Forward::EvalBatch).
class KvCache {
 public:
  // Positions per page (a cache holds whole pages: see the layout below).
  static constexpr int kPagePositions = 256;

  // page_positions: a multiple of kernels::kAttendKeys (other values than the default: tests).
  KvCache(const ModelConfig& c, int n_ctx, DType type = DType::kF32, int page_positions = kPagePositions);
  int n_past() const { return n_past_; }
  int n_ctx() const { return n_ctx_; }
  DType type() const { return type_; }
  void Reset() { n_past_ = 0; }
  // Keeps positions [0, n) and drops the rest (0 <= n <= n_past): the rows of a prompt's prefix
  // stay for a later sequence that starts with it (runtime/engine.h, prefix reuse).
  void Truncate(int n);
  // Bytes of n_ctx positions (the memory once the whole context is used).
  size_t Bytes() const { return static_cast<size_t>(n_ctx_) * pos_bytes_; }
  // Makes the pages that hold positions [0, positions) resident (util/memory.h PopulatePages),
  // so that a growing context is written to populated memory instead of faulting a page at a
  // time (16 faults of about 10 us each per decoded token on the medium model had been 5% of
  // decode on the VM).
  void Reserve(int positions);

 private:
  friend class Forward;
  // Layout: pages of page_ positions, back to back in huge pages (util/memory.h
  // HugePageBuffer). Page p holds positions [p page_, (p + 1) page_) of every layer: the K
  // heads' rows [n_layer][k_heads][page_][k_dim], then the V heads' [n_layer][v_heads][page_][v_dim].
  // So a head's rows are contiguous within a page (attention streams them, kernels::KvRows), a
  // context makes resident only the pages it reached, and the stores of a decode step (every
  // layer's and head's row of one position) fall in one page's huge pages instead of one
  // 4 KiB page each (measured: 3x faster stores, a 16-sequence step 2-7% faster, medium q4_0).
  kernels::KvRows KRows(uint32_t layer, int head = 0) const { return Rows(RowOffset(layer, head, 0, k_heads_, k_dim_, 0), k_dim_); }
  kernels::KvRows VRows(uint32_t layer, int head = 0) const { return Rows(RowOffset(layer, head, 0, v_heads_, v_dim_, v_at_), v_dim_); }
  uint8_t* KRow(uint32_t layer, int head, int pos) { return buf_.data() + RowOffset(layer, head, pos, k_heads_, k_dim_, 0); }
  uint8_t* VRow(uint32_t layer, int head, int pos) { return buf_.data() + RowOffset(layer, head, pos, v_heads_, v_dim_, v_at_); }
  // Stores dim floats as a row (from KRow or VRow); Load reads dim elements back as floats.
  void Store(uint8_t* row, size_t dim, const float* x);
  void Load(const uint8_t* row, size_t dim, float* x) const;
  size_t elem() const { return KvElementBytes(type_); }  // bytes per element
  size_t RowOffset(uint32_t layer, int head, int pos, size_t heads, size_t dim, size_t at) const {
    const size_t page = static_cast<size_t>(pos / page_), in = static_cast<size_t>(pos % page_);
    return page * page_bytes_ + at + ((layer * heads + static_cast<size_t>(head)) * page_ + in) * dim * elem();
  }
  kernels::KvRows Rows(size_t offset, size_t dim) const {
    return kernels::KvRows{buf_.data() + offset, static_cast<int64_t>(dim), page_,
                           static_cast<int64_t>(page_bytes_ / elem())};
  }
  HugePageBuffer buf_;
  DType type_ = DType::kF32;
  size_t k_heads_ = 0, k_dim_ = 0, v_heads_ = 0, v_dim_ = 0;  // heads per layer, elements per head and position
  size_t pos_bytes_ = 0;   // one position's rows, all layers and heads
  size_t page_bytes_ = 0;  // page_ positions
  size_t v_at_ = 0;        // the V rows' offset in a page
  int page_ = 0;           // positions per page: a multiple of kernels::kAttendKeys
  int n_ctx_ = 0;
  int n_past_ = 0;
  int reserved_pages_ = 0;  // pages Reserve made resident
  uint32_t n_layer_ = 0;
};

// One sequence's part of a batch: n tokens appended to its cache; logits, if not null, receives
// the last token's [n_vocab].
struct SeqBatch {
  KvCache* cache = nullptr;
  const int32_t* tokens = nullptr;
  int n = 0;
  float* logits = nullptr;
};

class Forward {
 public:
  // n_ctx: KV cache length in tokens (0 = the model's training context, capped at 4096).
  // Throws moe::Error if the model's router cannot be served (expert_choice is training-only).
  // kv_type: the single-sequence cache's type (kF32 or kF16; EvalBatch takes each cache's own).
  Forward(const Model& model, ThreadPool& pool, int n_ctx = 0, int n_batch = 256, DType kv_type = DType::kF32);

  // Evaluates tokens at positions n_past() .. n_past() + n - 1 and appends them to the cache.
  // all_logits: logits of every position go to logits [n][n_vocab]; else only the last
  // position's [n_vocab]. Throws moe::Error if a token id is out of range or the context is full.
  void Eval(const int32_t* tokens, int n, bool all_logits, std::vector<float>* logits);

  // Several sequences in one pass: their tokens (at most n_batch in all; each cache's n_ctx at
  // most this Forward's) go through every layer together, the routed experts grouped across
  // sequences, attention per sequence over its own cache. Each token's result is the same as in
  // any other batch up to the kernels' batch invariance (kernels::SetBatchInvariant): attention
  // takes the batched or the per-token path by the sequence's own n, never by the batch's.
  void EvalBatch(const SeqBatch* seqs, int n_seqs);

  // Called after each MoE layer routes a chunk of tokens (telemetry, tests): the layer, the
  // chunk's router logits and the probabilities it ranked [n_tokens][R] (both nullptr for hash
  // routing), its token ids and the plan.
  using RoutingObserver = std::function<void(int layer, int n_tokens, const float* logits, const float* probs,
                                             const int32_t* tokens, const RoutingPlan& plan)>;
  void SetRoutingObserver(RoutingObserver fn) { observer_ = std::move(fn); }

  // Called with the float input rows of every weight product (importance matrices): the weight,
  // the matrix within it (the expert of a 3-D expert tensor, else 0) and n rows of W.ne[0]
  // floats. Called from the calling thread, before the product.
  using InputObserver =
      std::function<void(const TensorView& w, int matrix, const float* const* rows, int n)>;
  void SetInputObserver(InputObserver fn) { input_observer_ = std::move(fn); }

  // deepseek2 only: how multi-head latent attention is computed. The forms are the same
  // function; they differ in rounding, and tests compare them.
  //   kAbsorbed: the up-projections folded into the query and the output, llama.cpp's form and
  //     roundings (q_nope and the attention's latent mix are converted for the attn_k_b and
  //     attn_v_b products as llama.cpp converts them): every head attends to the latent cache
  //     rows, (Kr + Dr) + Kr multiply-adds per query and key (576 + 512 at DeepSeek-V2's sizes).
  //   kExpanded: a long chunk (a prompt) of a sequence expands instead when that costs fewer
  //     multiply-adds (MlaPrefersExpanded): every cached position's keys [c W_kb,h^T | k_pe] and
  //     values W_vb,h c decompressed for all heads once per layer, then ordinary attention,
  //     Dk + Dv multiply-adds per query and key (192 + 128); decode and short chunks stay
  //     absorbed. With quantized attn_k_b / attn_v_b the products round differently from
  //     llama.cpp's (the latent rows are converted instead of q_nope and the mix; attn_k_b is
  //     transposed into q8_0): on the conformance models about as far from llama.cpp as the
  //     exact f32 computation is (0.02-0.04 nats median, up to 0.11).
  //   kAuto (the default): kExpanded where it computes llama.cpp's numbers up to float rounding
  //     (f32 attn_k_b and attn_v_b, as `moe train` writes), else kAbsorbed.
  //   With an input observer (importance statistics) every form but kPlain runs absorbed: the
  //   statistics are of the inputs llama.cpp's graph gives attn_k_b and attn_v_b.
  //   kPlain: the reference: the expanded form with dequantized f32 weights, decompressed again
  //     for every block of queries. Needs the weights in the file's layout (no repacking).
  enum class MlaForm { kAuto, kAbsorbed, kExpanded, kPlain };
  void SetMlaForm(MlaForm form);

  int n_past() const { return own_.n_past(); }
  int n_ctx() const { return n_ctx_; }
  int n_batch() const { return n_batch_; }
  uint32_t n_vocab() const { return c_.n_vocab; }
  void Reset() { own_.Reset(); }
  size_t KvCacheBytes() const { return own_.Bytes(); }

 private:
  // A run of the chunk's rows that belongs to one sequence.
  struct Segment {
    KvCache* cache;
    int t0, n;
  };
  // Where the logits of a row go.
  struct OutRow {
    int row;
    float* dest;
  };
  // The chunk's T rows (segments_ set) through every layer; then the logits of outs (contiguous:
  // they are consecutive rows whose destinations follow each other from contiguous).
  void EvalChunk(const int32_t* tokens, int T, const std::vector<OutRow>& outs, float* contiguous);
  void CheckTokens(const int32_t* tokens, int n) const;
  // fn(t) for every row t < T of the chunk, over the pool when there are several: for the
  // per-token work between the matrix products (norms, RoPE, cache writes, residuals), which
  // would otherwise run on one thread while the others wait. A row's work touches only its own
  // rows of the scratch and its own cache row, so the result does not depend on the split.
  template <class Fn>
  void ForEachRow(int T, const Fn& fn);
  // Batched attention wants a head's rows as one F32 array: over F16 caches, or past a cache's
  // first page, it widens or gathers them into per-thread room first. ReserveWidening sizes it
  // (n_ctx positions of floats_per_pos per thread) before a pass that needs it (batched_only:
  // only sequences with kAttnBlock or more new tokens take the GEMM path); CacheRowsF32 gives
  // rows [0, n) of a head as floats: the cache's own memory for F32 rows within one page, else
  // copied or widened into the thread's room at offset floats; rows below `from` are taken to be
  // there already (a thread that widened a shorter prefix of the same rows extends it).
  void ReserveWidening(size_t floats_per_pos, bool batched_only);
  const float* CacheRowsF32(const KvCache& cache, const kernels::KvRows& rows, int n, int thread, size_t offset,
                            int from = 0);
  // Position of the chunk's row t in its sequence, and that sequence's cache.
  int RowPos(int t) const;
  KvCache* RowCache(int t) const;
  void Attention(int layer, int T);
  // deepseek2's multi-head latent attention: q and the latent KV, the cache, attention (each
  // sequence absorbed or expanded, or all plain: MlaForm), the output projection into tmp_.
  void MlaAttention(int layer, int T);
  // Absorbed attention for the rows [r0, r1) of the chunk (whole segments).
  void MlaAbsorbed(int layer, int r0, int r1);
  void MlaPlain(int layer, int T);
  // Expanded attention for segment si (kExpanded above).
  void MlaExpanded(int layer, int si);
  // Whether segment si takes the expanded form: the form allows it for the layer's weights and
  // it costs fewer multiply-adds than the absorbed one.
  bool MlaPrefersExpanded(int layer, int si) const;
  // attn_k_b transposed for the expanded keys: per head [Dn rows][Kr] (MlaKbT).
  const TensorView& MlaKbT(int layer);
  // A dense SwiGLU FFN (deepseek2's leading blocks) into tmp_.
  void DenseFfn(int layer, int T);
  // tokens [T]: the chunk's token ids (hash routing).
  void MoeFfn(int layer, const int32_t* tokens, int T);
  // Sizes the scratch buffers for a full chunk (n_batch tokens) at construction.
  void ReserveScratch();
  // y[T][out] = x[T][in] . W^T for a 2-D weight (or slab e of a 3-D one when W3 is given).
  void Linear(const TensorView& W, const float* x, int T, float* y);
  // y[i] = x W[i] for n matrices of one input width and weight type, sharing the converted
  // activations and one pass of the pool (any other mix runs them one at a time).
  void Linears(const TensorView* const* W, float* const* y, int n, const float* x, int T);
  // Per-head products of a 3-D weight W {in, out, H}: y[t*y_tok + h*y_head + r] =
  // W_h[r] . x[t*x_tok + h*x_head ...] for every token t < T and head h.
  void HeadLinears(const TensorView& W, const float* x, int64_t x_tok, int64_t x_head, int T, float* y,
                   int64_t y_tok, int64_t y_head);

  const Model& model_;
  const ModelConfig& c_;
  ThreadPool& pool_;
  int n_ctx_;
  int n_batch_;

  KvCache own_;                  // the single-sequence API's cache
  std::vector<Segment> segments_;  // the current chunk's sequences
  std::vector<int> row_seg_;       // [T] segment of each row of the chunk
  struct AttnItem {  // attention work: rows of a sequence (queries, or MLA's (token, head) rows)
    int seg, t, rows, head;
    bool batched;
  };
  std::vector<AttnItem> attn_items_;
  std::vector<int32_t> batch_tokens_;  // EvalBatch: the sequences' tokens, concatenated
  std::vector<float> out_logits_;      // EvalBatch: logits before they go to each sequence
  kernels::RopeScaling rope_;   // the model's RoPE scaling (RopeScalingOf)
  std::vector<float> rope_cos_, rope_sin_;  // [T][n_rot / 2]: each row's RoPE table (kernels::RopeTables)
  const float* RopeCos(int t) const { return rope_cos_.data() + static_cast<size_t>(t) * (c_.n_rot / 2); }
  const float* RopeSin(int t) const { return rope_sin_.data() + static_cast<size_t>(t) * (c_.n_rot / 2); }
  float kq_scale_ = 1.0f;       // scale of the attention scores
  MlaForm mla_form_ = MlaForm::kAuto;
  std::vector<std::vector<float>> mla_kb_, mla_vb_;  // plain MLA: f32 attn_k_b / attn_v_b per layer
  // Expanded MLA: attn_k_b transposed per layer (built on first use), the widened latent rows,
  // their activations and the decompressed keys and values of one sequence.
  struct KbT {
    std::vector<uint8_t> bytes;
    HugePageBuffer tiles;
    TensorView view;  // data set once built
  };
  std::vector<KbT> mla_kbt_;
  std::vector<float> mla_rows_;       // [n_keys][Kr + Dr]
  std::vector<uint8_t> mla_act_[2];   // [n_keys] the latent parts, converted for attn_k_b^T / attn_v_b
  std::vector<float> mla_keys_;       // [n_keys][H][Dk]
  std::vector<float> mla_vals_;       // [n_keys][H][Dv]

  // Scratch for one chunk of up to n_batch tokens.
  std::vector<float> x_;        // [T][n_embd]  residual stream
  std::vector<float> h_;        // [T][n_embd]  normalised input of a block
  std::vector<float> q_;        // [T][n_q]
  std::vector<float> k_;        // [T][n_k]
  std::vector<float> v_;        // [T][n_v]
  std::vector<float> att_;      // [T][n_q] (MLA: [T][H * Dv])
  std::vector<float> qa_;       // MLA: [T][q_lora_rank]
  std::vector<float> kva_;      // MLA: [T][Kr + Dr]
  std::vector<float> qabs_;     // MLA: [T][H][Kr + Dr] absorbed queries
  std::vector<float> lat_;      // MLA: [T][H][Kr] attention output in the latent space
  std::vector<float> plain_kv_;  // plain MLA: [n_threads][n_ctx][Dk + Dv] decompressed keys, values
  std::vector<float> kv_f32_;    // batched attention: [n_threads][widen_stride_] widened or gathered rows
  size_t widen_stride_ = 0;      // floats of kv_f32_ per thread (ReserveWidening)
  std::vector<std::pair<int, int>> widened_;  // MlaAbsorbed, per thread: (segment, rows) its room holds
  std::vector<float> tmp_;      // [T][n_embd]
  std::vector<float> scores_;   // [n_threads][scores_per_thread_]: [kAttnBlock queries][n_ctx]
  size_t scores_per_thread_ = 0;
  std::vector<float> router_;   // [T][R] router logits (R = c_.moe.router_width())
  std::vector<float> prev_router_;  // [T][R] the previous layer's logits (gating residual)
  std::vector<float> probs_;    // [T][R] gating output
  std::vector<float> gate_w_;   // [T][k] gate weights
  std::vector<uint8_t> act_;    // converted activations (Linear)
  struct LinearItem { int m; int64_t r0, r1; };  // (matrix, row chunk) of Linears
  std::vector<LinearItem> linear_items_;
  // Expert rows: S = the plan's FFN rows (T*k, fewer with top_p or zero-computation picks).
  std::vector<uint8_t> xg_;     // [S] gathered expert inputs, converted
  std::vector<uint8_t> act2_;   // tokens converted for the up projection when its vec-dot type differs
  std::vector<uint8_t> xg2_;    // same, gathered into expert order
  std::vector<float> g_;        // [S][n_ff_exp]
  std::vector<float> u_;        // per thread, one expert work item's up-projection rows [n][rows]
  std::vector<uint8_t> aq_;     // [S] converted activations of the down projection
  std::vector<float> y_;        // [S][n_embd]
  std::vector<float> sg_;       // [T][max(n_ff_shexp, n_ff)] shared expert / dense FFN
  std::vector<float> su_;       // [T][max(n_ff_shexp, n_ff)]
  std::vector<float> shout_;    // [T][n_embd]  shared-expert output
  RoutingPlan plan_;
  RoutingObserver observer_;
  InputObserver input_observer_;
  std::vector<const float*> observed_rows_;  // row pointers handed to input_observer_
};

// The --mla value of run, bench, eval and serve ("auto", "absorbed" or "expanded"; anything
// else throws moe::Error naming the flag).
Forward::MlaForm ParseMlaForm(const std::string& s);

}  // namespace moe
