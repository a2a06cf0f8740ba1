// The grouped MoE layer: router, capacity, permuted expert GEMMs, shared experts, losses,
// backward, telemetry. See moe_layer.h for the conventions.
#include "moe/moe_layer.h"
#include "moe/swiglu_act.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <random>
#include <type_traits>

#include "kernels/gemm.h"
#include "kernels/swiglu.h"
#include "moe/moe_layer_internal.h"
#include "moe/routing.h"
#include "util/error.h"
#include "util/threadpool.h"

namespace moe {
namespace {

// C [m][n] = op(A) op(B) + beta * C, row-major, beta in {0, 1}. float: moe.cpp's own GEMM, whose
// per-element arithmetic does not depend on the other rows (kernels/gemm.h); double (the
// reference precision of the tests): BLAS through the bridge of kernels/gemm.h.
template <typename T>
void Gemm(bool ta, bool tb, int m, int n, int k, const T* a, int lda, const T* b, int ldb,
          T beta, T* c, int ldc) {
  MOE_ASSERT(!(ta && tb) && (beta == T(0) || beta == T(1)));
  const kernels::GemmOp op = ta ? kernels::GemmOp::kTN : (tb ? kernels::GemmOp::kNT : kernels::GemmOp::kNN);
  kernels::Gemm(op, m, n, k, a, lda, b, ldb, c, ldc, beta != T(0));
}

// Rows an expert GEMM computes for m tokens. float: m (the kernel's rows are independent of each
// other). double: m rounded up to whole blocks of kMoeRowBlock, every BLAS call on a block of
// exactly that shape, because BLAS picks kernels and blockings by shape (with a fixed shape the
// arithmetic of each row is fixed).
template <typename T>
int PadRows(int m) {
  if constexpr (std::is_same_v<T, float>) {
    return m;
  } else {
    return (m + kMoeRowBlock - 1) / kMoeRowBlock * kMoeRowBlock;
  }
}

// c [m_pad][n] = a [m_pad][kd] * b[n][kd]^T, m_pad = PadRows<T>(m).
template <typename T>
void BlockedGemmNT(const T* a, int m_pad, const T* b, int n, int kd, T* c) {
  if constexpr (std::is_same_v<T, float>) {
    Gemm(false, true, m_pad, n, kd, a, kd, b, kd, 0.0f, c, n);
  } else {
    for (int r = 0; r < m_pad; r += kMoeRowBlock) {
      Gemm(false, true, kMoeRowBlock, n, kd, a + static_cast<size_t>(r) * kd, kd, b, kd, T(0),
           c + static_cast<size_t>(r) * n, n);
    }
  }
}


// Per-thread scratch arrays of the expert products: grown once, never shrunk, never zeroed (every
// use writes before it reads), so the hot loops do not allocate or clear memory per expert.
template <typename T>
struct Scratch {
  std::vector<T> v[6];
  T* Get(int i, size_t n) {
    if (v[i].size() < n) v[i].resize(n);
    return v[i].data();
  }
};
template <typename T>
Scratch<T>& ThreadScratch() {
  thread_local Scratch<T> s;
  return s;
}

// SwiGLU expert forward on m rows (padded to m_pad with zero rows): xe [m_pad][D] ->
// hg, hu [m_pad][F], out [m_pad][D]; act [m_pad][F] is scratch.
template <typename T>
void SwigluForward(const T* xe, int m_pad, const T* wg, const T* wu, const T* wd, int d, int f,
                   T* hg, T* hu, T* act, T* out) {
  BlockedGemmNT(xe, m_pad, wg, f, d, hg);
  BlockedGemmNT(xe, m_pad, wu, f, d, hu);
  SwigluAct(hg, hu, act, static_cast<size_t>(m_pad) * f);
  BlockedGemmNT(act, m_pad, wd, d, f, out);
}

// SwiGLU expert backward on m rows: from dout [m][D] and the saved hg, hu [m][F], adds the weight
// gradients and writes dxe [m][D].
// saved_act: the forward's silu(hg) * hu, or nullptr to recompute it.
template <typename T>
void SwigluBackward(const T* xe, const T* hg, const T* hu, const T* saved_act, const T* dout, int m,
                    const T* wg, const T* wu, const T* wd, int d, int f, T* dwg, T* dwu, T* dwd,
                    T* dxe) {
  const size_t n = static_cast<size_t>(m) * f;
  Scratch<T>& sc = ThreadScratch<T>();
  const T* act = saved_act;
  if (act == nullptr) {
    T* a = sc.Get(0, n);
    SwigluAct(hg, hu, a, n);
    act = a;
  }
  T* dact = sc.Get(1, n);
  T* dg = sc.Get(2, n);
  T* du = sc.Get(3, n);
  Gemm(false, false, m, f, d, dout, d, wd, f, T(0), dact, f);      // [m][F]
  Gemm(true, false, d, f, m, dout, d, act, f, T(1), dwd, f);       // [D][F]
  SwigluGrads(hg, hu, dact, dg, du, n);
  Gemm(true, false, f, d, m, dg, f, xe, d, T(1), dwg, d);          // [F][D]
  Gemm(true, false, f, d, m, du, f, xe, d, T(1), dwu, d);          // [F][D]
  Gemm(false, false, m, d, f, dg, f, wg, d, T(0), dxe, d);         // [m][D]
  Gemm(false, false, m, d, f, du, f, wu, d, T(1), dxe, d);
}

void ParallelOver(ThreadPool* pool, int n, const std::function<void(int)>& fn) {
  if (pool == nullptr || pool->size() == 1 || n <= 1) {
    for (int i = 0; i < n; ++i) fn(i);
    return;
  }
  pool->ParallelFor(n, 1, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) fn(static_cast<int>(i));
  });
}

