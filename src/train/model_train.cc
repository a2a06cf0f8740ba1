#include "train/model_train.h"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "kernels/gemm.h"
#include "kernels/ref/train_ref.h"
#include "kernels/kernels.h"
#include "kernels/train_ops.h"
#include "moe/swiglu_act.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe {

namespace {

// ---- element type dispatch: float -> fast kernels, double -> references ----------------------

inline float RmsNorm(const float* x, const float* w, int64_t n, float eps, float* y) {
  return kernels::RmsNormTrain(x, w, n, eps, y);
}
inline double RmsNorm(const double* x, const double* w, int64_t n, double eps, double* y) {
  return kernels::ref::RmsNormTrain(x, w, n, eps, y);
}
inline void RmsNormBack(const float* x, const float* w, float r, const float* dy, int64_t n, float* dx, float* dw) {
  kernels::RmsNormBackward(x, w, r, dy, n, dx, dw);
}
inline void RmsNormBack(const double* x, const double* w, double r, const double* dy, int64_t n, double* dx,
                        double* dw) {
  kernels::ref::RmsNormBackward(x, w, r, dy, n, dx, dw);
}
inline void AttnForward(int L, int dh, float scale, const float* q, int ldq, const float* k, int ldk,
                        const float* v, int ldv, float* probs, float* out, int ldo) {
  kernels::CausalAttentionForward(L, dh, scale, q, ldq, k, ldk, v, ldv, probs, out, ldo);
}
inline void AttnForward(int L, int dh, double scale, const double* q, int ldq, const double* k, int ldk,
                        const double* v, int ldv, double* probs, double* out, int ldo) {
  kernels::ref::CausalAttentionForward(L, dh, scale, q, ldq, k, ldk, v, ldv, probs, out, ldo);
}
inline void AttnBackward(int L, int dh, float scale, const float* q, int ldq, const float* k, int ldk,
                         const float* v, int ldv, const float* probs, const float* dout, int ldo, float* dq,
                         int lddq, float* dk, int lddk, float* dv, int lddv, float* scratch) {
  kernels::CausalAttentionBackward(L, dh, scale, q, ldq, k, ldk, v, ldv, probs, dout, ldo, dq, lddq, dk, lddk,
                                   dv, lddv, scratch);
}
inline void AttnBackward(int L, int dh, double scale, const double* q, int ldq, const double* k, int ldk,
                         const double* v, int ldv, const double* probs, const double* dout, int ldo, double* dq,
                         int lddq, double* dk, int lddk, double* dv, int lddv, double*) {
  kernels::ref::CausalAttentionBackward(L, dh, scale, q, ldq, k, ldk, v, ldv, probs, dout, ldo, dq, lddq, dk,
                                        lddk, dv, lddv);
}
inline double CrossEntropy(const float* logits, int64_t V, int32_t target, float scale, float* d) {
  return kernels::CrossEntropyRow(logits, V, target, scale, d);
}
inline double CrossEntropy(const double* logits, int64_t V, int32_t target, double scale, double* d) {
  return kernels::ref::CrossEntropyRow(logits, V, target, scale, d);
}
inline double LogProb(const float* logits, int64_t V, int32_t target) {
  return kernels::LogProbRow(logits, V, target);
}
inline double LogProb(const double* logits, int64_t V, int32_t target) {
  double mx = logits[0];
  for (int64_t i = 1; i < V; ++i) mx = std::max(mx, logits[i]);
  double s = 0;
  for (int64_t i = 0; i < V; ++i) s += std::exp(logits[i] - mx);
  return logits[target] - mx - std::log(s);
}

// Rotary embeddings of the positions 0..L-1 of a sequence. float: ggml's angles (the inference
// rotation, bit for bit); double: the exact angles.
template <typename T>
struct Rope {
  int n_rot = 0, half = 0;
  float base = 10000.0f;
  bool neox = false;
  std::vector<float> cos_t, sin_t;  // [L][half] (float only)

