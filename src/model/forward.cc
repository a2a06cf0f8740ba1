#include "model/forward.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>

#include "kernels/gemm.h"
#include "kernels/kernels.h"
#include "util/error.h"

namespace moe {

namespace {

// Rows of a weight matrix handed to a thread at a time. Each MatMul call prepares its
// activation rows once, so chunks must be large enough to amortise that: decode (few tokens)
// gives each thread one chunk of a matrix (measured against two and four per thread: 5-10%
// faster decode on every benchmark model, where finer chunks even out the barrier but prepare
// the activations more often; 32-row chunks had left decode at 115 tok/s where four per thread
// reached 185), prefill about two.
int64_t RowGrain(int64_t rows, int64_t n_tok, int n_threads) {
  if (n_tok <= 4) return std::max<int64_t>(32, (rows / n_threads + 15) / 16 * 16);
  const int64_t g = (rows + 2 * n_threads - 1) / (2 * n_threads);
  return std::max<int64_t>(32, (g + 15) / 16 * 16);
}

float* F(std::vector<float>& v, size_t i) { return v.data() + i; }

// Queries per block of batched (prefill) attention; fewer queries take the per-token path.
constexpr int kAttnBlock = 32;

}  // namespace

Forward::Forward(const Model& model, ThreadPool& pool, int n_ctx, int n_batch)
    : model_(model), c_(model.config()), pool_(pool), n_ctx_(n_ctx), n_batch_(n_batch) {
  if (const std::string why = UnservableRouterReason(c_); !why.empty()) throw Error(why);
  if (n_ctx_ <= 0) n_ctx_ = static_cast<int>(std::min<uint32_t>(c_.n_ctx_train ? c_.n_ctx_train : 4096, 4096));
  if (n_batch_ <= 0) n_batch_ = 256;
  k_cache_.assign(static_cast<size_t>(c_.n_layer) * n_ctx_ * c_.n_k(), 0.0f);
  v_cache_.assign(static_cast<size_t>(c_.n_layer) * n_ctx_ * c_.n_v(), 0.0f);
  scores_.resize(static_cast<size_t>(pool_.size()) * kAttnBlock * n_ctx_);
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
    for (const TensorView* w : {L.wq, L.wo, L.gate_inp, L.gate_shexp, L.down_shexp})
      if (w) rb_in = std::max(rb_in, kernels::ActivationRowBytes(w->dtype, w->ne[0]));
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
  u_.resize(S * Fx);
  y_.resize(S * E);
  if (c_.n_ff_shexp) {
    sg_.resize(T * c_.n_ff_shexp);
    su_.resize(T * c_.n_ff_shexp);
  }
}

void Forward::Eval(const int32_t* tokens, int n, bool all_logits, std::vector<float>* logits) {
  if (n <= 0) return;
  if (n_past_ + n > n_ctx_)
    Fail("context is full: %d tokens in the cache + %d new > context size %d (use a shorter prompt or fewer tokens)",
         n_past_, n, n_ctx_);
  for (int i = 0; i < n; ++i) {
    if (tokens[i] < 0 || static_cast<uint32_t>(tokens[i]) >= c_.n_vocab)
      Fail("token id %d is out of range: the vocabulary has %u tokens", tokens[i], c_.n_vocab);
  }
  logits->resize(static_cast<size_t>(all_logits ? n : 1) * c_.n_vocab);
  for (int b = 0; b < n; b += n_batch_) {
    const int m = std::min(n_batch_, n - b);
    const bool last_chunk = b + m == n;
    float* out = all_logits ? logits->data() + static_cast<size_t>(b) * c_.n_vocab
                            : (last_chunk ? logits->data() : nullptr);
    EvalChunk(tokens + b, m, all_logits, out);
  }
}

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

void Forward::EvalChunk(const int32_t* tokens, int T, bool all_logits, float* logits) {
  const int64_t E = c_.n_embd;
  x_.resize(T * E);
  h_.resize(T * E);
  tmp_.resize(T * E);
  // Embeddings: dequantize the rows of token_embd (ggml_get_rows).
  for (int t = 0; t < T; ++t)
    kernels::DequantizeRow(model_.token_embd->dtype, model_.token_embd->Row(tokens[t]), F(x_, t * E), E);

  for (uint32_t il = 0; il < c_.n_layer; ++il) {
    const LayerWeights& L = model_.layers[il];
    for (int t = 0; t < T; ++t)  // attn_norm
      kernels::RmsNorm(F(x_, t * E), L.attn_norm->F32(), E, c_.rms_eps, F(h_, t * E));
    Attention(static_cast<int>(il), T);
    for (int t = 0; t < T; ++t)  // ffn_inp = attn_out + residual
      kernels::Add(F(x_, t * E), F(tmp_, t * E), F(x_, t * E), E);
    for (int t = 0; t < T; ++t)  // ffn_norm
      kernels::RmsNorm(F(x_, t * E), L.ffn_norm->F32(), E, c_.rms_eps, F(h_, t * E));
    MoeFfn(static_cast<int>(il), tokens, T);
    for (int t = 0; t < T; ++t) kernels::Add(F(x_, t * E), F(tmp_, t * E), F(x_, t * E), E);
  }

  if (logits) {
    const int first = all_logits ? 0 : T - 1;
    const int n_out = T - first;
    for (int t = first; t < T; ++t)
      kernels::RmsNorm(F(x_, t * E), model_.output_norm->F32(), E, c_.rms_eps, F(h_, (t - first) * E));
    Linear(*model_.output, h_.data(), n_out, logits);
  }
  n_past_ += T;
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
  for (int t = 0; t < T; ++t) {
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
    const int pos = n_past_ + t;
    kernels::Rope(q, H, D, static_cast<int>(c_.n_rot), pos, c_.rope_freq_base, neox);
    kernels::Rope(k, Hkv, D, static_cast<int>(c_.n_rot), pos, c_.rope_freq_base, neox);
    float* kc = k_cache_.data() + (static_cast<size_t>(il) * n_ctx_ + pos) * nk;
    float* vc = v_cache_.data() + (static_cast<size_t>(il) * n_ctx_ + pos) * nv;
    std::memcpy(kc, k, nk * sizeof(float));
    std::memcpy(vc, F(v_, t * nv), nv * sizeof(float));
  }
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
  const float* K = k_cache_.data() + static_cast<size_t>(il) * n_ctx_ * nk;
  const float* V = v_cache_.data() + static_cast<size_t>(il) * n_ctx_ * nv;
  const int group = H / Hkv;
  if (T < kAttnBlock) {
    // Few queries (decode): one (token, head) pair per work item.
    pool_.ParallelFor(static_cast<int64_t>(T) * H, 1, [&](int64_t b, int64_t e, int thread) {
      float* s = scores_.data() + static_cast<size_t>(thread) * kAttnBlock * n_ctx_;  // [n_kv]
      for (int64_t item = b; item < e; ++item) {
        const int t = static_cast<int>(item / H), h = static_cast<int>(item % H);
        const int g = h / group;
        const int n_kv = n_past_ + t + 1;
        kernels::Attend(q_.data() + t * nq + h * D, K + g * D, nk, V + g * D, nv, n_kv, D, scale, s,
                        att_.data() + t * nq + h * D);
      }
    });
  } else {
    // Prefill: per (head, block of kAttnBlock queries), the scores of every key any of them
    // sees as one GEMM (Q K^T), masked causally and normalised row by row, then P V as another.
    const int blocks = (T + kAttnBlock - 1) / kAttnBlock;
    pool_.ParallelFor(static_cast<int64_t>(blocks) * H, 1, [&](int64_t b, int64_t e, int thread) {
      float* S = scores_.data() + static_cast<size_t>(thread) * kAttnBlock * n_ctx_;  // [rows][n_keys]
      for (int64_t item = b; item < e; ++item) {
        const int h = static_cast<int>(item % H), t0 = static_cast<int>(item / H) * kAttnBlock;
        const int rows = std::min(kAttnBlock, T - t0), g = h / group;
        const int n_keys = n_past_ + t0 + rows;  // the last query's keys
        kernels::Gemm(kernels::GemmOp::kNT, rows, n_keys, D, q_.data() + t0 * nq + h * D, static_cast<int>(nq),
                      K + g * D, static_cast<int>(nk), S, n_keys, false);
        for (int i = 0; i < rows; ++i) {
          float* s = S + static_cast<size_t>(i) * n_keys;
          const int n_kv = n_past_ + t0 + i + 1;
          for (int j = 0; j < n_kv; ++j) s[j] *= scale;
          kernels::Softmax(s, n_kv);
          std::fill(s + n_kv, s + n_keys, 0.0f);
        }
        kernels::Gemm(kernels::GemmOp::kNN, rows, D, n_keys, S, n_keys, V + g * D, static_cast<int>(nv),
                      att_.data() + t0 * nq + h * D, static_cast<int>(nq), false);
      }
    });
  }
  Linear(*L.wo, att_.data(), T, tmp_.data());  // [T][n_embd]
  (void)E;
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
  if (observer_) observer_(il, T, logits, tokens, plan_);

  const int S = plan_.n_rows();  // rows of the FFN experts, in expert order below
  const DType gt = L.gate_exps->dtype, ut = L.up_exps->dtype, dt = L.down_exps->dtype;
  const size_t rbg = kernels::ActivationRowBytes(gt, E);
  const size_t rbu = kernels::ActivationRowBytes(ut, E);
  const bool same_up = VecDotType(gt) == VecDotType(ut);
  // Convert each token once, then gather rows into expert order.
  act_.resize(rbg * T);
  for (int t = 0; t < T; ++t) kernels::ConvertActivations(gt, F(h_, t * E), act_.data() + t * rbg, E);
  xg_.resize(rbg * S);
  for (int p = 0; p < S; ++p)
    std::memcpy(xg_.data() + p * rbg, act_.data() + (plan_.sorted_slots[p] / K) * rbg, rbg);
  if (!same_up) {
    act2_.resize(rbu * T);
    for (int t = 0; t < T; ++t) kernels::ConvertActivations(ut, F(h_, t * E), act2_.data() + t * rbu, E);
    xg2_.resize(rbu * S);
    for (int p = 0; p < S; ++p)
      std::memcpy(xg2_.data() + p * rbu, act2_.data() + (plan_.sorted_slots[p] / K) * rbu, rbu);
  }
  const uint8_t* xu = same_up ? xg_.data() : xg2_.data();
  const size_t rbu_eff = same_up ? rbg : rbu;

  // Work items: (expert, row chunk) over the active experts only.
  // One expert projection over the active experts: out[pos][rows] for the expert-sorted
  // activation rows x (row bytes rb), split into (expert, row chunk) work items.
  struct Item { int e; int64_t r0, r1; };
  std::vector<Item> items;
  auto expert_products = [&](int64_t rows, auto&& product) {
    items.clear();
    for (int e = 0; e < X; ++e) {
      if (plan_.tokens_per_expert[e] == 0) continue;
      const int64_t grain = RowGrain(rows, plan_.tokens_per_expert[e], pool_.size());
      for (int64_t r = 0; r < rows; r += grain) items.push_back({e, r, std::min(rows, r + grain)});
    }
    pool_.ParallelFor(static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e, int) {
      for (int64_t i = b; i < e; ++i) {
        const Item& it = items[i];
        product(it.e, plan_.expert_offsets[it.e], plan_.tokens_per_expert[it.e], it.r0, it.r1);
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
  u_.resize(static_cast<size_t>(S) * Fx);
  expert_products(Fx, [&](int e, int off, int n, int64_t r0, int64_t r1) {
    kernels::MatMul(gt, L.gate_exps->Slab(e), E, r0, r1, xg_.data() + off * rbg, rbg, n,
                    F(g_, static_cast<size_t>(off) * Fx + r0), Fx, L.gate_exps->layout);
    kernels::MatMul(ut, L.up_exps->Slab(e), E, r0, r1, xu + off * rbu_eff, rbu_eff, n,
                    F(u_, static_cast<size_t>(off) * Fx + r0), Fx, L.up_exps->layout);
  });
  // SwiGLU, then convert for the down projection.
  const size_t rbd = kernels::ActivationRowBytes(dt, Fx);
  aq_.resize(rbd * S);
  pool_.ParallelFor(S, 4, [&](int64_t b, int64_t e, int) {
    for (int64_t p = b; p < e; ++p) {
      float* g = F(g_, p * Fx);
      kernels::SiluMul(g, F(u_, p * Fx), g, Fx);
      kernels::ConvertActivations(dt, g, aq_.data() + p * rbd, Fx);
    }
  });
  observe_experts(*L.down_exps, g_.data(), Fx, false);
  y_.resize(static_cast<size_t>(S) * E);
  expert_products(E, [&](int e, int off, int n, int64_t r0, int64_t r1) {
    kernels::MatMul(dt, L.down_exps->Slab(e), Fx, r0, r1, aq_.data() + off * rbd, rbd, n,
                    F(y_, static_cast<size_t>(off) * E + r0), E, L.down_exps->layout);
  });
  // Combine in selection order (deterministic and independent of batch-mates): FFN rows, and the
  // zero-computation targets (null and zero: nothing; copy: x; constant: a1 x + a2 v).
  const int const0 = R - mc.n_const;
  for (int t = 0; t < T; ++t) {
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
  }

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
