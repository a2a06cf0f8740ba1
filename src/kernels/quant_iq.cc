// Quantizers of the codebook i-quants (iq2_xxs, iq2_xs, iq2_s, iq3_xxs, iq3_s, iq1_s, iq1_m). ggml's quantizers for these
// search a neighbourhood of each group's nearest lattice point with importance weights; this one
// searches the whole grid for every group at each of a range of sub-block scales (simpler, and
// slower), minimising the squared error. The encodings are the formats' own (kernels/iq_grid.h),
// so ggml dequantizes them to the same values; tests/kernels/ggml_oracle_test.cc compares the
// error with ggml's quantizer on the same rows.
#include "kernels/quant_iq.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/iq_grid.h"
#include "tensor/iq_tables.h"
#include "util/error.h"

namespace moe::kernels {
namespace {

// A codebook as floats: n entries of `width` magnitudes (8 for iq2, 4 for iq3), also stored
// element-major so the search over entries runs as vector loops.
struct Codebook {
  int n, width;
  std::vector<float> mag;   // [n][width]
  std::vector<float> magT;  // [width][n]
  std::vector<float> mag2;  // [n]: sum of squares
};

template <typename G>
Codebook MakeCodebook(const G* grid, int n, int width) {
  const size_t sz = static_cast<size_t>(n) * width;
  Codebook c{n, width, std::vector<float>(sz), std::vector<float>(sz), std::vector<float>(n)};
  for (int i = 0; i < n; ++i) {
    float s = 0;
    for (int k = 0; k < width; ++k) {
      const float m = static_cast<float>((grid[i] >> (8 * k)) & 0xFF);
      c.mag[static_cast<size_t>(i) * width + k] = m;
      c.magT[static_cast<size_t>(k) * n + i] = m;
      s += m * m;
    }
    c.mag2[i] = s;
  }
  return c;
}

const Codebook& IQ2XXSBook() {
  static const Codebook c = MakeCodebook(kIQ2XXSGrid, 256, 8);
  return c;
}
const Codebook& IQ3XXSBook() {
  static const Codebook c = MakeCodebook(kIQ3XXSGrid, 256, 4);
  return c;
}
const Codebook& IQ3SBook() {
  static const Codebook c = MakeCodebook(kIQ3SGrid, 512, 4);
  return c;
}
const Codebook& IQ2XSBook() {
  static const Codebook c = MakeCodebook(kIQ2XSGrid, 512, 8);
  return c;
}
const Codebook& IQ2SBook() {
  static const Codebook c = MakeCodebook(kIQ2SGrid, 1024, 8);
  return c;
}

// One sub-block of n = 32 or 16 values as n / 8 groups of 8: signs, targets t = x * sign >= 0
// except where a parity format had to flip the sign of the group's least important element,
// and the error weights w (an importance matrix's; null: every element counts alike).
struct SubBlock {
  float t[32];
  const float* w;
  uint8_t sign[4];
  int n;
};

SubBlock Signs(const float* x, const float* w, bool parity, int n) {
  SubBlock s;
  s.n = n;
  s.w = w;
  // What flipping element k's sign costs: 4 w x^2.
  const auto cost = [x, w](int k) { return (w ? w[k] : 1.0f) * x[k] * x[k]; };
  for (int g = 0; g < n / 8; ++g) {
    uint8_t sg = 0;
    int smallest = 0;
    for (int k = 0; k < 8; ++k) {
      const float v = x[8 * g + k];
      if (v < 0) sg = static_cast<uint8_t>(sg | (1 << k));
      if (cost(8 * g + k) < cost(8 * g + smallest)) smallest = k;
    }
    if (parity && (__builtin_popcount(sg) & 1)) sg = static_cast<uint8_t>(sg ^ (1 << smallest));
    s.sign[g] = sg;
    for (int k = 0; k < 8; ++k) s.t[8 * g + k] = (sg >> k) & 1 ? -x[8 * g + k] : x[8 * g + k];
  }
  return s;
}

// The (weighted) squared error of entry i for a part p of a sub-block at scale a is
// a^2 |m_i|^2_w - 2 a m_i.t_p,w + |t_p|^2_w: the products do not depend on a, so they are
// computed once per sub-block and every trial scale costs one pass over the entries per part.
struct Search {
  const Codebook& c;
  int parts;             // sub-block size / width
  float mt[8][1024];     // [part][entry]: sum_k w_k m_ik t_k
  float mw2[8][1024];    // [part][entry]: sum_k w_k m_ik^2 (weighted searches only)
  const float* m2[8];    // [part]: mw2[part], or the codebook's |m_i|^2 without weights
  float t2[8];

