// Quantizers of the codebook i-quants (iq2_xxs, iq2_xs, iq2_s, iq3_xxs, iq3_s, iq1_s, iq1_m).
// Like ggml's, they score only the grid entries near each group's ideal pattern, with
// importance weights; unlike ggml's, every sub-block tries a range of scales, each refitted by
// least squares, minimising the (weighted) squared error. The encodings are the formats' own
// (kernels/iq_grid.h), so ggml dequantizes them to the same values;
// tests/kernels/ggml_oracle_test.cc compares the error with ggml's quantizer on the same rows.
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

// A codebook as floats: n entries of `width` magnitudes (8 for iq2, 4 for iq3), and a table of
// neighbours that keeps the search from scanning the whole grid. Every magnitude of a grid is
// one of a few levels (3 for iq2_xxs/iq2_xs, 4 for iq2_s, 8 for the iq3 grids); a group's ideal
// pattern at a scale a is each element's nearest level to t / a, and the table lists, for each
// of the levels^width patterns, the `near` entries closest to it. Only those are scored exactly
// (ggml's quantizers search the same kind of neighbourhood).
struct Codebook {
  int n, width, near;
  std::vector<float> mag;     // [n][width]
  std::vector<float> level;   // the distinct magnitudes, ascending
  std::vector<float> cut;     // midpoints between consecutive levels
  std::vector<uint16_t> nbr;  // [levels^width][near], nearest first

  // The pattern of target t (width values) at inverse scale ia: its index in nbr.
  int Pattern(const float* t, float ia) const {
    int p = 0;
    for (int k = width - 1; k >= 0; --k) {
      const float v = t[k] * ia;
      int d = 0;
      for (float c : cut) d += v > c;
      p = p * static_cast<int>(level.size()) + d;
    }
    return p;
  }
};

template <typename G>
Codebook MakeCodebook(const G* grid, int n, int width, int near) {
  Codebook c{n, width, near, std::vector<float>(static_cast<size_t>(n) * width), {}, {}, {}};
  for (int i = 0; i < n; ++i) {
    for (int k = 0; k < width; ++k) {
      const float m = static_cast<float>((grid[i] >> (8 * k)) & 0xFF);
      c.mag[static_cast<size_t>(i) * width + k] = m;
      if (std::find(c.level.begin(), c.level.end(), m) == c.level.end()) c.level.push_back(m);
    }
  }
  std::sort(c.level.begin(), c.level.end());
  for (size_t l = 1; l < c.level.size(); ++l) c.cut.push_back((c.level[l - 1] + c.level[l]) / 2);
  const int levels = static_cast<int>(c.level.size());
  int patterns = 1;
  for (int k = 0; k < width; ++k) patterns *= levels;
  c.nbr.resize(static_cast<size_t>(patterns) * near);
  std::vector<std::pair<float, int>> dist(n);
  float lv[8];
  for (int p = 0; p < patterns; ++p) {
    for (int k = 0, r = p; k < width; ++k, r /= levels) lv[k] = c.level[r % levels];
    for (int i = 0; i < n; ++i) {
      const float* m = &c.mag[static_cast<size_t>(i) * width];
      float d2 = 0;
      for (int k = 0; k < width; ++k) d2 += (m[k] - lv[k]) * (m[k] - lv[k]);
      dist[i] = {d2, i};
    }
    std::partial_sort(dist.begin(), dist.begin() + near, dist.end());
    for (int j = 0; j < near; ++j) c.nbr[static_cast<size_t>(p) * near + j] = static_cast<uint16_t>(dist[j].second);
  }
  return c;
}