// Work items of the routed experts. Rows of one expert are independent in every product but the
// weight gradients, so the forward and the row-wise backward run on chunks of at most
// kMoeRowBlock rows, and the weight gradients on slices of output rows (each slice is one GEMM
// whose chain over the tokens is the same as the unsplit one). Many small items keep both threads
// busy when expert loads, or the cores, are uneven.
struct RowChunk {
  int e, r0, m;  // expert, first kept row, rows
};
// Chunks of `rows` rows (double: exactly kMoeRowBlock, the padded BLAS block).
std::vector<RowChunk> RowChunks(const std::vector<int32_t>& offsets, int rows) {
  std::vector<RowChunk> v;
  for (size_t e = 0; e + 1 < offsets.size(); ++e) {
    for (int r = offsets[e]; r < offsets[e + 1]; r += rows) {
      v.push_back({static_cast<int>(e), r, std::min(rows, offsets[e + 1] - r)});
    }
  }
  return v;
}
// float: larger chunks, since each GEMM call packs its weight matrix once.
template <typename T>
constexpr int kChunkRows = std::is_same_v<T, float> ? 512 : kMoeRowBlock;
struct GradSlice {
  int e, which, r0, r1;  // expert, 0 = W_down rows [r0, r1) of D, 1 = W_gate / 2 = W_up rows of F
};
constexpr int kGradSliceRows = 256;

// log-sum-exp of one logits row.
template <typename T>
double LogSumExp(const T* lg, int n) {
  double mx = lg[0];
  for (int e = 1; e < n; ++e) mx = std::max(mx, static_cast<double>(lg[e]));
  double s = 0.0;
  for (int e = 0; e < n; ++e) s += std::exp(lg[e] - mx);
  return mx + std::log(s);
}

}  // namespace

template <typename T>
void PermuteTokens(const RoutingPlan& plan, const T* x, int d, T* out) {
  for (int q = 0; q < plan.n_rows(); ++q) {
    const T* src = x + static_cast<size_t>(plan.sorted_slots[q] / plan.k) * d;
    std::copy(src, src + d, out + static_cast<size_t>(q) * d);
  }
}

template <typename T>
void UnpermuteSlots(const RoutingPlan& plan, const T* sorted, int d, T* out) {
  const size_t n_slots = static_cast<size_t>(plan.n_tokens) * plan.k;
  for (size_t s = 0; s < n_slots; ++s) {
    const int pos = plan.slot_position[s];
    if (pos < 0) {
      std::fill(out + s * d, out + (s + 1) * d, T(0));
    } else {
      std::copy(sorted + static_cast<size_t>(pos) * d, sorted + static_cast<size_t>(pos + 1) * d, out + s * d);
    }
  }
}

// ---- grouped forward ------------------------------------------------------------------------