  Search(const Codebook& cb, const SubBlock& sb) : c(cb), parts(sb.n / cb.width) {
    for (int p = 0; p < parts; ++p) {
      const float* t = sb.t + c.width * p;
      const float* w = sb.w ? sb.w + c.width * p : nullptr;
      float s2 = 0;
      for (int k = 0; k < c.width; ++k) s2 += (w ? w[k] : 1.0f) * t[k] * t[k];
      t2[p] = s2;
      float* row = mt[p];
      for (int i = 0; i < c.n; ++i) row[i] = 0;
      for (int k = 0; k < c.width; ++k) {
        const float* m = &c.magT[static_cast<size_t>(k) * c.n];
        const float wt = (w ? w[k] : 1.0f) * t[k];
        for (int i = 0; i < c.n; ++i) row[i] += m[i] * wt;
      }
      m2[p] = c.mag2.data();
      if (w) {
        float* q = mw2[p];
        for (int i = 0; i < c.n; ++i) q[i] = 0;
        for (int k = 0; k < c.width; ++k) {
          const float* m = &c.magT[static_cast<size_t>(k) * c.n];
          for (int i = 0; i < c.n; ++i) q[i] += w[k] * m[i] * m[i];
        }
        m2[p] = q;
      }
    }
  }
  // Best entries at scale a (the first of equals); returns the total squared error.
  float Choose(float a, int* idx) const {
    float total = 0;
    const float a2 = a * a, ta = 2 * a;
    for (int p = 0; p < parts; ++p) {
      const float* row = mt[p];
      const float* q = m2[p];
      int best = 0;
      float best_e = a2 * q[0] - ta * row[0];
      for (int i = 1; i < c.n; ++i) {
        const float e = a2 * q[i] - ta * row[i];
        if (e < best_e) {
          best_e = e;
          best = i;
        }
      }
      idx[p] = best;
      total += best_e + t2[p];
    }
    return total;
  }
  // The least-squares scale for the given entries (a if they give none).
  float Refit(const int* idx, float a) const {
    float num = 0, den = 0;
    for (int p = 0; p < parts; ++p) {
      num += mt[p][idx[p]];
      den += m2[p][idx[p]];
    }
    return den > 0 && num > 0 ? num / den : a;
  }
};

// The sub-block scale (before the 4-bit rounding): the best of a range of trial scales, each
// refined once by least squares over the entries it chose.
float FitSubBlockScale(const Search& s, const SubBlock& sb, float max_mag) {
  float amax = 0;
  for (int i = 0; i < sb.n; ++i) amax = std::max(amax, std::fabs(sb.t[i]));
  if (amax == 0) return 0;
  float best_a = amax / max_mag, best_e = -1;
  int idx[8];
  for (int k = 0; k < 20; ++k) {
    const float a0 = amax / max_mag * (0.5f + 0.04f * static_cast<float>(k));
    s.Choose(a0, idx);
    const float a = s.Refit(idx, a0);
    const float e = s.Choose(a, idx);
    if (best_e < 0 || e < best_e) {
      best_e = e;
      best_a = a;
    }
  }
  return best_a;
}

// Per-thread room for a super-block's searches (up to 16 x 32 KiB: too big for the stack).
std::vector<Search>* SearchScratch() {
  thread_local std::vector<Search> v = [] {
    std::vector<Search> s;
    s.reserve(16);
    return s;
  }();
  return &v;
}

// Shared driver: per super-block, sub-block scales a_j, then d with a_j ~ d kConst (2 ls_j + 1)
// (ls in 0..15), the entries chosen again at the rounded scales, and the format's packing.
template <class F, class Pack>
void QuantizeGrid(const Codebook& c, bool parity, float max_mag, const float* x, const float* qw,
                  uint8_t* y, int64_t nb, const Pack& pack) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK_K;
    constexpr int kSub = F::kSubBlocks, kLen = kQK_K / kSub;
    SubBlock sb[kSub];
    std::vector<Search>& search = *SearchScratch();
    search.clear();
    float a[kSub], amax = 0;
    for (int j = 0; j < kSub; ++j) {
      sb[j] = Signs(xb + kLen * j, qw ? qw + b * kQK_K + kLen * j : nullptr, parity, kLen);
      search.emplace_back(c, sb[j]);
      a[j] = FitSubBlockScale(search[j], sb[j], max_mag);
      amax = std::max(amax, a[j]);
    }
    typename F::Block blk;
    std::memset(&blk, 0, sizeof(blk));
    const uint16_t d16 = F32ToF16(amax / (31.0f * F::kConst));
    const float d = F16ToF32(d16) * F::kConst;
    int ls[16];
    int idx[16][8];
    for (int j = 0; j < kSub; ++j) {
      ls[j] = 0;
      if (d > 0) {
        // The odd multiple of d nearest to a_j, then the entries at that scale.
        const int l = static_cast<int>(std::lround((a[j] / d - 1) / 2));
        ls[j] = std::clamp(l, 0, 15);
      }
      search[j].Choose(d * static_cast<float>(2 * ls[j] + 1), idx[j]);
    }
    std::memcpy(&blk, &d16, sizeof(d16));  // d is the first field of every format
    pack(blk, ls, idx, sb);
    std::memcpy(y + b * sizeof(blk), &blk, sizeof(blk));
  }
}