  Rope(const ModelConfig& c, int L)
      : n_rot(static_cast<int>(c.n_rot)), half(static_cast<int>(c.n_rot) / 2), base(c.rope_freq_base),
        neox(c.rope_type == RopeType::kNeox) {
    if constexpr (std::is_same_v<T, float>) {
      cos_t.resize(static_cast<size_t>(L) * half);
      sin_t.resize(cos_t.size());
      kernels::RopeTables(n_rot, base, 0, L, cos_t.data(), sin_t.data());
    }
  }
  void Apply(T* x, int n_heads, int head_dim, int pos, bool inverse) const {
    if constexpr (std::is_same_v<T, float>) {
      kernels::RopeApply(x, n_heads, head_dim, n_rot, &cos_t[static_cast<size_t>(pos) * half],
                         &sin_t[static_cast<size_t>(pos) * half], neox, inverse);
    } else {
      kernels::ref::Rope<double>(x, n_heads, head_dim, n_rot, pos, base, neox, inverse);
    }
  }
};

// ---- parallel helpers ------------------------------------------------------------------------

void ForChunks(ThreadPool* pool, int64_t n, int64_t grain, const std::function<void(int64_t, int64_t)>& fn) {
  if (n <= 0) return;
  if (pool == nullptr || pool->size() == 1 || n <= grain) {
    fn(0, n);
    return;
  }
  pool->ParallelFor(n, grain, [&](int64_t b, int64_t e, int) { fn(b, e); });
}

int64_t RowGrain(int64_t rows, ThreadPool* pool) {
  const int t = pool ? pool->size() : 1;
  return std::max<int64_t>(16, (rows + 4 * t - 1) / (4 * t));
}

// y [N][out] = x [N][in] W^T (+ y when accumulate), split over token rows.
template <typename T>
void LinearForward(ThreadPool* pool, const T* x, int N, int in, const T* W, int out, T* y, bool accumulate = false) {
  ForChunks(pool, N, RowGrain(N, pool), [&](int64_t r0, int64_t r1) {
    kernels::Gemm(kernels::GemmOp::kNT, static_cast<int>(r1 - r0), out, in, x + r0 * in, in, W, in, y + r0 * out,
                  out, accumulate);
  });
}

// dx [N][in] (= or +=) dy [N][out] W; dW [out][in] += dy^T x, split over output rows.
template <typename T>
void LinearBackward(ThreadPool* pool, const T* x, const T* dy, int N, int in, const T* W, int out, T* dx,
                    bool accumulate_dx, T* dW) {
  if (dx != nullptr) {
    ForChunks(pool, N, RowGrain(N, pool), [&](int64_t r0, int64_t r1) {
      kernels::Gemm(kernels::GemmOp::kNN, static_cast<int>(r1 - r0), in, out, dy + r0 * out, out, W, in,
                    dx + r0 * in, in, accumulate_dx);
    });
  }
  ForChunks(pool, out, RowGrain(out, pool), [&](int64_t o0, int64_t o1) {
    kernels::Gemm(kernels::GemmOp::kTN, static_cast<int>(o1 - o0), in, N, dy + o0, out, x, in, dW + o0 * in, in,
                  true);
  });
}

// Per-token contributions to a weight gradient dw [n]: tokens in fixed chunks, each chunk summed
// into its own row, the rows added in order, so the sum's order never depends on the threads.
constexpr int kReduceChunk = 64;
template <typename T>
void ReduceOverTokens(ThreadPool* pool, int N, int n, T* dw,
                      const std::function<void(int t, T* partial)>& per_token) {
  if (dw == nullptr) {
    ForChunks(pool, N, RowGrain(N, pool), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) per_token(static_cast<int>(t), nullptr);
    });
    return;
  }
  const int n_chunks = (N + kReduceChunk - 1) / kReduceChunk;
  std::vector<T> partial(static_cast<size_t>(n_chunks) * n, T(0));
  ForChunks(pool, n_chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      T* row = &partial[static_cast<size_t>(c) * n];
      for (int t = static_cast<int>(c) * kReduceChunk; t < std::min(N, static_cast<int>(c + 1) * kReduceChunk); ++t)
        per_token(t, row);
    }
  });
  for (int c = 0; c < n_chunks; ++c)
    for (int i = 0; i < n; ++i) dw[i] += partial[static_cast<size_t>(c) * n + i];
}

template <typename T>
const T* OrNull(const std::vector<T>& v) { return v.empty() ? nullptr : v.data(); }
template <typename T>
T* OrNull(std::vector<T>& v) { return v.empty() ? nullptr : v.data(); }

// ---- deepseek2: multi-head latent attention (plain form) and dense FFN blocks ---------------

// MLA's sizes; Dp = max(Dk, Dv) is the head size q, k and v are padded to (zeros add nothing to
// a score or an output), so the attention kernels of the other architectures serve.
struct MlaDims {
  int H, Dk, Dn, Dr, Dv, Kr, Rq, Dp, W;
  explicit MlaDims(const ModelConfig& c)
      : H(static_cast<int>(c.n_head)), Dk(static_cast<int>(c.n_embd_head_k)), Dn(static_cast<int>(c.qk_nope())),
        Dr(static_cast<int>(c.n_rot)), Dv(static_cast<int>(c.n_embd_head_v)), Kr(static_cast<int>(c.n_lora_kv)),
        Rq(static_cast<int>(c.n_lora_q)), Dp(std::max(Dk, Dv)), W(Kr + Dr) {}
};

