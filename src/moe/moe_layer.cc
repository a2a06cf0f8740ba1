// The grouped MoE layer: router, capacity, permuted expert GEMMs, shared experts, losses,
// backward, telemetry. See moe_layer.h for the conventions.
#include "moe/moe_layer.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <mutex>
#include <random>

#include "moe/moe_layer_internal.h"
#include "util/error.h"
#include "util/threadpool.h"

extern "C" void openblas_set_num_threads(int);

namespace moe {
namespace {

// Our pool owns the threads: every BLAS call runs single-threaded inside one pool thread.
void SingleThreadedBlasOnce() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

// C [m][n] = alpha * op(A) op(B) + beta * C, row-major.
void Gemm(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda,
          const float* b, int ldb, float beta, float* c, int ldc) {
  cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n,
              k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void Gemm(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda,
          const double* b, int ldb, double beta, double* c, int ldc) {
  cblas_dgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, m, n,
              k, alpha, a, lda, b, ldb, beta, c, ldc);
}

int PadRows(int n) { return (n + kMoeRowBlock - 1) / kMoeRowBlock * kMoeRowBlock; }

// c [m_pad][n] = a [m_pad][kd] * b[n][kd]^T in blocks of exactly kMoeRowBlock rows: every call has
// the same shape, so a row's result does not depend on the rows around it (BLAS picks kernels and
// blockings by shape; with a fixed shape the arithmetic of each row is fixed).
template <typename T>
void BlockedGemmNT(const T* a, int m_pad, const T* b, int n, int kd, T* c) {
  for (int r = 0; r < m_pad; r += kMoeRowBlock) {
    Gemm(false, true, kMoeRowBlock, n, kd, T(1), a + static_cast<size_t>(r) * kd, kd, b, kd, T(0),
         c + static_cast<size_t>(r) * n, n);
  }
}

template <typename T>
T Sigmoid(T v) { return T(1) / (T(1) + std::exp(-v)); }

template <typename T>
T Silu(T v) { return v * Sigmoid(v); }

// d silu(v) / dv
template <typename T>
T SiluGrad(T v) {
  const T s = Sigmoid(v);
  return s * (T(1) + v * (T(1) - s));
}

// SwiGLU expert forward on m rows (padded to m_pad with zero rows): xe [m_pad][D] ->
// hg, hu [m_pad][F], out [m_pad][D].
template <typename T>
void SwigluForward(const T* xe, int m_pad, const T* wg, const T* wu, const T* wd, int d, int f,
                   T* hg, T* hu, T* act, T* out) {
  BlockedGemmNT(xe, m_pad, wg, f, d, hg);
  BlockedGemmNT(xe, m_pad, wu, f, d, hu);
  const size_t n = static_cast<size_t>(m_pad) * f;
  for (size_t i = 0; i < n; ++i) act[i] = Silu(hg[i]) * hu[i];
  BlockedGemmNT(act, m_pad, wd, d, f, out);
}

// SwiGLU expert backward on m rows: from dout [m][D] and the saved hg, hu [m][F], adds the weight
// gradients and writes dxe [m][D].
template <typename T>
void SwigluBackward(const T* xe, const T* hg, const T* hu, const T* dout, int m, const T* wg,
                    const T* wu, const T* wd, int d, int f, T* dwg, T* dwu, T* dwd, T* dxe) {
  std::vector<T> act(static_cast<size_t>(m) * f), dact(act.size()), dg(act.size()), du(act.size());
  for (size_t i = 0; i < act.size(); ++i) act[i] = Silu(hg[i]) * hu[i];
  Gemm(false, false, m, f, d, T(1), dout, d, wd, f, T(0), dact.data(), f);      // [m][F]
  Gemm(true, false, d, f, m, T(1), dout, d, act.data(), f, T(1), dwd, f);       // [D][F]
  for (size_t i = 0; i < act.size(); ++i) {
    dg[i] = dact[i] * hu[i] * SiluGrad(hg[i]);
    du[i] = dact[i] * Silu(hg[i]);
  }
  Gemm(true, false, f, d, m, T(1), dg.data(), f, xe, d, T(1), dwg, d);          // [F][D]
  Gemm(true, false, f, d, m, T(1), du.data(), f, xe, d, T(1), dwu, d);          // [F][D]
  Gemm(false, false, m, d, f, T(1), dg.data(), f, wg, d, T(0), dxe, d);         // [m][D]
  Gemm(false, false, m, d, f, T(1), du.data(), f, wu, d, T(1), dxe, d);
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

// Softmax / sigmoid of one logits row, and the balance probabilities.
template <typename T>
void Gating(MoeRouterKind kind, const T* logits, int e_count, T* probs, T* bprobs) {
  switch (kind) {
    case MoeRouterKind::kSoftmaxTopK:
    case MoeRouterKind::kExpertChoice: {
      T mx = logits[0];
      for (int e = 1; e < e_count; ++e) mx = std::max(mx, logits[e]);
      T sum = 0;
      for (int e = 0; e < e_count; ++e) sum += probs[e] = std::exp(logits[e] - mx);
      for (int e = 0; e < e_count; ++e) bprobs[e] = probs[e] /= sum;
      break;
    }
    case MoeRouterKind::kSigmoidBias: {
      T sum = 0;
      for (int e = 0; e < e_count; ++e) sum += probs[e] = Sigmoid(logits[e]);
      for (int e = 0; e < e_count; ++e) bprobs[e] = probs[e] / sum;
      break;
    }
  }
}

// Top-k of one token (ids best first; ties go to the lower expert index), with the bias and the
// optional group limit applied to the selection score only.
template <typename T>
void SelectExperts(const MoeLayerConfig& cfg, const T* probs, const T* bias, int32_t* ids) {
  const int E = cfg.n_expert;
  if (cfg.router == MoeRouterKind::kExpertChoice) {
    // Slot j is expert j; whether it is used is the experts' choice (ExpertChoiceKept).
    for (int j = 0; j < E; ++j) ids[j] = j;
    return;
  }
  std::vector<T> score(probs, probs + E);
  if (cfg.router == MoeRouterKind::kSigmoidBias && bias != nullptr) {
    for (int e = 0; e < E; ++e) score[e] += bias[e];
  }
  const T kNeg = -std::numeric_limits<T>::infinity();
  if (cfg.n_group > 1) {
    const int gs = E / cfg.n_group;
    std::vector<T> gscore(cfg.n_group);
    for (int g = 0; g < cfg.n_group; ++g) {
      T b1 = kNeg, b2 = kNeg;  // the two best scores of the group
      for (int e = g * gs; e < (g + 1) * gs; ++e) {
        if (score[e] > b1) {
          b2 = b1;
          b1 = score[e];
        } else if (score[e] > b2) {
          b2 = score[e];
        }
      }
      gscore[g] = gs >= 2 ? b1 + b2 : b1;
    }
    std::vector<uint8_t> keep(cfg.n_group, 0);
    for (int r = 0; r < cfg.topk_group; ++r) {
      int best = -1;
      for (int g = 0; g < cfg.n_group; ++g) {
        if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
      }
      keep[best] = 1;
    }
    for (int e = 0; e < E; ++e) {
      if (!keep[e / gs]) score[e] = kNeg;
    }
  }
  std::vector<uint8_t> taken(E, 0);
  for (int j = 0; j < cfg.k; ++j) {
    int best = -1;
    for (int e = 0; e < E; ++e) {
      if (!taken[e] && (best < 0 || score[e] > score[best])) best = e;
    }
    taken[best] = 1;
    ids[j] = best;
  }
}

template <typename T>
void GateWeights(const MoeLayerConfig& cfg, const T* probs, const int32_t* ids, T* gw) {
  T sum = 0;
  for (int j = 0; j < cfg.k; ++j) sum += gw[j] = probs[ids[j]];
  for (int j = 0; j < cfg.k; ++j) {
    if (cfg.norm_topk) gw[j] /= sum;
    gw[j] *= static_cast<T>(cfg.weights_scale);
  }
}

// Capacity in token order, slot by slot within a token.
void ApplyCapacity(const MoeLayerConfig& cfg, int n_tokens, int seq_len,
                   const std::vector<int32_t>& ids, std::vector<uint8_t>* kept) {
  const int64_t cap = internal::ExpertCapacity(cfg, n_tokens, seq_len);
  kept->assign(ids.size(), 1);
  if (cap < 0) return;
  std::vector<int64_t> count(cfg.n_expert, 0);
  for (int t = 0; t < n_tokens; ++t) {
    if (seq_len > 0 && t % seq_len == 0) std::fill(count.begin(), count.end(), 0);
    for (int j = 0; j < cfg.k; ++j) {
      const size_t s = static_cast<size_t>(t) * cfg.k + j;
      if (count[ids[s]]++ >= cap) (*kept)[s] = 0;
    }
  }
}

// Expert choice: expert e keeps slot (t, e) for its c best tokens by probs[t][e] (ties to the lower
// token index); every other slot is marked not kept. probs [T][E].
template <typename T>
void ExpertChoiceKept(const MoeLayerConfig& cfg, int n_tokens, const std::vector<T>& probs,
                      std::vector<uint8_t>* kept) {
  const int E = cfg.n_expert;
  kept->assign(static_cast<size_t>(n_tokens) * E, 0);
  if (n_tokens == 0) return;
  const int64_t cap = internal::ExpertChoiceCapacity(cfg, n_tokens);
  std::vector<int32_t> order(n_tokens);
  for (int e = 0; e < E; ++e) {
    for (int t = 0; t < n_tokens; ++t) order[t] = t;
    auto better = [&](int32_t a, int32_t b) {
      const T pa = probs[static_cast<size_t>(a) * E + e], pb = probs[static_cast<size_t>(b) * E + e];
      return pa > pb || (pa == pb && a < b);
    };
    std::partial_sort(order.begin(), order.begin() + cap, order.end(), better);
    for (int64_t r = 0; r < cap; ++r) (*kept)[static_cast<size_t>(order[r]) * E + e] = 1;
  }
}

}  // namespace

template <typename T>
void PermuteTokens(const RoutingPlan& plan, const T* x, int d, T* out) {
  const size_t n_slots = static_cast<size_t>(plan.n_tokens) * plan.k;
  for (size_t q = 0; q < n_slots; ++q) {
    const T* src = x + static_cast<size_t>(plan.sorted_slots[q] / plan.k) * d;
    std::copy(src, src + d, out + q * d);
  }
}

template <typename T>
void UnpermuteSlots(const RoutingPlan& plan, const T* sorted, int d, T* out) {
  const size_t n_slots = static_cast<size_t>(plan.n_tokens) * plan.k;
  for (size_t s = 0; s < n_slots; ++s) {
    const T* src = sorted + static_cast<size_t>(plan.slot_position[s]) * d;
    std::copy(src, src + d, out + s * d);
  }
}

// ---- grouped forward ------------------------------------------------------------------------

template <typename T>
void MoeForward(const MoeLayerConfig& cfg, const MoeWeights<T>& w, const T* x, int n_tokens,
                T* y, MoeCache<T>* cache, const MoeForwardOptions& opt) {
  internal::CheckWeights(cfg, w);
  SingleThreadedBlasOnce();
  const int D = cfg.d_model, F = cfg.d_ff, E = cfg.n_expert, K = cfg.k;
  const int S = cfg.n_shared, Fs = cfg.d_ff_shared;
  const size_t nd = static_cast<size_t>(n_tokens) * D;
  const auto* fixed = static_cast<const MoeCache<T>*>(opt.fixed_routing);
  if (fixed != nullptr && fixed->n_tokens != n_tokens) {
    Fail("MoE layer: the fixed routing was made for %d tokens, this call has %d", fixed->n_tokens, n_tokens);
  }
  if (opt.seq_len > 0 && n_tokens % opt.seq_len != 0) {
    Fail("MoE layer: %d tokens are not whole sequences of seq_len = %d", n_tokens, opt.seq_len);
  }
  if (cfg.router == MoeRouterKind::kExpertChoice && opt.seq_len > 0) {
    Fail("MoE layer: expert_choice chooses over the whole batch: set seq_len = 0 (got %d)", opt.seq_len);
  }
  MoeCache<T>& c = *cache;
  std::vector<int32_t> fixed_ids;
  std::vector<uint8_t> fixed_kept;
  std::vector<T> noise;
  if (fixed != nullptr) {
    fixed_ids = fixed->plan.expert_ids;
    fixed_kept = fixed->kept;
    noise = fixed->noise;
  } else if (opt.training && cfg.jitter_eps > 0) {
    std::mt19937_64 rng(opt.jitter_seed);
    std::uniform_real_distribution<double> u(1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps);
    noise.resize(nd);
    for (T& v : noise) v = static_cast<T>(u(rng));
  }
  c.n_tokens = n_tokens;
  c.x.assign(x, x + nd);
  c.noise = std::move(noise);

  // Router logits on padded rows of the router input.
  const int t_pad = PadRows(n_tokens);
  std::vector<T> xr(static_cast<size_t>(t_pad) * D, T(0));  // [t_pad][D]
  for (size_t i = 0; i < nd; ++i) xr[i] = c.noise.empty() ? x[i] : x[i] * c.noise[i];
  // The router is E dot products per token (cheap next to the experts): plain loops in a fixed
  // order keep the logits, hence the selection, independent of the token's batch-mates whatever
  // the BLAS does.
  c.logits.resize(static_cast<size_t>(n_tokens) * E);
  for (int t = 0; t < n_tokens; ++t) {
    const T* xt = &xr[static_cast<size_t>(t) * D];
    for (int e = 0; e < E; ++e) {
      const T* wr = &w.router[static_cast<size_t>(e) * D];
      T a = 0;
      for (int d = 0; d < D; ++d) a += wr[d] * xt[d];
      c.logits[static_cast<size_t>(t) * E + e] = a;
    }
  }
  c.probs.resize(c.logits.size());
  c.bprobs.resize(c.logits.size());
  c.plan.expert_ids.resize(static_cast<size_t>(n_tokens) * K);
  c.gate_w.resize(static_cast<size_t>(n_tokens) * K);
  const T* bias = w.exp_probs_b.empty() ? nullptr : w.exp_probs_b.data();
  for (int t = 0; t < n_tokens; ++t) {
    const size_t re = static_cast<size_t>(t) * E, rk = static_cast<size_t>(t) * K;
    Gating(cfg.router, &c.logits[re], E, &c.probs[re], &c.bprobs[re]);
    if (fixed == nullptr) SelectExperts(cfg, &c.probs[re], bias, &c.plan.expert_ids[rk]);
    else std::copy(&fixed_ids[rk], &fixed_ids[rk] + K, &c.plan.expert_ids[rk]);
    GateWeights(cfg, &c.probs[re], &c.plan.expert_ids[rk], &c.gate_w[rk]);
  }
  if (fixed != nullptr) c.kept = fixed_kept;
  else if (cfg.router == MoeRouterKind::kExpertChoice) ExpertChoiceKept(cfg, n_tokens, c.probs, &c.kept);
  else ApplyCapacity(cfg, n_tokens, opt.seq_len, c.plan.expert_ids, &c.kept);
  if (cfg.router == MoeRouterKind::kExpertChoice) c.active = c.kept;
  else c.active.assign(c.kept.size(), 1);
  internal::FinishRouting(cfg, n_tokens, &c);

  // Losses.
  {
    std::vector<double> f(E, 0.0), pm(E, 0.0);
    for (int32_t id : c.plan.expert_ids) f[id] += 1.0;
    double z = 0.0;
    for (int t = 0; t < n_tokens; ++t) {
      const T* lg = &c.logits[static_cast<size_t>(t) * E];
      double mx = lg[0];
      for (int e = 1; e < E; ++e) mx = std::max(mx, static_cast<double>(lg[e]));
      double s = 0.0;
      for (int e = 0; e < E; ++e) s += std::exp(lg[e] - mx);
      const double lse = mx + std::log(s);
      z += lse * lse;
      for (int e = 0; e < E; ++e) pm[e] += c.bprobs[static_cast<size_t>(t) * E + e];
    }
    double aux = 0.0;
    const double n_slots = static_cast<double>(n_tokens) * K;
    for (int e = 0; e < E; ++e) aux += (f[e] / n_slots) * (pm[e] / n_tokens);
    c.aux_loss = n_tokens > 0 ? internal::AuxCoef(cfg) * E * aux : 0.0;
    c.z_loss = n_tokens > 0 ? cfg.z_loss_coef * z / n_tokens : 0.0;
  }

  // Routed experts, one task per expert.
  const size_t n_kept = c.kept_slots.size();
  c.h_gate.resize(n_kept * F);
  c.h_up.resize(n_kept * F);
  c.expert_out.resize(n_kept * D);
  ParallelOver(opt.pool, E, [&](int e) {
    const int r0 = c.kept_offsets[e], m = c.kept_offsets[e + 1] - r0;
    if (m == 0) return;
    const int m_pad = PadRows(m);
    std::vector<T> xe(static_cast<size_t>(m_pad) * D, T(0));  // [m_pad][D] permuted tokens
    for (int r = 0; r < m; ++r) {
      const T* src = x + static_cast<size_t>(c.kept_slots[r0 + r] / K) * D;
      std::copy(src, src + D, &xe[static_cast<size_t>(r) * D]);
    }
    std::vector<T> hg(static_cast<size_t>(m_pad) * F), hu(hg.size()), act(hg.size());
    std::vector<T> out(static_cast<size_t>(m_pad) * D);
    const size_t wo = static_cast<size_t>(e) * F * D;
    SwigluForward(xe.data(), m_pad, &w.gate_exps[wo], &w.up_exps[wo], &w.down_exps[wo], D, F,
                  hg.data(), hu.data(), act.data(), out.data());
    std::copy(hg.begin(), hg.begin() + static_cast<size_t>(m) * F, &c.h_gate[static_cast<size_t>(r0) * F]);
    std::copy(hu.begin(), hu.begin() + static_cast<size_t>(m) * F, &c.h_up[static_cast<size_t>(r0) * F]);
    std::copy(out.begin(), out.begin() + static_cast<size_t>(m) * D, &c.expert_out[static_cast<size_t>(r0) * D]);
  });

  // Shared experts over all tokens.
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

  // Combine each token in selection order, then the shared experts.
  for (int t = 0; t < n_tokens; ++t) {
    T* yt = y + static_cast<size_t>(t) * D;
    std::fill(yt, yt + D, T(0));
    for (int j = 0; j < K; ++j) {
      const size_t s = static_cast<size_t>(t) * K + j;
      if (c.slot_row[s] < 0) continue;
      const T g = c.gate_w[s];
      const T* o = &c.expert_out[static_cast<size_t>(c.slot_row[s]) * D];
      for (int d = 0; d < D; ++d) yt[d] += g * o[d];
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
  SingleThreadedBlasOnce();
  const int D = cfg.d_model, F = cfg.d_ff, E = cfg.n_expert, K = cfg.k;
  const int S = cfg.n_shared, Fs = cfg.d_ff_shared;
  const int n = c.n_tokens;
  const size_t nd = static_cast<size_t>(n) * D;
  {
    MoeGrads<T> want;
    want.Resize(cfg);
    if (g->router.size() != want.router.size() || g->gate_exps.size() != want.gate_exps.size() ||
        g->gate_shexp.size() != want.gate_shexp.size() ||
        g->gate_inp_shexp.size() != want.gate_inp_shexp.size()) {
      Fail("MoE layer: the gradient arrays do not match the config: call MoeGrads::Resize(cfg)");
    }
  }
  const T* x = c.x.data();

  // Gate-weight gradients of kept slots.
  std::vector<T> dgw(static_cast<size_t>(n) * K, T(0));  // [T][k]
  for (size_t s = 0; s < dgw.size(); ++s) {
    if (c.slot_row[s] < 0) continue;
    const T* o = &c.expert_out[static_cast<size_t>(c.slot_row[s]) * D];
    const T* d = dy + (s / K) * D;
    T a = 0;
    for (int i = 0; i < D; ++i) a += d[i] * o[i];
    dgw[s] = a;
  }

  // Routed experts.
  std::vector<T> dx_rows(c.kept_slots.size() * D);  // [n_kept][D]
  ParallelOver(pool, E, [&](int e) {
    const int r0 = c.kept_offsets[e], m = c.kept_offsets[e + 1] - r0;
    if (m == 0) return;
    std::vector<T> xe(static_cast<size_t>(m) * D), dout(xe.size());  // [m][D]
    for (int r = 0; r < m; ++r) {
      const int s = c.kept_slots[r0 + r];
      const T* src = x + static_cast<size_t>(s / K) * D;
      std::copy(src, src + D, &xe[static_cast<size_t>(r) * D]);
      const T gw = c.gate_w[s];
      const T* d = dy + static_cast<size_t>(s / K) * D;
      for (int i = 0; i < D; ++i) dout[static_cast<size_t>(r) * D + i] = gw * d[i];
    }
    const size_t wo = static_cast<size_t>(e) * F * D;
    SwigluBackward(xe.data(), &c.h_gate[static_cast<size_t>(r0) * F],
                   &c.h_up[static_cast<size_t>(r0) * F], dout.data(), m, &w.gate_exps[wo],
                   &w.up_exps[wo], &w.down_exps[wo], D, F, &g->gate_exps[wo], &g->up_exps[wo],
                   &g->down_exps[wo], &dx_rows[static_cast<size_t>(r0) * D]);
  });
  for (int t = 0; t < n; ++t) {
    T* dxt = dx + static_cast<size_t>(t) * D;
    std::fill(dxt, dxt + D, T(0));
    for (int j = 0; j < K; ++j) {
      const int row = c.slot_row[static_cast<size_t>(t) * K + j];
      if (row < 0) continue;
      const T* src = &dx_rows[static_cast<size_t>(row) * D];
      for (int i = 0; i < D; ++i) dxt[i] += src[i];
    }
  }

  // Router: gate weights -> probabilities -> logits, plus the aux and z losses.
  std::vector<double> f(E, 0.0);
  for (int32_t id : c.plan.expert_ids) f[id] += 1.0 / (static_cast<double>(n) * K);
  std::vector<T> dlogits(static_cast<size_t>(n) * E);  // [T][E]
  std::vector<T> dp(E), dbp(E);
  const T scale = static_cast<T>(cfg.weights_scale);
  for (int t = 0; t < n; ++t) {
    const T* p = &c.probs[static_cast<size_t>(t) * E];
    const T* bp = &c.bprobs[static_cast<size_t>(t) * E];
    const T* lg = &c.logits[static_cast<size_t>(t) * E];
    const int32_t* ids = &c.plan.expert_ids[static_cast<size_t>(t) * K];
    const T* dw = &dgw[static_cast<size_t>(t) * K];
    std::fill(dp.begin(), dp.end(), T(0));
    if (cfg.norm_topk) {
      T sum = 0, dot = 0;
      for (int j = 0; j < K; ++j) sum += p[ids[j]];
      for (int j = 0; j < K; ++j) dot += dw[j] * p[ids[j]] / sum;
      for (int j = 0; j < K; ++j) dp[ids[j]] += scale * (dw[j] - dot) / sum;
    } else {
      for (int j = 0; j < K; ++j) dp[ids[j]] += scale * dw[j];
    }
    for (int e = 0; e < E; ++e) dbp[e] = static_cast<T>(internal::AuxCoef(cfg) * E * f[e] / n);
    T* dl = &dlogits[static_cast<size_t>(t) * E];
    switch (cfg.router) {
      case MoeRouterKind::kSoftmaxTopK:
      case MoeRouterKind::kExpertChoice: {
        T dot = 0;
        for (int e = 0; e < E; ++e) dot += p[e] * (dp[e] + dbp[e]);
        for (int e = 0; e < E; ++e) dl[e] = p[e] * (dp[e] + dbp[e] - dot);
        break;
      }
      case MoeRouterKind::kSigmoidBias: {
        T sum = 0, dot = 0;
        for (int e = 0; e < E; ++e) sum += p[e];
        for (int e = 0; e < E; ++e) dot += dbp[e] * bp[e];
        for (int e = 0; e < E; ++e) {
          const T ds = dp[e] + (dbp[e] - dot) / sum;
          dl[e] = ds * p[e] * (T(1) - p[e]);
        }
        break;
      }
    }
    // z-loss: d/dlogit of coef * lse^2 / n = coef * 2 lse softmax(logits) / n.
    T mx = lg[0];
    for (int e = 1; e < E; ++e) mx = std::max(mx, lg[e]);
    T s = 0;
    for (int e = 0; e < E; ++e) s += std::exp(lg[e] - mx);
    const T lse = mx + std::log(s);
    const T zc = static_cast<T>(cfg.z_loss_coef * 2.0 / n) * lse;
    for (int e = 0; e < E; ++e) dl[e] += zc * std::exp(lg[e] - mx) / s;
  }
  if (n > 0) {
    std::vector<T> xr(nd);
    for (size_t i = 0; i < nd; ++i) xr[i] = c.noise.empty() ? x[i] : x[i] * c.noise[i];
    Gemm(true, false, E, D, n, T(1), dlogits.data(), E, xr.data(), D, T(1), g->router.data(), D);
    std::vector<T> dxr(nd);
    Gemm(false, false, n, D, E, T(1), dlogits.data(), E, w.router.data(), D, T(0), dxr.data(), D);
    for (size_t i = 0; i < nd; ++i) dx[i] += c.noise.empty() ? dxr[i] : dxr[i] * c.noise[i];
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
      SwigluBackward(x, &c.sh_gate[ho], &c.sh_up[ho], dsh.data(), n, &w.gate_shexp[wo],
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