// iq1_s: x ~ a (g + delta) with g a signed ternary grid entry of 8 (2048 of the 3^8 patterns)
// and delta = +-1/8 per sub-block of 32. A full search costs 2048 entries per group and trial;
// instead each group's ideal pattern round(x / a - delta) (clamped to -1..1) indexes a table of
// the kNear grid entries nearest to it (built once), and only those are scored exactly.
constexpr int kIQ1Near = 16;

struct IQ1Book {
  int8_t g[2048][8];
  std::vector<uint16_t> near;  // [6561][kIQ1Near]
  IQ1Book() : near(6561 * kIQ1Near) {
    for (int i = 0; i < 2048; ++i) {
      for (int k = 0; k < 8; ++k) g[i][k] = static_cast<int8_t>((kIQ1SGrid[i] >> (8 * k)) & 0xFF);
    }
    std::vector<std::pair<int, int>> dist(2048);
    for (int p = 0; p < 6561; ++p) {
      int q[8];
      for (int k = 0, r = p; k < 8; ++k, r /= 3) q[k] = r % 3 - 1;
      for (int i = 0; i < 2048; ++i) {
        int d2 = 0;
        for (int k = 0; k < 8; ++k) d2 += (g[i][k] - q[k]) * (g[i][k] - q[k]);
        dist[i] = {d2, i};
      }
      std::partial_sort(dist.begin(), dist.begin() + kIQ1Near, dist.end());
      for (int n = 0; n < kIQ1Near; ++n) near[static_cast<size_t>(p) * kIQ1Near + n] = static_cast<uint16_t>(dist[n].second);
    }
  }
};