// Q (through the q_lora bottleneck or attn_q), the latent c = norm(kv_a x), the rotated shared
// key part, then every head's query, key [c A_h | k_pe] and value c B_h^T (A_h = attn_k_b's head
// h [Kr][Dn], B_h = attn_v_b's [Dv][Kr]) into B.qp / kp / vp [N][H][Dp].
template <typename T>
void MlaProject(const ModelConfig& c, const LayerParams<T>& Wt, BlockCache<T>& B, int N, int L, const Rope<T>& rope,
                ThreadPool* pool) {
  const MlaDims m(c);
  const int D = static_cast<int>(c.n_embd), nq = m.H * m.Dk, hp = m.H * m.Dp;
  const T eps = static_cast<T>(c.rms_eps);
  B.q.resize(static_cast<size_t>(N) * nq);
  if (m.Rq > 0) {
    B.qa_pre.resize(static_cast<size_t>(N) * m.Rq);
    B.qa.resize(B.qa_pre.size());
    B.qa_rstd.resize(N);
    LinearForward(pool, B.h1.data(), N, D, Wt.wq_a.data(), m.Rq, B.qa_pre.data());
    ForChunks(pool, N, RowGrain(N, pool), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t)
        B.qa_rstd[t] = RmsNorm(&B.qa_pre[t * m.Rq], Wt.q_a_norm.data(), m.Rq, eps, &B.qa[t * m.Rq]);
    });
    LinearForward(pool, B.qa.data(), N, m.Rq, Wt.wq_b.data(), nq, B.q.data());
  } else {
    LinearForward(pool, B.h1.data(), N, D, Wt.wq.data(), nq, B.q.data());
  }
  B.kva.resize(static_cast<size_t>(N) * m.W);
  LinearForward(pool, B.h1.data(), N, D, Wt.wkv_a.data(), m.W, B.kva.data());
  B.lat.resize(static_cast<size_t>(N) * m.Kr);
  B.kv_rstd.resize(N);
  B.qp.assign(static_cast<size_t>(N) * hp, T(0));
  B.kp.assign(B.qp.size(), T(0));
  B.vp.assign(B.qp.size(), T(0));
  ForChunks(pool, N, RowGrain(N, pool), [&](int64_t b, int64_t e) {
    std::vector<T> kpe(m.Dr);
    for (int64_t t = b; t < e; ++t) {
      const int pos = static_cast<int>(t % L);
      B.kv_rstd[t] = RmsNorm(&B.kva[t * m.W], Wt.kv_a_norm.data(), m.Kr, eps, &B.lat[t * m.Kr]);
      std::copy_n(&B.kva[t * m.W + m.Kr], m.Dr, kpe.data());
      rope.Apply(kpe.data(), 1, m.Dr, pos, false);
      T* q = &B.q[t * nq];
      rope.Apply(q + m.Dn, m.H, m.Dk, pos, false);
      for (int h = 0; h < m.H; ++h) {
        std::copy_n(q + h * m.Dk, m.Dk, &B.qp[t * hp + h * m.Dp]);
        std::copy_n(kpe.data(), m.Dr, &B.kp[t * hp + h * m.Dp + m.Dn]);
      }
    }
  });
  ForChunks(pool, m.H, 1, [&](int64_t b, int64_t e) {
    for (int64_t h = b; h < e; ++h) {
      kernels::Gemm(kernels::GemmOp::kNN, N, m.Dn, m.Kr, B.lat.data(), m.Kr, &Wt.wk_b[h * m.Kr * m.Dn], m.Dn,
                    &B.kp[h * m.Dp], hp, false);
      kernels::Gemm(kernels::GemmOp::kNT, N, m.Dv, m.Kr, B.lat.data(), m.Kr, &Wt.wv_b[h * m.Dv * m.Kr], m.Kr,
                    &B.vp[h * m.Dp], hp, false);
    }
  });
}

// From datp [N][H][Dp] (the attention output's gradient, padded): the attention backward, then
// through the up-projections, the latent's norm, RoPE and the projections; dh1 [N][D] written.
template <typename T>
void MlaBackward(const ModelConfig& c, const LayerParams<T>& Wt, LayerGrads<T>& G, const BlockCache<T>& B,
                 ModelCache<T>& C, const Rope<T>& rope, T scale, ThreadPool* pool, std::vector<T>& dh1) {
  const MlaDims m(c);
  const int D = static_cast<int>(c.n_embd), nq = m.H * m.Dk, hp = m.H * m.Dp;
  const int L = C.seq_len, N = C.n_seq * C.seq_len;
  std::vector<T>&dqp = C.dqp, &dkp = C.dkp, &dvp = C.dvp, &dq = C.dq, &dlat = C.dlat, &dkva = C.dkva;
  dqp.resize(static_cast<size_t>(N) * hp);  // written per head
  dkp.assign(dqp.size(), T(0));
  dvp.assign(dqp.size(), T(0));
  ForChunks(pool, static_cast<int64_t>(C.n_seq) * m.H, 1, [&](int64_t b, int64_t e) {
    thread_local std::vector<T> scratch;
    scratch.resize(static_cast<size_t>(L) * L);
    for (int64_t item = b; item < e; ++item) {
      const int s = static_cast<int>(item / m.H), h = static_cast<int>(item % m.H);
      const size_t o = static_cast<size_t>(s) * L * hp + static_cast<size_t>(h) * m.Dp;
      AttnBackward(L, m.Dp, scale, &B.qp[o], hp, &B.kp[o], hp, &B.vp[o], hp,
                   &B.probs[(static_cast<size_t>(s) * m.H + h) * L * L], &C.datp[o], hp, &dqp[o], hp, &dkp[o], hp,
                   &dvp[o], hp, scratch.data());
    }
  });
  // The queries' gradient (rotation undone); the latent's through both up-projections, head by
  // head in order; the shared key part's summed over the heads.
  dq.resize(static_cast<size_t>(N) * nq);
  dlat.resize(static_cast<size_t>(N) * m.Kr);
  dkva.resize(static_cast<size_t>(N) * m.W);
  ForChunks(pool, N, RowGrain(N, pool), [&](int64_t b, int64_t e) {
    const int rows = static_cast<int>(e - b);
    for (int h = 0; h < m.H; ++h) {
      kernels::Gemm(kernels::GemmOp::kNT, rows, m.Kr, m.Dn, &dkp[b * hp + h * m.Dp], hp, &Wt.wk_b[static_cast<size_t>(h) * m.Kr * m.Dn],
                    m.Dn, &dlat[b * m.Kr], m.Kr, h > 0);
      kernels::Gemm(kernels::GemmOp::kNN, rows, m.Kr, m.Dv, &dvp[b * hp + h * m.Dp], hp, &Wt.wv_b[static_cast<size_t>(h) * m.Dv * m.Kr],
                    m.Kr, &dlat[b * m.Kr], m.Kr, true);
    }
    for (int64_t t = b; t < e; ++t) {
      const int pos = static_cast<int>(t % L);
      T* qt = &dq[t * nq];
      for (int h = 0; h < m.H; ++h) std::copy_n(&dqp[t * hp + h * m.Dp], m.Dk, qt + h * m.Dk);
      rope.Apply(qt + m.Dn, m.H, m.Dk, pos, true);
      T* kpe = &dkva[t * m.W + m.Kr];
      std::fill(kpe, kpe + m.Dr, T(0));
      for (int h = 0; h < m.H; ++h)
        for (int i = 0; i < m.Dr; ++i) kpe[i] += dkp[t * hp + h * m.Dp + m.Dn + i];
      rope.Apply(kpe, 1, m.Dr, pos, true);
    }
  });
  ForChunks(pool, m.H, 1, [&](int64_t b, int64_t e) {  // dA_h += c^T dk_nope_h, dB_h += dv_h^T c
    for (int64_t h = b; h < e; ++h) {
      kernels::Gemm(kernels::GemmOp::kTN, m.Kr, m.Dn, N, B.lat.data(), m.Kr, &dkp[h * m.Dp], hp,
                    &G.wk_b[h * m.Kr * m.Dn], m.Dn, true);
      kernels::Gemm(kernels::GemmOp::kTN, m.Dv, m.Kr, N, &dvp[h * m.Dp], hp, B.lat.data(), m.Kr,
                    &G.wv_b[h * m.Dv * m.Kr], m.Kr, true);
    }
  });
  ReduceOverTokens<T>(pool, N, m.Kr, G.kv_a_norm.data(), [&](int t, T* dw) {
    const size_t o = static_cast<size_t>(t);
    RmsNormBack(&B.kva[o * m.W], Wt.kv_a_norm.data(), B.kv_rstd[t], &dlat[o * m.Kr], m.Kr, &dkva[o * m.W], dw);
  });
  LinearBackward(pool, B.h1.data(), dkva.data(), N, D, Wt.wkv_a.data(), m.W, dh1.data(), false, G.wkv_a.data());
  if (m.Rq > 0) {
    std::vector<T>& dqa = C.dqa;
    dqa.resize(static_cast<size_t>(N) * m.Rq);
    LinearBackward(pool, B.qa.data(), dq.data(), N, m.Rq, Wt.wq_b.data(), nq, dqa.data(), false, G.wq_b.data());
    ReduceOverTokens<T>(pool, N, m.Rq, G.q_a_norm.data(), [&](int t, T* dw) {
      const size_t o = static_cast<size_t>(t) * m.Rq;
      RmsNormBack(&B.qa_pre[o], Wt.q_a_norm.data(), B.qa_rstd[t], &dqa[o], m.Rq, &dqa[o], dw);
    });
    LinearBackward(pool, B.h1.data(), dqa.data(), N, D, Wt.wq_a.data(), m.Rq, dh1.data(), true, G.wq_a.data());
  } else {
    LinearBackward(pool, B.h1.data(), dq.data(), N, D, Wt.wq.data(), nq, dh1.data(), true, G.wq.data());
  }
}