template <typename T>
void MoeForward(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const T* x, int n_tokens,
                T* y, MoeCache<T>* cache, const MoeForwardOptions& opt) {
  internal::CheckWeights(cfg, w);
  internal::CheckForwardOptions<T>(cfg, n_tokens, opt);
  const int D = cfg.d_model, F = cfg.d_ff, K = cfg.k, R = cfg.router_width();
  const int S = cfg.n_shared, Fs = cfg.d_ff_shared, C = cfg.n_const;
  const bool routed = cfg.router != MoeRouterKind::kHash;  // has a learned router
  const size_t nd = static_cast<size_t>(n_tokens) * D, nk = static_cast<size_t>(n_tokens) * K;
  const size_t nr = static_cast<size_t>(n_tokens) * R;
  const auto* fixed = static_cast<const MoeCache<T>*>(opt.fixed_routing);
  MoeCache<T>& c = *cache;
  // Take what the fixed routing provides before c is overwritten (c may be *fixed).
  std::vector<int32_t> fixed_ids;
  std::vector<uint8_t> fixed_dropped;
  std::vector<T> noise;
  std::vector<int32_t> token_ids;
  if (fixed != nullptr) {
    fixed_ids = fixed->plan.expert_ids;
    fixed_dropped.assign(nk, 0);
    for (size_t s = 0; s < nk; ++s) {
      fixed_dropped[s] = fixed_ids[s] >= 0 && fixed_ids[s] < cfg.n_expert && fixed->plan.slot_position[s] < 0;
    }
    noise = fixed->noise;
    token_ids = fixed->token_ids;
  } else {
    if (opt.training && cfg.jitter_eps > 0) {
      std::mt19937_64 rng(opt.jitter_seed);
      std::uniform_real_distribution<double> u(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps);
      noise.resize(nd);
      for (T& v : noise) v = static_cast<T>(u(rng));
    }
    if (opt.token_ids != nullptr) token_ids.assign(opt.token_ids, opt.token_ids + n_tokens);
  }
  c.n_tokens = n_tokens;
  c.x.assign(x, x + nd);
  c.noise = std::move(noise);
  c.token_ids = std::move(token_ids);
  const auto* prev = static_cast<const T*>(opt.prev_logits);
  if (prev != nullptr) c.prev_logits.assign(prev, prev + nr);
  else c.prev_logits.clear();

  // Router logits [T][R]: a GEMM whose rows do not depend on each other (float), or plain loops in a
  // fixed order (double), so a token's logits, hence its selection, ignore its batch-mates.
  c.logits.assign(routed ? nr : 0, T(0));
  c.probs.assign(c.logits.size(), T(0));
  c.bprobs.assign(c.logits.size(), T(0));
  if (routed && n_tokens > 0) {
    const T* xr = x;
    std::vector<T> jittered;
    if (!c.noise.empty()) {
      jittered.resize(nd);
      for (size_t i = 0; i < nd; ++i) jittered[i] = x[i] * c.noise[i];
      xr = jittered.data();
    }
    if constexpr (std::is_same_v<T, float>) {
      Gemm(false, true, n_tokens, R, D, xr, D, w.router.data(), D, 0.0f, c.logits.data(), R);
    } else {
      for (int t = 0; t < n_tokens; ++t) {
        const T* xt = xr + static_cast<size_t>(t) * D;
        for (int e = 0; e < R; ++e) {
          const T* wr = &w.router[static_cast<size_t>(e) * D];
          T a = 0;
          for (int d = 0; d < D; ++d) a += wr[d] * xt[d];
          c.logits[static_cast<size_t>(t) * R + e] = a;
        }
      }
    }
    for (int t = 0; t < n_tokens; ++t) {
      T* lg = &c.logits[static_cast<size_t>(t) * R];
      if (!c.prev_logits.empty()) {
        const T* pv = &c.prev_logits[static_cast<size_t>(t) * R];
        for (int e = 0; e < R; ++e) {
          const T* wg = &w.gate_res[static_cast<size_t>(e) * R];
          T a = 0;
          for (int j = 0; j < R; ++j) a += wg[j] * pv[j];
          lg[e] += a;
        }
      }
    }
  }

  // Selection, gate weights and capacity: the router (routing.h), or the fixed assignment.
  c.gate_w.resize(nk);
  const T* bias = w.exp_probs_b.empty() ? nullptr : w.exp_probs_b.data();
  if (fixed == nullptr) {
    RouteOptions ro;
    ro.token_ids = c.token_ids.empty() ? nullptr : c.token_ids.data();
    ro.seq_len = opt.seq_len;
    Route(cfg, routed ? c.logits.data() : static_cast<const T*>(nullptr), n_tokens, bias, ro,
          routed ? c.probs.data() : nullptr, routed ? c.bprobs.data() : nullptr, c.gate_w.data(), &c.plan);
  } else {  // the fixed slots and drops, weighted with this call's probabilities
    RoutingPlan& p = c.plan;
    p.n_tokens = n_tokens;
    p.k = K;
    p.n_expert = cfg.n_expert;
    p.n_targets = R;
    p.expert_ids = std::move(fixed_ids);
    p.weights.resize(nk);
    for (int t = 0; t < n_tokens; ++t) {
      const size_t o = static_cast<size_t>(t) * R, ok = static_cast<size_t>(t) * K;
      if (routed) RouterGating(cfg, &c.logits[o], &c.probs[o], &c.bprobs[o]);
      RouterWeights(cfg, routed ? &c.probs[o] : static_cast<const T*>(nullptr), &p.expert_ids[ok], &c.gate_w[ok]);
    }
    for (size_t s = 0; s < nk; ++s) p.weights[s] = static_cast<float>(c.gate_w[s]);
    p.BuildGroups(fixed_dropped.data());
  }
  internal::SetLossScope(cfg, opt.balance, &c);

  // Losses over the scope: this call's share of the global terms.
  c.aux_loss = c.z_loss = c.entropy_loss = 0.0;
  if (routed && n_tokens > 0 && c.loss_tokens > 0) {
    std::vector<double> pm(R, 0.0);
    double z = 0.0, h = 0.0;
    for (int t = 0; t < n_tokens; ++t) {
      const double lse = LogSumExp(&c.logits[static_cast<size_t>(t) * R], R);
      z += lse * lse;
      const T* bp = &c.bprobs[static_cast<size_t>(t) * R];
      for (int e = 0; e < R; ++e) {
        pm[e] += bp[e];
        if (bp[e] > 0) h -= bp[e] * std::log(static_cast<double>(bp[e]));
      }
    }
    double aux = 0.0;
    for (int e = 0; e < R; ++e) aux += internal::BalanceEta(cfg, e) * c.loss_f[e] * pm[e];
    c.aux_loss = internal::AuxCoef(cfg) * R * aux / c.loss_tokens;
    c.z_loss = cfg.z_loss_coef * z / c.loss_tokens;
    c.entropy_loss = cfg.EntropyCoef() * h / c.loss_tokens;
  }

  // Constant experts' mixing weights [a1, a2] = softmax(W_c x), for every token.
  c.const_a.assign(static_cast<size_t>(n_tokens) * C * 2, T(0));
  for (int t = 0; t < n_tokens && C > 0; ++t) {
    const T* xt = x + static_cast<size_t>(t) * D;
    for (int ci = 0; ci < C; ++ci) {
      T z[2];
      for (int r = 0; r < 2; ++r) {
        const T* wc = &w.const_wc[(static_cast<size_t>(ci) * 2 + r) * D];
        T a = 0;
        for (int d = 0; d < D; ++d) a += wc[d] * xt[d];
        z[r] = a;
      }
      const T mx = std::max(z[0], z[1]);
      const T e0 = std::exp(z[0] - mx), e1 = std::exp(z[1] - mx);
      T* a = &c.const_a[(static_cast<size_t>(t) * C + ci) * 2];
      a[0] = e0 / (e0 + e1);
      a[1] = e1 / (e0 + e1);
    }
  }

  // Routed FFN experts, in row chunks.
  const size_t n_kept = c.plan.sorted_slots.size();
  c.xe.resize(n_kept * D);
  c.h_gate.resize(n_kept * F);
  c.h_up.resize(n_kept * F);
  c.act.resize(n_kept * F);
  c.expert_out.resize(n_kept * D);
  const std::vector<RowChunk> chunks = RowChunks(c.plan.expert_offsets, kChunkRows<T>);
  ParallelOver(opt.pool, static_cast<int>(chunks.size()), [&](int i) {
    const RowChunk ch = chunks[i];
    const size_t r0 = ch.r0;
    for (int r = 0; r < ch.m; ++r) {  // gather the chunk's tokens
      const T* src = x + static_cast<size_t>(c.plan.sorted_slots[r0 + r] / K) * D;
      std::copy(src, src + D, &c.xe[(r0 + r) * D]);
    }
    const size_t wo = static_cast<size_t>(ch.e) * F * D;
    const int m_pad = PadRows<T>(ch.m);
    if (m_pad == ch.m) {  // float: straight into the cache
      SwigluForward(&c.xe[r0 * D], ch.m, &w.gate_exps[wo], &w.up_exps[wo], &w.down_exps[wo], D, F,
                    &c.h_gate[r0 * F], &c.h_up[r0 * F], &c.act[r0 * F], &c.expert_out[r0 * D]);
      return;
    }
    // double: a zero-padded block of exactly kMoeRowBlock rows, then the real rows copied out.
    Scratch<T>& sc = ThreadScratch<T>();
    const size_t mf = static_cast<size_t>(m_pad) * F, md = static_cast<size_t>(m_pad) * D;
    T* xe = sc.Get(0, md);
    std::copy(&c.xe[r0 * D], &c.xe[r0 * D] + static_cast<size_t>(ch.m) * D, xe);
    std::fill(xe + static_cast<size_t>(ch.m) * D, xe + md, T(0));
    T *hg = sc.Get(1, mf), *hu = sc.Get(2, mf), *act = sc.Get(3, mf), *out = sc.Get(4, md);
    SwigluForward(xe, m_pad, &w.gate_exps[wo], &w.up_exps[wo], &w.down_exps[wo], D, F, hg, hu, act, out);
    const size_t rf = static_cast<size_t>(ch.m) * F;
    std::copy(hg, hg + rf, &c.h_gate[r0 * F]);
    std::copy(hu, hu + rf, &c.h_up[r0 * F]);
    std::copy(act, act + rf, &c.act[r0 * F]);
    std::copy(out, out + static_cast<size_t>(ch.m) * D, &c.expert_out[r0 * D]);
  });

  // Shared experts over all tokens.
  const int t_pad = PadRows<T>(n_tokens);
  c.sh_gate.assign(static_cast<size_t>(S) * n_tokens * Fs, T(0));
  c.sh_up.assign(c.sh_gate.size(), T(0));
  c.sh_out.assign(S > 0 ? nd : 0, T(0));
  c.sh_g.assign(cfg.shared_gate ? n_tokens : 0, T(0));
  if (S > 0) {
    std::vector<T> xp(static_cast<size_t>(t_pad) * D, T(0));
    std::copy(x, x + nd, xp.begin());
    std::vector<std::vector<T>> outs(S);
    ParallelOver(opt.pool, S, [&](int s) {
      std::vector<T> hg(static_cast<size_t>(t_pad) * Fs), hu(hg.size()), act(hg.size());
      outs[s].resize(static_cast<size_t>(t_pad) * D);
      const size_t wo = static_cast<size_t>(s) * Fs * D;
      SwigluForward(xp.data(), t_pad, &w.gate_shexp[wo], &w.up_shexp[wo], &w.down_shexp[wo], D,
                    Fs, hg.data(), hu.data(), act.data(), outs[s].data());
      const size_t off = static_cast<size_t>(s) * n_tokens * Fs;
      std::copy(hg.begin(), hg.begin() + static_cast<size_t>(n_tokens) * Fs, &c.sh_gate[off]);
      std::copy(hu.begin(), hu.begin() + static_cast<size_t>(n_tokens) * Fs, &c.sh_up[off]);
    });
    for (int s = 0; s < S; ++s) {
      for (size_t i = 0; i < nd; ++i) c.sh_out[i] += outs[s][i];
    }
    if (cfg.shared_gate) {
      for (int t = 0; t < n_tokens; ++t) {
        T a = 0;
        for (int d = 0; d < D; ++d) a += w.gate_inp_shexp[d] * x[static_cast<size_t>(t) * D + d];
        c.sh_g[t] = Sigmoid(a);
      }
    }
  }

  // Combine each token in slot order, then the shared experts.
  const int const0 = R - C;  // id of the first constant expert
  for (int t = 0; t < n_tokens; ++t) {
    const T* xt = x + static_cast<size_t>(t) * D;
    T* yt = y + static_cast<size_t>(t) * D;
    std::fill(yt, yt + D, T(0));
    for (int j = 0; j < K; ++j) {
      const size_t s = static_cast<size_t>(t) * K + j;
      const int id = c.plan.expert_ids[s];
      if (id < 0) continue;  // unused slot
      const T g = c.gate_w[s];
      switch (cfg.TargetKind(id)) {
        case MoeTargetKind::kFfn: {
          if (c.plan.slot_position[s] < 0) break;  // dropped by capacity
          const T* o = &c.expert_out[static_cast<size_t>(c.plan.slot_position[s]) * D];
          for (int d = 0; d < D; ++d) yt[d] += g * o[d];
          break;
        }
        case MoeTargetKind::kNull:
        case MoeTargetKind::kZero:
          break;
        case MoeTargetKind::kCopy:
          for (int d = 0; d < D; ++d) yt[d] += g * xt[d];
          break;
        case MoeTargetKind::kConst: {
          const int ci = id - const0;
          const T* a = &c.const_a[(static_cast<size_t>(t) * C + ci) * 2];
          const T* v = &w.const_v[static_cast<size_t>(ci) * D];
          for (int d = 0; d < D; ++d) yt[d] += g * (a[0] * xt[d] + a[1] * v[d]);
          break;
        }
      }
    }
    if (S > 0) {
      const T g = cfg.shared_gate ? c.sh_g[t] : T(1);
      const T* o = &c.sh_out[static_cast<size_t>(t) * D];
      for (int d = 0; d < D; ++d) yt[d] += g * o[d];
    }
  }
}