// One sub-block of iq1_s (4 groups of 8) or iq1_m (2 groups): the best entry per group at a
// scale a and delta, and the refitted scale.
struct IQ1Search {
  const IQ1Book& b;
  const float* x;
  float w[32];  // error weights (ones without an importance matrix)
  int ng;       // groups
  float x1[4], x2[4], w1[4];  // per group: sum w x, sum w x^2, sum w
  IQ1Search(const IQ1Book& book, const float* xs, const float* ws, int groups) : b(book), x(xs), ng(groups) {
    for (int k = 0; k < 8 * ng; ++k) w[k] = ws ? ws[k] : 1.0f;
    for (int p = 0; p < ng; ++p) {
      x1[p] = x2[p] = w1[p] = 0;
      for (int k = 0; k < 8; ++k) {
        const float wk = w[8 * p + k], xk = x[8 * p + k];
        x1[p] += wk * xk;
        x2[p] += wk * xk * xk;
        w1[p] += wk;
      }
    }
  }
  // sum w g and sum w g^2 of entry i over group p.
  void Sums(int p, int i, float* wg, float* wg2) const {
    float s1 = 0, s2 = 0;
    for (int k = 0; k < 8; ++k) {
      const float wk = w[8 * p + k];
      s1 += wk * b.g[i][k];
      s2 += wk * b.g[i][k] * b.g[i][k];
    }
    *wg = s1;
    *wg2 = s2;
  }
  // Group p's squared error at (a, delta) with its best candidate entry (into *idx).
  float Group(int p, float a, float delta, int* idx) const {
    const float* xp = x + 8 * p;
    const float ia = a > 0 ? 1 / a : 0;
    int pattern = 0;
    for (int k = 7; k >= 0; --k) {
      const int q = std::clamp(static_cast<int>(std::lround(xp[k] * ia - delta)), -1, 1);
      pattern = 3 * pattern + (q + 1);
    }
    const uint16_t* cand = &b.near[static_cast<size_t>(pattern) * kIQ1Near];
    const float a2 = a * a, cw = w1[p] * delta * delta;
    const float* wp = w + 8 * p;
    int best = cand[0];
    float best_e = 0;
    for (int n = 0; n < kIQ1Near; ++n) {
      const int i = cand[n];
      float gx = 0, wg, wg2;
      for (int k = 0; k < 8; ++k) gx += b.g[i][k] * wp[k] * xp[k];
      Sums(p, i, &wg, &wg2);
      const float e = a2 * (wg2 + 2 * delta * wg + cw) - 2 * a * (gx + delta * x1[p]);
      if (n == 0 || e < best_e) {
        best_e = e;
        best = i;
      }
    }
    *idx = best;
    return best_e + x2[p];
  }
  // The sub-block's error at a: each group with its delta (free: each group's better of +-1/8,
  // written into delta).
  float Choose(float a, float* delta, bool free, int* idx) const {
    float total = 0;
    for (int p = 0; p < ng; ++p) {
      float e = Group(p, a, delta[p], &idx[p]);
      if (free) {
        int i2;
        const float e2 = Group(p, a, -delta[p], &i2);
        if (e2 < e) {
          e = e2;
          idx[p] = i2;
          delta[p] = -delta[p];
        }
      }
      total += e;
    }
    return total;
  }
  float Refit(const int* idx, const float* delta, float a) const {
    float num = 0, den = 0;
    for (int p = 0; p < ng; ++p) {
      float gx = 0, wg, wg2;
      for (int k = 0; k < 8; ++k) gx += b.g[idx[p]][k] * w[8 * p + k] * x[8 * p + k];
      Sums(p, idx[p], &wg, &wg2);
      num += gx + delta[p] * x1[p];
      den += wg2 + 2 * delta[p] * wg + w1[p] * delta[p] * delta[p];
    }
    return den > 0 && num > 0 ? num / den : a;
  }
  // The best scale (from a range of trials, each refitted) and deltas: one delta for all groups
  // (iq1_s) or one per group (iq1_m). Returns the scale; delta[0..ng) and the error are set.
  float Search(bool per_group, float* delta) const {
    float amax = 0;
    for (int k = 0; k < 8 * ng; ++k) amax = std::max(amax, std::fabs(x[k]));
    float best_a = 0, best_e = -1;
    for (float dl : {kIQ1SDelta, -kIQ1SDelta}) {
      if (per_group && dl < 0) break;  // the groups choose their own signs
      for (int k = 0; amax > 0 && k < 16; ++k) {
        float dt[4] = {dl, dl, dl, dl};
        int idx[4];
        const float a0 = amax / (1 + kIQ1SDelta) * (0.3f + 0.05f * static_cast<float>(k));
        Choose(a0, dt, per_group, idx);
        const float a1 = Refit(idx, dt, a0);
        const float e = Choose(a1, dt, per_group, idx);
        if (best_e < 0 || e < best_e) {
          best_e = e;
          best_a = a1;
          std::copy(dt, dt + ng, delta);
        }
      }
    }
    if (best_e < 0) std::fill(delta, delta + ng, kIQ1SDelta);
    return best_a;
  }
};

// The weights of elements [off, off + ...) of super-block b, or null.
const float* QwAt(const float* qw, int64_t b, int off) { return qw ? qw + b * kQK_K + off : nullptr; }

// The 3-bit scale index of a sub-block fitted at a, on the super-block scale d.
int IQ1Ls(float a, float d) {
  return d > 0 ? std::clamp(static_cast<int>(std::lround((a / d - 1) / 2)), 0, 7) : 0;
}