// A dense block's SwiGLU FFN: y [N][D] = (silu(h Wg^T) * h Wu^T) Wd^T, with fg, fu, fa cached.
template <typename T>
void DenseFfnForward(const LayerParams<T>& Wt, BlockCache<T>& B, int N, int D, int F, T* y, ThreadPool* pool) {
  B.fg.resize(static_cast<size_t>(N) * F);
  B.fu.resize(B.fg.size());
  B.fa.resize(B.fg.size());
  LinearForward(pool, B.h2.data(), N, D, Wt.ffn_gate.data(), F, B.fg.data());
  LinearForward(pool, B.h2.data(), N, D, Wt.ffn_up.data(), F, B.fu.data());
  ForChunks(pool, N, RowGrain(N, pool), [&](int64_t b, int64_t e) {
    SwigluAct(&B.fg[b * F], &B.fu[b * F], &B.fa[b * F], static_cast<size_t>(e - b) * F);
  });
  LinearForward(pool, B.fa.data(), N, F, Wt.ffn_down.data(), D, y);
}

// Its backward from dy [N][D]: the weight gradients, and dh2 [N][D] written.
template <typename T>
void DenseFfnBackward(const LayerParams<T>& Wt, LayerGrads<T>& G, const BlockCache<T>& B, ModelCache<T>& C, int N,
                      int D, int F, const T* dy, T* dh2, ThreadPool* pool) {
  C.dfa.resize(static_cast<size_t>(N) * F);
  C.dfg.resize(C.dfa.size());
  C.dfu.resize(C.dfa.size());
  LinearBackward(pool, B.fa.data(), dy, N, F, Wt.ffn_down.data(), D, C.dfa.data(), false, G.ffn_down.data());
  ForChunks(pool, N, RowGrain(N, pool), [&](int64_t b, int64_t e) {
    SwigluGrads(&B.fg[b * F], &B.fu[b * F], &C.dfa[b * F], &C.dfg[b * F], &C.dfu[b * F], static_cast<size_t>(e - b) * F);
  });
  LinearBackward(pool, B.h2.data(), C.dfg.data(), N, D, Wt.ffn_gate.data(), F, dh2, false, G.ffn_gate.data());
  LinearBackward(pool, B.h2.data(), C.dfu.data(), N, D, Wt.ffn_up.data(), F, dh2, true, G.ffn_up.data());
}

}  // namespace