const Codebook& IQ2XXSBook() {
  static const Codebook c = MakeCodebook(kIQ2XXSGrid, 256, 8, 16);
  return c;
}
const Codebook& IQ3XXSBook() {
  static const Codebook c = MakeCodebook(kIQ3XXSGrid, 256, 4, 16);
  return c;
}
const Codebook& IQ3SBook() {
  static const Codebook c = MakeCodebook(kIQ3SGrid, 512, 4, 16);
  return c;
}
const Codebook& IQ2XSBook() {
  static const Codebook c = MakeCodebook(kIQ2XSGrid, 512, 8, 16);
  return c;
}
const Codebook& IQ2SBook() {
  static const Codebook c = MakeCodebook(kIQ2SGrid, 1024, 8, 16);
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

// The search of one sub-block: its parts (groups of `width` values), the (weighted) squared
// error of an entry at a scale, and the least-squares scale of a choice of entries.
struct Search {
  const Codebook* c = nullptr;
  const SubBlock* sb = nullptr;
  int parts = 0;  // sub-block size / width

  void Init(const Codebook& cb, const SubBlock& s) {
    c = &cb;
    sb = &s;
    parts = s.n / cb.width;
  }
  // Best entries at scale a among each part's neighbours (the lowest index of equals); returns
  // the total squared error.
  float Choose(float a, int* idx) const { return c->width == 8 ? ChooseW<8>(a, idx) : ChooseW<4>(a, idx); }
  template <int kW>
  float ChooseW(float a, int* idx) const {
    float total = 0;
    const float ia = a > 0 ? 1 / a : 0;
    const float* mag = c->mag.data();
    for (int p = 0; p < parts; ++p) {
      const float* t = sb->t + kW * p;
      float w[kW];
      for (int k = 0; k < kW; ++k) w[k] = sb->w ? sb->w[kW * p + k] : 1.0f;
      const uint16_t* cand = &c->nbr[static_cast<size_t>(c->Pattern(t, ia)) * c->near];
      int best = 0x7fffffff;
      float best_e = 0;
      for (int j = 0; j < c->near; ++j) {
        const int i = cand[j];
        const float* m = mag + static_cast<size_t>(i) * kW;
        float e = 0;
        for (int k = 0; k < kW; ++k) {
          const float r = a * m[k] - t[k];
          e += w[k] * r * r;
        }
        const bool better = j == 0 || e < best_e || (e == best_e && i < best);
        best_e = better ? e : best_e;
        best = better ? i : best;
      }
      idx[p] = best;
      total += best_e;
    }
    return total;
  }
  // The least-squares scale for the given entries (a if they give none).
  float Refit(const int* idx, float a) const {
    const int width = c->width;
    float num = 0, den = 0;
    for (int p = 0; p < parts; ++p) {
      const float* m = &c->mag[static_cast<size_t>(idx[p]) * width];
      for (int k = 0; k < width; ++k) {
        const float wk = sb->w ? sb->w[width * p + k] : 1.0f;
        num += wk * m[k] * sb->t[width * p + k];
        den += wk * m[k] * m[k];
      }
    }
    return den > 0 && num > 0 ? num / den : a;
  }
};

// The sub-block scale (before the 4-bit rounding): the best of a range of trial scales, each
// refined once by least squares over the entries it chose.
constexpr int kScaleTrials = 10;
float FitSubBlockScale(const Search& s, float max_mag) {
  const SubBlock& sb = *s.sb;
  float amax = 0;
  for (int i = 0; i < sb.n; ++i) amax = std::max(amax, std::fabs(sb.t[i]));
  if (amax == 0) return 0;
  float best_a = amax / max_mag, best_e = -1;
  int idx[8];
  for (int k = 0; k < kScaleTrials; ++k) {
    const float a0 = amax / max_mag * (0.5f + 0.8f / kScaleTrials * static_cast<float>(k));
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

// Shared driver: per super-block, sub-block scales a_j, then d with a_j ~ d kConst (2 ls_j + 1)
// (ls in 0..15), the entries chosen again at the rounded scales, and the format's packing.
template <class F, class Pack>
void QuantizeGrid(const Codebook& c, bool parity, float max_mag, const float* x, const float* qw,
                  uint8_t* y, int64_t nb, const Pack& pack) {
  for (int64_t b = 0; b < nb; ++b) {
    const float* xb = x + b * kQK_K;
    constexpr int kSub = F::kSubBlocks, kLen = kQK_K / kSub;
    SubBlock sb[kSub];
    Search search[kSub];
    float a[kSub], amax = 0;
    for (int j = 0; j < kSub; ++j) {
      sb[j] = Signs(xb + kLen * j, qw ? qw + b * kQK_K + kLen * j : nullptr, parity, kLen);
      search[j].Init(c, sb[j]);
      a[j] = FitSubBlockScale(search[j], max_mag);
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
// Per group and entry, the sums that do not depend on the scale or delta: sum w g x, sum w g,
// sum w g^2, kept for the sub-block's trials (valid where seen == the search's stamp).
struct IQ1Products {
  float gx, wg, wg2;
  uint32_t seen;
};
struct IQ1Memo {
  std::vector<IQ1Products> p = std::vector<IQ1Products>(4 * 2048, IQ1Products{0, 0, 0, 0});
  uint32_t stamp = 0;
  uint32_t Next() {
    if (++stamp == 0) {  // wrapped: forget everything
      std::fill(p.begin(), p.end(), IQ1Products{0, 0, 0, 0});
      stamp = 1;
    }
    return stamp;
  }
};

struct IQ1Search {
  const IQ1Book& b;
  const float* x;
  float w[32];  // error weights (ones without an importance matrix)
  int ng;       // groups
  float x1[4], x2[4], w1[4];  // per group: sum w x, sum w x^2, sum w
  IQ1Products* memo;          // [group][entry]
  uint32_t stamp;
  IQ1Search(const IQ1Book& book, const float* xs, const float* ws, int groups) : b(book), x(xs), ng(groups) {
    thread_local IQ1Memo m;
    memo = m.p.data();
    stamp = m.Next();
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
  // Entry i's sums over group p.
  const IQ1Products& Sums(int p, int i) const {
    IQ1Products& r = memo[2048 * p + i];
    if (r.seen == stamp) return r;
    float gx = 0, s1 = 0, s2 = 0;
    for (int k = 0; k < 8; ++k) {
      const float wk = w[8 * p + k], g = b.g[i][k];
      gx += g * wk * x[8 * p + k];
      s1 += wk * g;
      s2 += wk * g * g;
    }
    r = {gx, s1, s2, stamp};
    return r;
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
    int best = cand[0];
    float best_e = 0;
    for (int n = 0; n < kIQ1Near; ++n) {
      const int i = cand[n];
      const IQ1Products& s = Sums(p, i);
      const float e = a2 * (s.wg2 + 2 * delta * s.wg + cw) - 2 * a * (s.gx + delta * x1[p]);
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
      const IQ1Products& s = Sums(p, idx[p]);
      num += s.gx + delta[p] * x1[p];
      den += s.wg2 + 2 * delta[p] * s.wg + w1[p] * delta[p] * delta[p];
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