void QuantizeIQ1S(const float* x, const float* qw, uint8_t* y, int64_t nb) {
  static const IQ1Book book;
  for (int64_t bi = 0; bi < nb; ++bi) {
    const float* xb = x + bi * kQK_K;
    float a[8], delta[8][4], amax_all = 0;
    for (int j = 0; j < 8; ++j) {
      a[j] = IQ1Search(book, xb + 32 * j, QwAt(qw, bi, 32 * j), 4).Search(false, delta[j]);
      amax_all = std::max(amax_all, a[j]);
    }
    BlockIQ1_S blk;
    std::memset(&blk, 0, sizeof(blk));
    blk.d = F32ToF16(amax_all / 15.0f);
    const float d = F16ToF32(blk.d);
    for (int j = 0; j < 8; ++j) {
      const int ls = IQ1Ls(a[j], d);
      int idx[4];
      IQ1Search(book, xb + 32 * j, QwAt(qw, bi, 32 * j), 4).Choose(d * static_cast<float>(2 * ls + 1), delta[j], false, idx);
      uint16_t h = static_cast<uint16_t>((ls << 12) | (delta[j][0] < 0 ? 0x8000 : 0));
      for (int l = 0; l < 4; ++l) {
        blk.qs[4 * j + l] = static_cast<uint8_t>(idx[l] & 0xFF);
        h = static_cast<uint16_t>(h | ((idx[l] >> 8) << (3 * l)));
      }
      blk.qh[j] = h;
    }
    std::memcpy(y + bi * sizeof(blk), &blk, sizeof(blk));
  }
}

// iq1_m: the same grid and search in sub-blocks of 16 with a delta sign per group.
void QuantizeIQ1M(const float* x, const float* qw, uint8_t* y, int64_t nb) {
  static const IQ1Book book;
  for (int64_t bi = 0; bi < nb; ++bi) {
    const float* xb = x + bi * kQK_K;
    float a[16], delta[16][4], amax_all = 0;
    for (int j = 0; j < 16; ++j) {
      a[j] = IQ1Search(book, xb + 16 * j, QwAt(qw, bi, 16 * j), 2).Search(true, delta[j]);
      amax_all = std::max(amax_all, a[j]);
    }
    const uint16_t dbits = F32ToF16(amax_all / 15.0f);
    const float d = F16ToF32(dbits);
    BlockIQ1_M blk;
    std::memset(&blk, 0, sizeof(blk));
    uint16_t w[4] = {0, 0, 0, 0};
    for (int j = 0; j < 16; ++j) {
      const int ls = IQ1Ls(a[j], d);
      int idx[4];
      IQ1Search(book, xb + 16 * j, QwAt(qw, bi, 16 * j), 2).Choose(d * static_cast<float>(2 * ls + 1), delta[j], true, idx);
      w[j / 4] = static_cast<uint16_t>(w[j / 4] | (ls << (3 * (j % 4))));
      for (int l = 0; l < 2; ++l) {
        const int g = 2 * j + l;
        blk.qs[g] = static_cast<uint8_t>(idx[l] & 0xFF);
        const int h = (idx[l] >> 8) | (delta[j][l] < 0 ? 8 : 0);
        blk.qh[g / 2] = static_cast<uint8_t>(blk.qh[g / 2] | (h << (4 * (g % 2))));
      }
    }
    for (int i = 0; i < 4; ++i) {
      w[i] = static_cast<uint16_t>(w[i] | (((dbits >> (4 * i)) & 0xF) << 12));
      blk.scales[2 * i] = static_cast<uint8_t>(w[i] & 0xFF);
      blk.scales[2 * i + 1] = static_cast<uint8_t>(w[i] >> 8);
    }
    std::memcpy(y + bi * sizeof(blk), &blk, sizeof(blk));
  }
}

// The 7 stored sign bits of a parity format's group (bit 7 is implied).
uint32_t Sign7(uint8_t s) { return s & 127u; }

}  // namespace