template <typename T>
std::vector<MoeLayerConfig> TrainLayerConfigs(const ModelParams<T>& p, const MoeLayerConfig& train,
                                              double loss_weight) {
  std::vector<MoeLayerConfig> out;
  for (uint32_t il = 0; il < p.config.n_layer; ++il) {
    MoeLayerConfig m = p.LayerMoe(static_cast<int>(il));
    m.jitter_eps = train.jitter_eps;
    m.bias_update_rate = train.bias_update_rate;
    m.capacity_factor = train.capacity_factor;
    m.ec_capacity_factor = train.ec_capacity_factor;
    m.zc_balance_tau = train.zc_balance_tau;
    m.aux_loss_coef = train.aux_loss_coef * loss_weight;
    m.z_loss_coef = train.z_loss_coef * loss_weight;
    m.entropy_loss_coef = train.entropy_loss_coef;  // negative: the model's router's default
    m.entropy_loss_coef = m.EntropyCoef() * loss_weight;
    ValidateMoeConfig(m);
    out.push_back(m);
  }
  return out;
}

template <typename T>
double ModelForward(const ModelParams<T>& p, const std::vector<MoeLayerConfig>& cfgs, const int32_t* tokens,
                    const uint8_t* target, int n_seq, int seq_len, const TrainForwardOptions& opt,
                    ModelCache<T>* cache) {
  const ModelConfig& c = p.config;
  const int D = static_cast<int>(c.n_embd), V = static_cast<int>(c.n_vocab);
  const int H = static_cast<int>(c.n_head), Hkv = static_cast<int>(c.n_head_kv), Dh = static_cast<int>(c.n_embd_head_k);
  const int nq = static_cast<int>(c.n_q()), nk = static_cast<int>(c.n_k()), nv = static_cast<int>(c.n_v());
  const int L = seq_len, N = n_seq * seq_len;
  const T eps = static_cast<T>(c.rms_eps);
  ThreadPool* pool = opt.pool;
  if (n_seq <= 0 || seq_len <= 0) Fail("the forward needs at least one sequence of at least one token");
  if (static_cast<uint32_t>(seq_len) > c.n_ctx_train)
    Fail("sequence length %d is longer than the model's context (%u tokens)", seq_len, c.n_ctx_train);
  if (cfgs.size() != c.n_layer) Fail("%zu MoE layer configs for %u layers", cfgs.size(), c.n_layer);
  ModelCache<T>& C = *cache;
  C.n_seq = n_seq;
  C.seq_len = seq_len;
  C.inputs.resize(N);
  C.targets.resize(N);
  C.counted.resize(N);
  C.n_counted = 0;
  for (int b = 0; b < n_seq; ++b) {
    for (int i = 0; i < L; ++i) {
      const size_t o = static_cast<size_t>(b) * (L + 1) + i;
      const int32_t a = tokens[o], t = tokens[o + 1];
      if (a < 0 || a >= V || t < 0 || t >= V)
        Fail("token id %d is out of range: the vocabulary has %d tokens", a < 0 || a >= V ? a : t, V);
      const size_t q = static_cast<size_t>(b) * L + i;
      C.inputs[q] = a;
      C.targets[q] = t;
      C.counted[q] = target == nullptr || target[o + 1] != 0;
      C.n_counted += C.counted[q];
    }
  }
  const Rope<T> rope(c, L);
  std::vector<T>& x = C.x;
  x.resize(static_cast<size_t>(N) * D);
  for (int t = 0; t < N; ++t)
    std::copy_n(&p.token_embd[static_cast<size_t>(C.inputs[t]) * D], D, &x[static_cast<size_t>(t) * D]);

  C.blocks.resize(c.n_layer);
  std::vector<T>& y = C.y;
  y.resize(static_cast<size_t>(N) * D);
  for (uint32_t il = 0; il < c.n_layer; ++il) {
    const LayerParams<T>& W = p.layers[il];
    BlockCache<T>& B = C.blocks[il];
    B.x_in = x;
    B.rstd1.resize(N);
    B.h1.resize(x.size());
    ForChunks(pool, N, RowGrain(N, pool), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) B.rstd1[t] = RmsNorm(&x[t * D], W.attn_norm.data(), D, eps, &B.h1[t * D]);
    });
    if (c.is_mla()) {  // deepseek2: per (sequence, head) over the padded heads
      const MlaDims m(c);
      const int hp = m.H * m.Dp;
      MlaProject(c, W, B, N, L, rope, pool);
      B.probs.resize(static_cast<size_t>(n_seq) * H * L * L);
      B.att.resize(static_cast<size_t>(N) * hp);
      const T scale = T(1) / std::sqrt(static_cast<T>(m.Dk));
      ForChunks(pool, static_cast<int64_t>(n_seq) * H, 1, [&](int64_t b, int64_t e) {
        for (int64_t item = b; item < e; ++item) {
          const int s = static_cast<int>(item / H), h = static_cast<int>(item % H);
          const size_t o = static_cast<size_t>(s) * L * hp + static_cast<size_t>(h) * m.Dp;
          AttnForward(L, m.Dp, scale, &B.qp[o], hp, &B.kp[o], hp, &B.vp[o], hp,
                      &B.probs[(static_cast<size_t>(s) * H + h) * L * L], &B.att[o], hp);
        }
      });
      for (size_t r = 0; r < static_cast<size_t>(N) * H; ++r)  // unpad in place: [N][H][Dv]
        std::copy_n(&B.att[r * m.Dp], m.Dv, &B.att[r * m.Dv]);
      B.att.resize(static_cast<size_t>(N) * H * m.Dv);
      LinearForward(pool, B.att.data(), N, H * m.Dv, W.wo.data(), D, x.data(), /*accumulate=*/true);
    } else {
    B.q.resize(static_cast<size_t>(N) * nq);
    B.k.resize(static_cast<size_t>(N) * nk);
    B.v.resize(static_cast<size_t>(N) * nv);
    LinearForward(pool, B.h1.data(), N, D, W.wq.data(), nq, B.q.data());
    LinearForward(pool, B.h1.data(), N, D, W.wk.data(), nk, B.k.data());
    LinearForward(pool, B.h1.data(), N, D, W.wv.data(), nv, B.v.data());
    const bool qk = c.qk_norm != QkNorm::kNone;
    const int qh = c.qk_norm == QkNorm::kPerHead ? H : 1, kh = c.qk_norm == QkNorm::kPerHead ? Hkv : 1;
    if (qk) {
      B.q_rstd.resize(static_cast<size_t>(N) * qh);
      B.k_rstd.resize(static_cast<size_t>(N) * kh);
    }
    ForChunks(pool, N, RowGrain(N, pool), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        T* q = &B.q[t * nq];
        T* k = &B.k[t * nk];
        if (!W.bq.empty()) {
          for (int i = 0; i < nq; ++i) q[i] += W.bq[i];
          for (int i = 0; i < nk; ++i) k[i] += W.bk[i];
          for (int i = 0; i < nv; ++i) B.v[t * nv + i] += W.bv[i];
        }
      }
    });
    if (qk) {
      B.q_pre = B.q;
      B.k_pre = B.k;
    }
    ForChunks(pool, N, RowGrain(N, pool), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        T* q = &B.q[t * nq];
        T* k = &B.k[t * nk];
        if (qk) {
          const int qs = nq / qh, ks = nk / kh;
          for (int h = 0; h < qh; ++h) B.q_rstd[t * qh + h] = RmsNorm(q + h * qs, W.q_norm.data(), qs, eps, q + h * qs);
          for (int h = 0; h < kh; ++h) B.k_rstd[t * kh + h] = RmsNorm(k + h * ks, W.k_norm.data(), ks, eps, k + h * ks);
        }
        const int pos = static_cast<int>(t % L);
        rope.Apply(q, H, Dh, pos, false);
        rope.Apply(k, Hkv, Dh, pos, false);
      }
    });
    // Attention: one work item per (sequence, KV head), its query heads in order.
    B.probs.resize(static_cast<size_t>(n_seq) * H * L * L);
    B.att.resize(static_cast<size_t>(N) * nq);
    const T scale = T(1) / std::sqrt(static_cast<T>(Dh));
    const int group = H / Hkv;
    ForChunks(pool, static_cast<int64_t>(n_seq) * Hkv, 1, [&](int64_t b, int64_t e) {
      for (int64_t item = b; item < e; ++item) {
        const int s = static_cast<int>(item / Hkv), g = static_cast<int>(item % Hkv);
        const size_t row0 = static_cast<size_t>(s) * L;
        for (int h = g * group; h < (g + 1) * group; ++h) {
          AttnForward(L, Dh, scale, &B.q[row0 * nq + h * Dh], nq, &B.k[row0 * nk + g * Dh], nk,
                      &B.v[row0 * nv + g * Dh], nv, &B.probs[(static_cast<size_t>(s) * H + h) * L * L],
                      &B.att[row0 * nq + h * Dh], nq);
        }
      }
    });
    LinearForward(pool, B.att.data(), N, nq, W.wo.data(), D, x.data(), /*accumulate=*/true);
    }
    B.x_mid = x;
    B.rstd2.resize(N);
    B.h2.resize(x.size());
    ForChunks(pool, N, RowGrain(N, pool), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) B.rstd2[t] = RmsNorm(&x[t * D], W.ffn_norm.data(), D, eps, &B.h2[t * D]);
    });
    if (!c.IsMoeLayer(il)) {  // deepseek2's leading dense blocks
      DenseFfnForward(W, B, N, D, static_cast<int>(c.n_ff), y.data(), pool);
      for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
      continue;
    }
    MoeForwardOptions mo;
    mo.training = opt.training;
    mo.jitter_seed = opt.jitter_seed ^ (0x9e3779b97f4a7c15ULL * (il + 1));
    mo.seq_len = opt.capacity_seq_len;
    mo.pool = pool;
    mo.token_ids = C.inputs.data();
    if (cfgs[il].gating_residual) mo.prev_logits = C.blocks[il - 1].moe.logits.data();
    MoeForward(cfgs[il], W.moe, B.h2.data(), N, y.data(), &B.moe, mo);
    for (size_t i = 0; i < x.size(); ++i) x[i] += y[i];
  }

  // Output norm, head and cross-entropy (its gradient computed in place of the logits).
  C.x_final = x;
  C.rstd_f.resize(N);
  C.h_f.resize(x.size());
  ForChunks(pool, N, RowGrain(N, pool), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) C.rstd_f[t] = RmsNorm(&x[t * D], p.output_norm.data(), D, eps, &C.h_f[t * D]);
  });
  const std::vector<T>& head = p.tied_output ? p.token_embd : p.output;
  C.logits.resize(static_cast<size_t>(N) * V);
  LinearForward(pool, C.h_f.data(), N, D, head.data(), V, C.logits.data());
  const T w = static_cast<T>(opt.token_weight > 0 ? opt.token_weight : 1.0 / std::max<int64_t>(1, C.n_counted));
  std::vector<double> ce(N, 0.0);
  const bool grad = opt.training && !opt.keep_logits;
  ForChunks(pool, N, RowGrain(N, pool), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      T* row = &C.logits[t * V];
      if (!C.counted[t]) {
        if (grad) std::fill(row, row + V, T(0));  // not in the loss: no gradient
        continue;
      }
      ce[t] = grad ? CrossEntropy(row, V, C.targets[t], w, row) : -LogProb(row, V, C.targets[t]);
    }
  });
  C.ce_sum = 0;
  for (double v : ce) C.ce_sum += v;
  C.moe_loss = 0;
  for (const BlockCache<T>& B : C.blocks) C.moe_loss += B.moe.loss();
  return C.loss();
}