// ---- grouped backward -----------------------------------------------------------------------

template <typename T>
void MoeBackward(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const MoeCache<T>& c,
                 const T* dy, T* dx, MoeGrads<T>* g, ThreadPool* pool, const T* dlogits_in) {
  internal::CheckWeights(cfg, w);
  const int D = cfg.d_model, F = cfg.d_ff, E = cfg.n_expert, K = cfg.k, R = cfg.router_width();
  const int S = cfg.n_shared, Fs = cfg.d_ff_shared, C = cfg.n_const, const0 = R - C;
  const bool routed = cfg.router != MoeRouterKind::kHash;
  const int n = c.n_tokens;
  const size_t nd = static_cast<size_t>(n) * D;
  internal::CheckGrads(cfg, *g);
  if (c.plan.expert_ids.size() != static_cast<size_t>(n) * K || c.x.size() != nd) {
    Fail("MoE layer: the cache does not come from a forward of this config");
  }
  const T* x = c.x.data();
  std::fill(dx, dx + nd, T(0));

  // Gate-weight gradients of the used slots, and the zero-computation experts' own gradients.
  std::vector<T> dgw(static_cast<size_t>(n) * K, T(0));  // [T][k]
  for (int t = 0; t < n; ++t) {
    const T* d = dy + static_cast<size_t>(t) * D;
    const T* xt = x + static_cast<size_t>(t) * D;
    T* dxt = dx + static_cast<size_t>(t) * D;
    for (int j = 0; j < K; ++j) {
      const size_t s = static_cast<size_t>(t) * K + j;
      const int id = c.plan.expert_ids[s];
      if (id < 0) continue;
      const T gw = c.gate_w[s];
      T a = 0;
      switch (cfg.TargetKind(id)) {
        case MoeTargetKind::kFfn: {
          if (c.plan.slot_position[s] < 0) break;
          const T* o = &c.expert_out[static_cast<size_t>(c.plan.slot_position[s]) * D];
          for (int i = 0; i < D; ++i) a += d[i] * o[i];
          break;
        }
        case MoeTargetKind::kNull:
        case MoeTargetKind::kZero:
          break;
        case MoeTargetKind::kCopy:
          for (int i = 0; i < D; ++i) {
            a += d[i] * xt[i];
            dxt[i] += gw * d[i];
          }
          break;
        case MoeTargetKind::kConst: {
          const int ci = id - const0;
          const T* al = &c.const_a[(static_cast<size_t>(t) * C + ci) * 2];
          const T* v = &w.const_v[static_cast<size_t>(ci) * D];
          T dx_dot = 0, dv_dot = 0;  // <dy, x>, <dy, v>
          for (int i = 0; i < D; ++i) {
            dx_dot += d[i] * xt[i];
            dv_dot += d[i] * v[i];
          }
          a = al[0] * dx_dot + al[1] * dv_dot;
          // out = a1 x + a2 v with [a1, a2] = softmax(z), z = W_c x.
          const T da0 = gw * dx_dot, da1 = gw * dv_dot;
          const T dot = al[0] * da0 + al[1] * da1;
          const T dz[2] = {al[0] * (da0 - dot), al[1] * (da1 - dot)};
          T* dv = &g->const_v[static_cast<size_t>(ci) * D];
          for (int i = 0; i < D; ++i) {
            dv[i] += gw * al[1] * d[i];
            dxt[i] += gw * al[0] * d[i];
          }
          for (int r = 0; r < 2; ++r) {
            const size_t wo = (static_cast<size_t>(ci) * 2 + r) * D;
            for (int i = 0; i < D; ++i) {
              g->const_wc[wo + i] += dz[r] * xt[i];
              dxt[i] += dz[r] * w.const_wc[wo + i];
            }
          }
          break;
        }
      }
      dgw[s] = a;
    }
  }

  // Routed FFN experts. Buffers [n_kept][.] kept between calls (every row is written before it
  // is read): dout = gate weight * dy, dg / du the gradients at W_gate x / W_up x, dx rows.
  const size_t n_kept = c.plan.sorted_slots.size();
  thread_local std::vector<T> dx_rows_buf, dout_buf, dg_buf, du_buf;
  for (auto* b : {&dx_rows_buf, &dout_buf}) {
    if (b->size() < n_kept * D) b->resize(n_kept * D);
  }
  for (auto* b : {&dg_buf, &du_buf}) {
    if (b->size() < n_kept * F) b->resize(n_kept * F);
  }
  T *dx_rows = dx_rows_buf.data(), *dout = dout_buf.data(), *dg = dg_buf.data(), *du = du_buf.data();
  // Row-wise part, per chunk: dact = dout W_down, dg / du, dx rows = dg W_gate + du W_up.
  const std::vector<RowChunk> chunks = RowChunks(c.plan.expert_offsets, kChunkRows<T>);
  ParallelOver(pool, static_cast<int>(chunks.size()), [&](int i) {
    const RowChunk ch = chunks[i];
    const size_t r0 = ch.r0, rf = r0 * F, rd = r0 * D;
    for (int r = 0; r < ch.m; ++r) {
      const int s = c.plan.sorted_slots[r0 + r];
      const T gw = c.gate_w[s];
      const T* d = dy + static_cast<size_t>(s / K) * D;
      T* o = dout + (r0 + r) * D;
      for (int q = 0; q < D; ++q) o[q] = gw * d[q];
    }
    const size_t wo = static_cast<size_t>(ch.e) * F * D;
    T* dact = ThreadScratch<T>().Get(0, static_cast<size_t>(ch.m) * F);
    Gemm(false, false, ch.m, F, D, dout + rd, D, &w.down_exps[wo], F, T(0), dact, F);
    SwigluGrads(&c.h_gate[rf], &c.h_up[rf], dact, dg + rf, du + rf, static_cast<size_t>(ch.m) * F);
    Gemm(false, false, ch.m, D, F, dg + rf, F, &w.gate_exps[wo], D, T(0), dx_rows + rd, D);
    Gemm(false, false, ch.m, D, F, du + rf, F, &w.up_exps[wo], D, T(1), dx_rows + rd, D);
  });
  // Weight gradients, per slice of output rows: dW_down += dout^T act, dW_gate += dg^T xe,
  // dW_up += du^T xe over the expert's rows.
  std::vector<GradSlice> slices;
  for (int e = 0; e < E; ++e) {
    if (c.plan.expert_offsets[e + 1] == c.plan.expert_offsets[e]) continue;
    for (int r = 0; r < D; r += kGradSliceRows) slices.push_back({e, 0, r, std::min(D, r + kGradSliceRows)});
    for (int which : {1, 2}) {
      for (int r = 0; r < F; r += kGradSliceRows) slices.push_back({e, which, r, std::min(F, r + kGradSliceRows)});
    }
  }
  ParallelOver(pool, static_cast<int>(slices.size()), [&](int i) {
    const GradSlice sl = slices[i];
    const size_t r0 = c.plan.expert_offsets[sl.e];
    const int m = c.plan.expert_offsets[sl.e + 1] - c.plan.expert_offsets[sl.e];
    const size_t wo = static_cast<size_t>(sl.e) * F * D;
    const int rows = sl.r1 - sl.r0;
    if (sl.which == 0) {
      Gemm(true, false, rows, F, m, dout + r0 * D + sl.r0, D, &c.act[r0 * F], F, T(1),
           &g->down_exps[wo + static_cast<size_t>(sl.r0) * F], F);
    } else {
      const T* dh = (sl.which == 1 ? dg : du) + r0 * F + sl.r0;
      T* dw = sl.which == 1 ? &g->gate_exps[wo] : &g->up_exps[wo];
      Gemm(true, false, rows, D, m, dh, F, &c.xe[r0 * D], D, T(1), dw + static_cast<size_t>(sl.r0) * D, D);
    }
  });
  for (int t = 0; t < n; ++t) {
    T* dxt = dx + static_cast<size_t>(t) * D;
    for (int j = 0; j < K; ++j) {
      const int row = c.plan.slot_position[static_cast<size_t>(t) * K + j];
      if (row < 0) continue;
      const T* src = &dx_rows[static_cast<size_t>(row) * D];
      for (int i = 0; i < D; ++i) dxt[i] += src[i];
    }
  }

  // Router: gate weights -> probabilities -> logits, plus the aux, z and entropy losses.
  if (routed && n > 0) {
    const double N = c.loss_tokens;
    std::vector<T> dlogits(static_cast<size_t>(n) * R);  // [T][R]
    std::vector<T> dp(R), dbp(R);
    const T scale = static_cast<T>(cfg.weights_scale);
    const double aux_c = internal::AuxCoef(cfg) * R / N, ent_c = cfg.EntropyCoef() / N;
    for (int t = 0; t < n; ++t) {
      const T* p = &c.probs[static_cast<size_t>(t) * R];
      const T* bp = &c.bprobs[static_cast<size_t>(t) * R];
      const T* lg = &c.logits[static_cast<size_t>(t) * R];
      const int32_t* ids = &c.plan.expert_ids[static_cast<size_t>(t) * K];
      const T* dw = &dgw[static_cast<size_t>(t) * K];
      std::fill(dp.begin(), dp.end(), T(0));
      // Normalised slots: used, not null (see RouterWeights).
      T sum = 0, dot = 0;
      auto normed = [&](int j) {
        return cfg.norm_topk && ids[j] >= 0 && cfg.TargetKind(ids[j]) != MoeTargetKind::kNull;
      };
      for (int j = 0; j < K; ++j) {
        if (normed(j)) sum += p[ids[j]];
      }
      for (int j = 0; j < K; ++j) {
        if (normed(j)) dot += dw[j] * p[ids[j]] / sum;
      }
      for (int j = 0; j < K; ++j) {
        if (ids[j] < 0) continue;
        if (normed(j)) dp[ids[j]] += scale * (dw[j] - dot) / sum;
        else dp[ids[j]] += scale * dw[j];
      }
      for (int e = 0; e < R; ++e) {
        double v = aux_c * internal::BalanceEta(cfg, e) * c.loss_f[e];
        if (ent_c != 0 && bp[e] > 0) v -= ent_c * (std::log(static_cast<double>(bp[e])) + 1.0);
        dbp[e] = static_cast<T>(v);
      }
      T* dl = &dlogits[static_cast<size_t>(t) * R];
      if (cfg.router == MoeRouterKind::kSigmoidBias) {
        T ssum = 0, bdot = 0;
        for (int e = 0; e < R; ++e) ssum += p[e];
        for (int e = 0; e < R; ++e) bdot += dbp[e] * bp[e];
        for (int e = 0; e < R; ++e) {
          const T ds = dp[e] + (dbp[e] - bdot) / ssum;
          dl[e] = ds * p[e] * (T(1) - p[e]);
        }
      } else {  // softmax: probs == bprobs
        T pdot = 0;
        for (int e = 0; e < R; ++e) pdot += p[e] * (dp[e] + dbp[e]);
        for (int e = 0; e < R; ++e) dl[e] = p[e] * (dp[e] + dbp[e] - pdot);
      }
      // z-loss: d/dlogit of coef * lse^2 / N = coef * 2 lse softmax(logits) / N.
      T mx = lg[0];
      for (int e = 1; e < R; ++e) mx = std::max(mx, lg[e]);
      T s = 0;
      for (int e = 0; e < R; ++e) s += std::exp(lg[e] - mx);
      const T lse = mx + std::log(s);
      const T zc = static_cast<T>(cfg.z_loss_coef * 2.0 / N) * lse;
      for (int e = 0; e < R; ++e) dl[e] += zc * std::exp(lg[e] - mx) / s;
      if (dlogits_in != nullptr) {
        for (int e = 0; e < R; ++e) dl[e] += dlogits_in[static_cast<size_t>(t) * R + e];
      }
    }
    if (c.noise.empty()) {
      Gemm(true, false, R, D, n, dlogits.data(), R, x, D, T(1), g->router.data(), D);
      Gemm(false, false, n, D, R, dlogits.data(), R, w.router.data(), D, T(1), dx, D);
    } else {  // the router saw x * noise
      std::vector<T> xr(nd);
      for (size_t i = 0; i < nd; ++i) xr[i] = x[i] * c.noise[i];
      Gemm(true, false, R, D, n, dlogits.data(), R, xr.data(), D, T(1), g->router.data(), D);
      std::vector<T> dxr(nd);
      Gemm(false, false, n, D, R, dlogits.data(), R, w.router.data(), D, T(0), dxr.data(), D);
      for (size_t i = 0; i < nd; ++i) dx[i] += dxr[i] * c.noise[i];
    }
    if (cfg.gating_residual) {
      // logits += W_g prev: dW_g += dlogits^T prev; d prev = dlogits W_g.
      g->prev_logits.assign(static_cast<size_t>(n) * R, T(0));
      Gemm(false, false, n, R, R, dlogits.data(), R, w.gate_res.data(), R, T(0), g->prev_logits.data(), R);
      if (!c.prev_logits.empty()) {
        Gemm(true, false, R, R, n, dlogits.data(), R, c.prev_logits.data(), R, T(1), g->gate_res.data(), R);
      }
    }
  }

  // Shared experts.
  if (S > 0 && n > 0) {
    std::vector<T> dsh(nd);  // [T][D] gradient of the summed shared output
    for (int t = 0; t < n; ++t) {
      const T gt = cfg.shared_gate ? c.sh_g[t] : T(1);
      for (int i = 0; i < D; ++i) dsh[static_cast<size_t>(t) * D + i] = gt * dy[static_cast<size_t>(t) * D + i];
    }
    if (cfg.shared_gate) {
      for (int t = 0; t < n; ++t) {
        const T* d = dy + static_cast<size_t>(t) * D;
        const T* o = &c.sh_out[static_cast<size_t>(t) * D];
        T a = 0;
        for (int i = 0; i < D; ++i) a += d[i] * o[i];
        const T dgl = a * c.sh_g[t] * (T(1) - c.sh_g[t]);
        const T* xt = x + static_cast<size_t>(t) * D;
        for (int i = 0; i < D; ++i) {
          g->gate_inp_shexp[i] += dgl * xt[i];
          dx[static_cast<size_t>(t) * D + i] += dgl * w.gate_inp_shexp[i];
        }
      }
    }
    std::vector<std::vector<T>> dxs(S, std::vector<T>(nd));
    ParallelOver(pool, S, [&](int s) {
      const size_t wo = static_cast<size_t>(s) * Fs * D, ho = static_cast<size_t>(s) * n * Fs;
      SwigluBackward(x, &c.sh_gate[ho], &c.sh_up[ho], static_cast<const T*>(nullptr), dsh.data(), n,
                     &w.gate_shexp[wo],
                     &w.up_shexp[wo], &w.down_shexp[wo], D, Fs, &g->gate_shexp[wo],
                     &g->up_shexp[wo], &g->down_shexp[wo], dxs[s].data());
    });
    for (int s = 0; s < S; ++s) {
      for (size_t i = 0; i < nd; ++i) dx[i] += dxs[s][i];
    }
  }
}

#define MOE_INSTANTIATE(T)                                                                      \
  template void PermuteTokens<T>(const RoutingPlan&, const T*, int, T*);                        \
  template void UnpermuteSlots<T>(const RoutingPlan&, const T*, int, T*);                       \
  template void MoeForward<T>(const MoeLayerConfig&, const MoeWeights<T>&, const T*, int, T*,   \
                              MoeCache<T>*, const MoeForwardOptions&);                          \
  template void MoeBackward<T>(const MoeLayerConfig&, const MoeWeights<T>&, const MoeCache<T>&, \
                               const T*, T*, MoeGrads<T>*, ThreadPool*, const T*);
MOE_INSTANTIATE(float)
MOE_INSTANTIATE(double)
#undef MOE_INSTANTIATE

}  // namespace moe