void QuantizeIQGridRow(DType t, const float* x, void* y, int64_t n, const float* qw) {
  uint8_t* out = static_cast<uint8_t*>(y);
  const int64_t nb = n / kQK_K;
  switch (t) {
    case DType::kIQ2_XXS:
      QuantizeGrid<IQ2XXSFormat>(IQ2XXSBook(), true, 43.f, x, qw, out, nb,
                                 [](BlockIQ2_XXS& blk, const int* ls, const int (*idx)[8], const SubBlock* sb) {
        uint8_t* qs = reinterpret_cast<uint8_t*>(blk.qs);
        for (int j = 0; j < 8; ++j) {
          uint32_t aux = static_cast<uint32_t>(ls[j]) << 28;
          for (int g = 0; g < 4; ++g) {
            qs[8 * j + g] = static_cast<uint8_t>(idx[j][g]);
            aux |= Sign7(sb[j].sign[g]) << (7 * g);
          }
          std::memcpy(qs + 8 * j + 4, &aux, sizeof(aux));
        }
      });
      return;
    case DType::kIQ3_XXS:
      QuantizeGrid<IQ3XXSFormat>(IQ3XXSBook(), true, 62.f, x, qw, out, nb,
                                 [](BlockIQ3_XXS& blk, const int* ls, const int (*idx)[8], const SubBlock* sb) {
        for (int j = 0; j < 8; ++j) {
          uint32_t aux = static_cast<uint32_t>(ls[j]) << 28;
          for (int h = 0; h < 8; ++h) blk.qs[8 * j + h] = static_cast<uint8_t>(idx[j][h]);
          for (int g = 0; g < 4; ++g) aux |= Sign7(sb[j].sign[g]) << (7 * g);
          std::memcpy(blk.qs + kQK_K / 4 + 4 * j, &aux, sizeof(aux));
        }
      });
      return;
    case DType::kIQ3_S:
      QuantizeGrid<IQ3SFormat>(IQ3SBook(), false, 15.f, x, qw, out, nb,
                               [](BlockIQ3_S& blk, const int* ls, const int (*idx)[8], const SubBlock* sb) {
        for (int j = 0; j < 8; ++j) {
          blk.scales[j / 2] = static_cast<uint8_t>(blk.scales[j / 2] | (ls[j] << (4 * (j % 2))));
          for (int h = 0; h < 8; ++h) {
            blk.qs[8 * j + h] = static_cast<uint8_t>(idx[j][h] & 0xFF);
            blk.qh[j] = static_cast<uint8_t>(blk.qh[j] | ((idx[j][h] >> 8) << h));
          }
          for (int g = 0; g < 4; ++g) blk.signs[4 * j + g] = sb[j].sign[g];
        }
      });
      return;
    case DType::kIQ2_XS:
      QuantizeGrid<IQ2XSFormat>(IQ2XSBook(), true, 43.f, x, qw, out, nb,
                                [](BlockIQ2_XS& blk, const int* ls, const int (*idx)[8], const SubBlock* sb) {
        for (int j = 0; j < 16; ++j) {
          blk.scales[j / 2] = static_cast<uint8_t>(blk.scales[j / 2] | (ls[j] << (4 * (j % 2))));
          for (int g = 0; g < 2; ++g) {
            blk.qs[2 * j + g] = static_cast<uint16_t>(idx[j][g] | (Sign7(sb[j].sign[g]) << 9));
          }
        }
      });
      return;
    case DType::kIQ2_S:
      QuantizeGrid<IQ2SFormat>(IQ2SBook(), false, 43.f, x, qw, out, nb,
                               [](BlockIQ2_S& blk, const int* ls, const int (*idx)[8], const SubBlock* sb) {
        for (int j = 0; j < 16; ++j) {
          blk.scales[j / 2] = static_cast<uint8_t>(blk.scales[j / 2] | (ls[j] << (4 * (j % 2))));
          for (int h = 0; h < 2; ++h) {
            const int g = 2 * j + h;
            blk.qs[g] = static_cast<uint8_t>(idx[j][h] & 0xFF);
            blk.qs[32 + g] = sb[j].sign[h];
            blk.qh[g / 4] = static_cast<uint8_t>(blk.qh[g / 4] | ((idx[j][h] >> 8) << (2 * (g % 4))));
          }
        }
      });
      return;
    case DType::kIQ1_S: QuantizeIQ1S(x, qw, out, nb); return;
    case DType::kIQ1_M: QuantizeIQ1M(x, qw, out, nb); return;
    default: MOE_ASSERT(false && "QuantizeIQGridRow: not a codebook type");
  }
}

}  // namespace moe::kernels