template <typename T>
void ModelBackward(const ModelParams<T>& p, const std::vector<MoeLayerConfig>& cfgs, ModelCache<T>& C,
                   ModelGrads<T>* g, ThreadPool* pool) {
  const ModelConfig& c = p.config;
  const int D = static_cast<int>(c.n_embd), V = static_cast<int>(c.n_vocab);
  const int H = static_cast<int>(c.n_head), Hkv = static_cast<int>(c.n_head_kv), Dh = static_cast<int>(c.n_embd_head_k);
  const int nq = static_cast<int>(c.n_q()), nk = static_cast<int>(c.n_k()), nv = static_cast<int>(c.n_v());
  const int L = C.seq_len, N = C.n_seq * C.seq_len;
  if (C.blocks.size() != c.n_layer || C.logits.size() != static_cast<size_t>(N) * V)
    Fail("the backward needs the cache of a training forward of this model");
  const Rope<T> rope(c, L);

  // Head: dlogits (in the cache) -> dh_f, d output (or token_embd when tied).
  std::vector<T>&dh = C.dh, &dx = C.dx;
  dh.resize(static_cast<size_t>(N) * D);
  dx.resize(static_cast<size_t>(N) * D);
  const std::vector<T>& head = p.tied_output ? p.token_embd : p.output;
  std::vector<T>& dhead = p.tied_output ? g->token_embd : g->output;
  LinearBackward(pool, C.h_f.data(), C.logits.data(), N, D, head.data(), V, dh.data(), false, dhead.data());
  ReduceOverTokens<T>(pool, N, D, g->output_norm.data(), [&](int t, T* dw) {
    RmsNormBack(&C.x_final[static_cast<size_t>(t) * D], p.output_norm.data(), C.rstd_f[t],
                &dh[static_cast<size_t>(t) * D], D, &dx[static_cast<size_t>(t) * D], dw);
  });

  // The residual stream's gradient through a pre-norm: dx += RMSNorm'(x; w, rstd)^T dh, and the
  // norm weight's gradient into dw.
  auto NormBackwardAdd = [&](const std::vector<T>& x, const std::vector<T>& w, const std::vector<T>& rstd,
                             const std::vector<T>& dhn, std::vector<T>* dw_out) {
    ReduceOverTokens<T>(pool, N, D, dw_out->data(), [&](int t, T* dw) {
      thread_local std::vector<T> tmp;
      tmp.resize(D);
      const size_t o = static_cast<size_t>(t) * D;
      RmsNormBack(&x[o], w.data(), rstd[t], &dhn[o], D, tmp.data(), dw);
      for (int i = 0; i < D; ++i) dx[o + i] += tmp[i];
    });
  };
  std::vector<T>&dh2 = C.dh2, &datt = C.datt, &dq = C.dq, &dk = C.dk, &dv = C.dv;
  dh2.resize(dx.size());
  for (int il = static_cast<int>(c.n_layer) - 1; il >= 0; --il) {
    const LayerParams<T>& W = p.layers[il];
    LayerGrads<T>& G = g->layers[il];
    BlockCache<T>& B = C.blocks[il];
    // MoE: x_out = x_mid + MoE(ffn_norm(x_mid)).
    const T* dlogits_next = nullptr;
    if (il + 1 < static_cast<int>(c.n_layer) && cfgs[il + 1].gating_residual)
      dlogits_next = g->layers[il + 1].moe.prev_logits.data();
    if (c.IsMoeLayer(static_cast<uint32_t>(il))) {
      MoeBackward(cfgs[il], W.moe, B.moe, dx.data(), dh2.data(), &G.moe, pool, dlogits_next);
    } else {
      DenseFfnBackward(W, G, B, C, N, D, static_cast<int>(c.n_ff), dx.data(), dh2.data(), pool);
    }
    NormBackwardAdd(B.x_mid, W.ffn_norm, B.rstd2, dh2, &G.ffn_norm);
    if (c.is_mla()) {  // deepseek2's attention
      const MlaDims m(c);
      datt.resize(static_cast<size_t>(N) * H * m.Dv);
      LinearBackward(pool, B.att.data(), dx.data(), N, H * m.Dv, W.wo.data(), D, datt.data(), false, G.wo.data());
      C.datp.assign(static_cast<size_t>(N) * H * m.Dp, T(0));
      for (size_t r = 0; r < static_cast<size_t>(N) * H; ++r) std::copy_n(&datt[r * m.Dv], m.Dv, &C.datp[r * m.Dp]);
      MlaBackward(c, W, G, B, C, rope, T(1) / std::sqrt(static_cast<T>(m.Dk)), pool, dh);
      NormBackwardAdd(B.x_in, W.attn_norm, B.rstd1, dh, &G.attn_norm);
      continue;
    }
    // Attention output: x_mid = x_in + W_o att.
    datt.resize(static_cast<size_t>(N) * nq);  // written by the product below
    LinearBackward(pool, B.att.data(), dx.data(), N, nq, W.wo.data(), D, datt.data(), false, G.wo.data());
    dq.resize(static_cast<size_t>(N) * nq);  // written per head
    dk.assign(static_cast<size_t>(N) * nk, T(0));
    dv.assign(static_cast<size_t>(N) * nv, T(0));
    const T scale = T(1) / std::sqrt(static_cast<T>(Dh));
    const int group = H / Hkv;
    ForChunks(pool, static_cast<int64_t>(C.n_seq) * Hkv, 1, [&](int64_t b, int64_t e) {
      thread_local std::vector<T> scratch;
      scratch.resize(static_cast<size_t>(L) * L);
      for (int64_t item = b; item < e; ++item) {
        const int s = static_cast<int>(item / Hkv), gk = static_cast<int>(item % Hkv);
        const size_t row0 = static_cast<size_t>(s) * L;
        for (int h = gk * group; h < (gk + 1) * group; ++h) {
          AttnBackward(L, Dh, scale, &B.q[row0 * nq + h * Dh], nq, &B.k[row0 * nk + gk * Dh], nk,
                       &B.v[row0 * nv + gk * Dh], nv, &B.probs[(static_cast<size_t>(s) * H + h) * L * L],
                       &datt[row0 * nq + h * Dh], nq, &dq[row0 * nq + h * Dh], nq, &dk[row0 * nk + gk * Dh], nk,
                       &dv[row0 * nv + gk * Dh], nv, scratch.data());
        }
      }
    });
    // RoPE backward (the inverse rotation), then the Q/K norms.
    const bool qk = c.qk_norm != QkNorm::kNone;
    const int qh = c.qk_norm == QkNorm::kPerHead ? H : 1, kh = c.qk_norm == QkNorm::kPerHead ? Hkv : 1;
    const int qs = nq / qh, ks = nk / kh;
    ForChunks(pool, N, RowGrain(N, pool), [&](int64_t b, int64_t e) {
      for (int64_t t = b; t < e; ++t) {
        const int pos = static_cast<int>(t % L);
        rope.Apply(&dq[t * nq], H, Dh, pos, true);
        rope.Apply(&dk[t * nk], Hkv, Dh, pos, true);
      }
    });
    if (qk) {
      ReduceOverTokens<T>(pool, N, qs, G.q_norm.data(), [&](int t, T* dw) {
        for (int h = 0; h < qh; ++h) {
          const size_t o = static_cast<size_t>(t) * nq + h * qs;
          RmsNormBack(&B.q_pre[o], W.q_norm.data(), B.q_rstd[static_cast<size_t>(t) * qh + h], &dq[o], qs, &dq[o], dw);
        }
      });
      ReduceOverTokens<T>(pool, N, ks, G.k_norm.data(), [&](int t, T* dw) {
        for (int h = 0; h < kh; ++h) {
          const size_t o = static_cast<size_t>(t) * nk + h * ks;
          RmsNormBack(&B.k_pre[o], W.k_norm.data(), B.k_rstd[static_cast<size_t>(t) * kh + h], &dk[o], ks, &dk[o], dw);
        }
      });
    }
    if (!W.bq.empty()) {  // bias gradients: column sums over tokens, in token order
      auto colsum = [&](const std::vector<T>& d, int n, std::vector<T>& db) {
        ForChunks(pool, n, 16, [&](int64_t b, int64_t e) {
          for (int64_t i = b; i < e; ++i) {
            T s = 0;
            for (int t = 0; t < N; ++t) s += d[static_cast<size_t>(t) * n + i];
            db[i] += s;
          }
        });
      };
      colsum(dq, nq, G.bq);
      colsum(dk, nk, G.bk);
      colsum(dv, nv, G.bv);
    }
    // Projections: dh1 = dq W_q + dk W_k + dv W_v.
    std::vector<T>& dh1 = dh;
    LinearBackward(pool, B.h1.data(), dq.data(), N, D, W.wq.data(), nq, dh1.data(), false, G.wq.data());
    LinearBackward(pool, B.h1.data(), dk.data(), N, D, W.wk.data(), nk, dh1.data(), true, G.wk.data());
    LinearBackward(pool, B.h1.data(), dv.data(), N, D, W.wv.data(), nv, dh1.data(), true, G.wv.data());
    NormBackwardAdd(B.x_in, W.attn_norm, B.rstd1, dh1, &G.attn_norm);
  }
  // Embeddings, in token order.
  for (int t = 0; t < N; ++t) {
    T* row = &g->token_embd[static_cast<size_t>(C.inputs[t]) * D];
    const T* d = &dx[static_cast<size_t>(t) * D];
    for (int i = 0; i < D; ++i) row[i] += d[i];
  }
}

template std::vector<MoeLayerConfig> TrainLayerConfigs(const ModelParams<float>&, const MoeLayerConfig&, double);
template std::vector<MoeLayerConfig> TrainLayerConfigs(const ModelParams<double>&, const MoeLayerConfig&, double);
template double ModelForward(const ModelParams<float>&, const std::vector<MoeLayerConfig>&, const int32_t*,
                             const uint8_t*, int, int, const TrainForwardOptions&, ModelCache<float>*);
template double ModelForward(const ModelParams<double>&, const std::vector<MoeLayerConfig>&, const int32_t*,
                             const uint8_t*, int, int, const TrainForwardOptions&, ModelCache<double>*);
template void ModelBackward(const ModelParams<float>&, const std::vector<MoeLayerConfig>&, ModelCache<float>&,
                            ModelGrads<float>*, ThreadPool*);
template void ModelBackward(const ModelParams<double>&, const std::vector<MoeLayerConfig>&, ModelCache<double>&,
                            ModelGrads<double>*, ThreadPool*);

}  // namespace moe
