#include "util/plot.h"

#include <zlib.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <utility>

#include "util/atomic_file.h"
#include "util/error.h"

namespace moe::plot {
namespace {

// 5x7 glyphs for ASCII 32..126 in a 5x9 cell: one byte per row, bit 4 the leftmost column, rows 7
// and 8 for descenders; omitted trailing rows are blank. Designed for this file.
constexpr uint8_t kFont[95][9] = {
    {},                                                   // space
    {0x04, 0x04, 0x04, 0x04, 0x04, 0, 0x04},              // !
    {0x0a, 0x0a},                                         // "
    {0x0a, 0x0a, 0x1f, 0x0a, 0x1f, 0x0a, 0x0a},           // #
    {0x04, 0x0f, 0x14, 0x0e, 0x05, 0x1e, 0x04},           // $
    {0x18, 0x19, 0x02, 0x04, 0x08, 0x13, 0x03},           // %
    {0x0c, 0x12, 0x14, 0x08, 0x15, 0x12, 0x0d},           // &
    {0x04, 0x04, 0x08},                                   // '
    {0x02, 0x04, 0x08, 0x08, 0x08, 0x04, 0x02},           // (
    {0x08, 0x04, 0x02, 0x02, 0x02, 0x04, 0x08},           // )
    {0, 0x04, 0x15, 0x0e, 0x15, 0x04},                    // *
    {0, 0x04, 0x04, 0x1f, 0x04, 0x04},                    // +
    {0, 0, 0, 0, 0, 0x0c, 0x04, 0x08},                    // ,
    {0, 0, 0, 0x1f},                                      // -
    {0, 0, 0, 0, 0, 0x0c, 0x0c},                          // .
    {0x01, 0x01, 0x02, 0x04, 0x08, 0x10, 0x10},           // /
    {0x0e, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0e},           // 0
    {0x04, 0x0c, 0x04, 0x04, 0x04, 0x04, 0x0e},           // 1
    {0x0e, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1f},           // 2
    {0x1f, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0e},           // 3
    {0x02, 0x06, 0x0a, 0x12, 0x1f, 0x02, 0x02},           // 4
    {0x1f, 0x10, 0x1e, 0x01, 0x01, 0x11, 0x0e},           // 5
    {0x06, 0x08, 0x10, 0x1e, 0x11, 0x11, 0x0e},           // 6
    {0x1f, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08},           // 7
    {0x0e, 0x11, 0x11, 0x0e, 0x11, 0x11, 0x0e},           // 8
    {0x0e, 0x11, 0x11, 0x0f, 0x01, 0x02, 0x0c},           // 9
    {0, 0x0c, 0x0c, 0, 0x0c, 0x0c},                       // :
    {0, 0x0c, 0x0c, 0, 0x0c, 0x04, 0x08},                 // ;
    {0x02, 0x04, 0x08, 0x10, 0x08, 0x04, 0x02},           // <
    {0, 0, 0x1f, 0, 0x1f},                                // =
    {0x08, 0x04, 0x02, 0x01, 0x02, 0x04, 0x08},           // >
    {0x0e, 0x11, 0x01, 0x02, 0x04, 0, 0x04},              // ?
    {0x0e, 0x11, 0x17, 0x15, 0x17, 0x10, 0x0f},           // @
    {0x0e, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11},           // A
    {0x1e, 0x11, 0x11, 0x1e, 0x11, 0x11, 0x1e},           // B
    {0x0e, 0x11, 0x10, 0x10, 0x10, 0x11, 0x0e},           // C
    {0x1c, 0x12, 0x11, 0x11, 0x11, 0x12, 0x1c},           // D
    {0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x1f},           // E
    {0x1f, 0x10, 0x10, 0x1e, 0x10, 0x10, 0x10},           // F
    {0x0e, 0x11, 0x10, 0x17, 0x11, 0x11, 0x0f},           // G
    {0x11, 0x11, 0x11, 0x1f, 0x11, 0x11, 0x11},           // H
    {0x0e, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e},           // I
    {0x07, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c},           // J
    {0x11, 0x12, 0x14, 0x18, 0x14, 0x12, 0x11},           // K
    {0x10, 0x10, 0x10, 0x10, 0x10, 0x10, 0x1f},           // L
    {0x11, 0x1b, 0x15, 0x15, 0x11, 0x11, 0x11},           // M
    {0x11, 0x11, 0x19, 0x15, 0x13, 0x11, 0x11},           // N
    {0x0e, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e},           // O
    {0x1e, 0x11, 0x11, 0x1e, 0x10, 0x10, 0x10},           // P
    {0x0e, 0x11, 0x11, 0x11, 0x15, 0x12, 0x0d},           // Q
    {0x1e, 0x11, 0x11, 0x1e, 0x14, 0x12, 0x11},           // R
    {0x0f, 0x10, 0x10, 0x0e, 0x01, 0x01, 0x1e},           // S
    {0x1f, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04},           // T
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x0e},           // U
    {0x11, 0x11, 0x11, 0x11, 0x11, 0x0a, 0x04},           // V
    {0x11, 0x11, 0x11, 0x15, 0x15, 0x15, 0x0a},           // W
    {0x11, 0x11, 0x0a, 0x04, 0x0a, 0x11, 0x11},           // X
    {0x11, 0x11, 0x0a, 0x04, 0x04, 0x04, 0x04},           // Y
    {0x1f, 0x01, 0x02, 0x04, 0x08, 0x10, 0x1f},           // Z
    {0x0e, 0x08, 0x08, 0x08, 0x08, 0x08, 0x0e},           // [
    {0x10, 0x10, 0x08, 0x04, 0x02, 0x01, 0x01},           // backslash
    {0x0e, 0x02, 0x02, 0x02, 0x02, 0x02, 0x0e},           // ]
    {0x04, 0x0a, 0x11},                                   // ^
    {0, 0, 0, 0, 0, 0, 0, 0x1f},                          // _
    {0x08, 0x04},                                         // `
    {0, 0, 0x0e, 0x01, 0x0f, 0x11, 0x0f},                 // a
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x1e},           // b
    {0, 0, 0x0e, 0x10, 0x10, 0x11, 0x0e},                 // c
    {0x01, 0x01, 0x0d, 0x13, 0x11, 0x11, 0x0f},           // d
    {0, 0, 0x0e, 0x11, 0x1f, 0x10, 0x0e},                 // e
    {0x06, 0x09, 0x08, 0x1c, 0x08, 0x08, 0x08},           // f
    {0, 0, 0x0f, 0x11, 0x11, 0x11, 0x0f, 0x01, 0x0e},     // g
    {0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11},           // h
    {0x04, 0, 0x0c, 0x04, 0x04, 0x04, 0x0e},              // i
    {0x02, 0, 0x06, 0x02, 0x02, 0x02, 0x02, 0x12, 0x0c},  // j
    {0x10, 0x10, 0x12, 0x14, 0x18, 0x14, 0x12},           // k
    {0x0c, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0e},           // l
    {0, 0, 0x1a, 0x15, 0x15, 0x15, 0x15},                 // m
    {0, 0, 0x16, 0x19, 0x11, 0x11, 0x11},                 // n
    {0, 0, 0x0e, 0x11, 0x11, 0x11, 0x0e},                 // o
    {0, 0, 0x1e, 0x11, 0x11, 0x11, 0x1e, 0x10, 0x10},     // p
    {0, 0, 0x0f, 0x11, 0x11, 0x11, 0x0f, 0x01, 0x01},     // q
    {0, 0, 0x16, 0x19, 0x10, 0x10, 0x10},                 // r
    {0, 0, 0x0f, 0x10, 0x0e, 0x01, 0x1e},                 // s
    {0x08, 0x08, 0x1c, 0x08, 0x08, 0x09, 0x06},           // t
    {0, 0, 0x11, 0x11, 0x11, 0x13, 0x0d},                 // u
    {0, 0, 0x11, 0x11, 0x11, 0x0a, 0x04},                 // v
    {0, 0, 0x11, 0x11, 0x15, 0x15, 0x0a},                 // w
    {0, 0, 0x11, 0x0a, 0x04, 0x0a, 0x11},                 // x
    {0, 0, 0x11, 0x11, 0x11, 0x11, 0x0f, 0x01, 0x0e},     // y
    {0, 0, 0x1f, 0x02, 0x04, 0x08, 0x1f},                 // z
    {0x02, 0x04, 0x04, 0x08, 0x04, 0x04, 0x02},           // {
    {0x04, 0x04, 0x04, 0x04, 0x04, 0x04, 0x04},           // |
    {0x08, 0x04, 0x04, 0x02, 0x04, 0x04, 0x08},           // }
    {0, 0, 0x08, 0x15, 0x02},                             // ~
};
constexpr uint8_t kBox[9] = {0, 0x1f, 0x11, 0x11, 0x11, 0x1f};  // any other character
constexpr int kAdvance = 6, kCellRows = 9, kCapRows = 7;
constexpr int kMaxSide = 16384;

constexpr Rgb kInk{35, 35, 35}, kMuted{90, 90, 90}, kFrameColor{110, 110, 110},
    kGrid{230, 230, 230}, kMissing{205, 205, 205};

// The glyph of each character of s; a UTF-8 sequence counts as one character.
std::vector<const uint8_t*> Glyphs(const std::string& s) {
  std::vector<const uint8_t*> out;
  for (unsigned char ch : s) {
    if ((ch & 0xC0) == 0x80) continue;  // UTF-8 continuation byte
    out.push_back(ch >= 32 && ch < 127 ? kFont[ch - 32] : kBox);
  }
  return out;
}

void DrawText(Canvas& cv, int x, int y, const std::string& s, Rgb c, int scale, bool up) {
  scale = std::max(scale, 1);
  const int w = Canvas::TextWidth(s, scale);
  int left = 0;  // of the current glyph, along the text
  for (const uint8_t* rows : Glyphs(s)) {
    for (int r = 0; r < kCellRows; ++r)
      for (int col = 0; col < 5; ++col) {
        if (!(rows[r] >> (4 - col) & 1)) continue;
        const int tx = left + col * scale, ty = r * scale;
        if (up)
          cv.FillRect(x + ty, y + w - tx - scale, x + ty + scale, y + w - tx, c);
        else
          cv.FillRect(x + tx, y + ty, x + tx + scale, y + ty + scale, c);
      }
    left += kAdvance * scale;
  }
}

// Draws s so that the point (ax, ay) of its box lands on (x, y): ax is a fraction of the width,
// ay of the capital height (0 = top, 0.5 = centred on capitals, 1 = baseline).
void Label(Canvas& cv, int x, int y, const std::string& s, Rgb c, double ax, double ay,
           int scale = 1) {
  cv.Text(x - static_cast<int>(std::lround(ax * Canvas::TextWidth(s, scale))),
          y - static_cast<int>(std::lround(ay * kCapRows * scale)), s, c, scale);
}

// A 1-pixel outline of the inclusive rectangle [x0, x1] x [y0, y1].
void Outline(Canvas& cv, int x0, int y0, int x1, int y1, Rgb c) {
  cv.FillRect(x0, y0, x1 + 1, y0 + 1, c);
  cv.FillRect(x0, y1, x1 + 1, y1 + 1, c);
  cv.FillRect(x0, y0, x0 + 1, y1 + 1, c);
  cv.FillRect(x1, y0, x1 + 1, y1 + 1, c);
}

void PutU32(std::vector<uint8_t>& out, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) out.push_back(static_cast<uint8_t>(v >> shift));
}

void PutChunk(std::vector<uint8_t>& out, const char* type, const std::vector<uint8_t>& data) {
  PutU32(out, static_cast<uint32_t>(data.size()));
  const size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), data.begin(), data.end());
  PutU32(out, static_cast<uint32_t>(crc32(0, out.data() + start, out.size() - start)));
}

// v * 10^e, exact for the decimal value when |e| <= 22.
double Pow10Scale(double v, int e) {
  return e >= 0 ? v * std::pow(10.0, e) : v / std::pow(10.0, -e);
}

// A nice step m * 10^e with m in {1, 2, 5}, about (hi - lo) / n (lo < hi, both finite), refined
// until at least one multiple of it lies in [lo, hi].
struct Step {
  int m, e;
  double value() const { return Pow10Scale(m, e); }
};
Step ChooseStep(double lo, double hi, int n) {
  for (n = std::clamp(n, 1, 1000);; n = 2 * n + 1) {
    const double raw = (hi - lo) / n;
    int e = static_cast<int>(std::floor(std::log10(raw)));
    const double f = raw / Pow10Scale(1, e);
    int m = f < 1.5 ? 1 : f < 3 ? 2 : f < 7 ? 5 : 10;
    if (m == 10) m = 1, ++e;
    const double s = Pow10Scale(m, e);
    if (std::ceil(lo / s - 1e-9) <= std::floor(hi / s + 1e-9) || n > 1000) return {m, e};
  }
}

// [lo, hi] widened by `pad` of its length on each side; a point gets +-10% (or +-1 at zero), no
// data (lo > hi) gets [0, 1].
std::pair<double, double> PaddedRange(double lo, double hi, double pad) {
  if (lo > hi) return {0, 1};
  if (lo == hi) {
    const double d = lo != 0 ? std::abs(lo) * 0.1 : 1;
    return {lo - d, hi + d};
  }
  return {lo - (hi - lo) * pad, hi + (hi - lo) * pad};
}

}  // namespace

Rgb Palette(int i) {
  static constexpr Rgb kColors[8] = {{31, 119, 200},  {230, 110, 20}, {40, 160, 60},
                                     {210, 40, 50},   {140, 90, 190}, {140, 86, 75},
                                     {220, 100, 180}, {100, 100, 100}};
  return kColors[((i % 8) + 8) % 8];
}

Rgb ColorMap(double t) {
  // Dark indigo -> blue -> teal -> green -> yellow, lightness increasing monotonically.
  static constexpr Rgb kStops[5] = {
      {45, 20, 95}, {45, 90, 155}, {30, 150, 140}, {115, 200, 80}, {250, 230, 40}};
  t = std::isnan(t) ? 0 : std::clamp(t, 0.0, 1.0) * 4;
  const int i = std::min(static_cast<int>(t), 3);
  const double f = t - i;
  auto mix = [f](uint8_t a, uint8_t b) {
    return static_cast<uint8_t>(std::lround(a + (b - a) * f));
  };
  return {mix(kStops[i].r, kStops[i + 1].r), mix(kStops[i].g, kStops[i + 1].g),
          mix(kStops[i].b, kStops[i + 1].b)};
}

// ---------------------------------------------------------------------------------------------
// Canvas

Canvas::Canvas(int width, int height, Rgb background) : width_(width), height_(height) {
  if (width <= 0 || height <= 0 || width > kMaxSide || height > kMaxSide)
    Fail("plot: image size %dx%d is out of range (1 to %d pixels a side)", width, height, kMaxSide);
  rgb_.resize(static_cast<size_t>(width) * height * 3);
  for (size_t i = 0; i < rgb_.size(); i += 3) {
    rgb_[i] = background.r, rgb_[i + 1] = background.g, rgb_[i + 2] = background.b;
  }
}

void Canvas::Set(int x, int y, Rgb c) {
  if (x < 0 || y < 0 || x >= width_ || y >= height_) return;
  uint8_t* p = &rgb_[(static_cast<size_t>(y) * width_ + x) * 3];
  p[0] = c.r, p[1] = c.g, p[2] = c.b;
}

Rgb Canvas::Get(int x, int y) const {
  if (x < 0 || y < 0 || x >= width_ || y >= height_) return {0, 0, 0};
  const uint8_t* p = &rgb_[(static_cast<size_t>(y) * width_ + x) * 3];
  return {p[0], p[1], p[2]};
}

void Canvas::FillRect(int x0, int y0, int x1, int y1, Rgb c) {
  if (x0 > x1) std::swap(x0, x1);
  if (y0 > y1) std::swap(y0, y1);
  x0 = std::max(x0, 0), y0 = std::max(y0, 0);
  x1 = std::min(x1, width_), y1 = std::min(y1, height_);
  for (int y = y0; y < y1; ++y)
    for (int x = x0; x < x1; ++x) Set(x, y, c);
}

void Canvas::Line(double x0, double y0, double x1, double y1, Rgb c, int thickness) {
  const double dx = x1 - x0, dy = y1 - y0;
  if (!std::isfinite(dx) || !std::isfinite(dy)) return;  // also catches NaN / inf endpoints
  thickness = std::clamp(thickness, 1, 64);
  // Clip to the image plus a pen-width margin (Liang-Barsky) so far-away points cost nothing.
  const double m = thickness + 1;
  const double p[4] = {-dx, dx, -dy, dy};
  const double q[4] = {x0 + m, width_ - 1 + m - x0, y0 + m, height_ - 1 + m - y0};
  double t0 = 0, t1 = 1;
  for (int i = 0; i < 4; ++i) {
    if (p[i] == 0) {
      if (q[i] < 0) return;
      continue;
    }
    const double t = q[i] / p[i];
    if (p[i] < 0)
      t0 = std::max(t0, t);
    else
      t1 = std::min(t1, t);
  }
  if (t0 > t1) return;
  const double ax = std::lerp(x0, x1, t0), ay = std::lerp(y0, y1, t0);
  const double bx = std::lerp(x0, x1, t1), by = std::lerp(y0, y1, t1);
  // Stamp the pen at every pixel step along the longer axis.
  const int steps = static_cast<int>(std::ceil(std::max(std::abs(bx - ax), std::abs(by - ay))));
  const int back = (thickness - 1) / 2;
  for (int i = 0; i <= steps; ++i) {
    const double t = steps ? static_cast<double>(i) / steps : 0;
    const int px = static_cast<int>(std::floor(std::lerp(ax, bx, t) + 0.5)) - back;
    const int py = static_cast<int>(std::floor(std::lerp(ay, by, t) + 0.5)) - back;
    FillRect(px, py, px + thickness, py + thickness, c);
  }
}

void Canvas::Text(int x, int y, const std::string& s, Rgb c, int scale) {
  DrawText(*this, x, y, s, c, scale, false);
}

void Canvas::TextUp(int x, int y, const std::string& s, Rgb c, int scale) {
  DrawText(*this, x, y, s, c, scale, true);
}

int Canvas::TextWidth(const std::string& s, int scale) {
  scale = std::max(scale, 1);
  const int n = static_cast<int>(Glyphs(s).size());
  return n ? (n * kAdvance - 1) * scale : 0;
}

int Canvas::TextHeight(int scale) { return kCellRows * std::max(scale, 1); }

std::vector<uint8_t> Canvas::Png() const {
  // Raw scanlines, each prefixed by filter type 0 (none), deflated into one IDAT chunk.
  const size_t row = static_cast<size_t>(width_) * 3;
  std::vector<uint8_t> raw;
  raw.reserve((row + 1) * height_);
  for (int y = 0; y < height_; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), rgb_.begin() + y * row, rgb_.begin() + (y + 1) * row);
  }
  uLongf zlen = compressBound(raw.size());
  std::vector<uint8_t> z(zlen);
  if (compress2(z.data(), &zlen, raw.data(), raw.size(), 6) != Z_OK)
    Fail("plot: zlib could not compress a %dx%d image", width_, height_);
  z.resize(zlen);

  std::vector<uint8_t> ihdr;
  PutU32(ihdr, width_);
  PutU32(ihdr, height_);
  ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8-bit, RGB, deflate, filter set 0, no interlace
  std::vector<uint8_t> out = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  PutChunk(out, "IHDR", ihdr);
  PutChunk(out, "IDAT", z);
  PutChunk(out, "IEND", {});
  return out;
}

// ---------------------------------------------------------------------------------------------
// Ticks

double NiceStep(double lo, double hi, int n) {
  if (lo > hi) std::swap(lo, hi);
  const bool usable = std::isfinite(lo) && std::isfinite(hi) && std::isfinite(hi - lo) && lo < hi;
  return usable ? ChooseStep(lo, hi, n).value() : 1;
}

std::vector<double> NiceTicks(double lo, double hi, int n) {
  if (!std::isfinite(lo) || !std::isfinite(hi)) return {};
  if (lo > hi) std::swap(lo, hi);
  if (lo == hi || !std::isfinite(hi - lo)) return {lo};
  const Step step = ChooseStep(lo, hi, n);
  const double s = step.value();
  std::vector<double> ticks;
  for (double k = std::ceil(lo / s - 1e-9); k <= std::floor(hi / s + 1e-9); ++k) {
    const double v = Pow10Scale(k * step.m, step.e);  // the nearest double to k * m * 10^e
    ticks.push_back(std::abs(v) < s * 1e-9 ? 0.0 : v);
    if (ticks.size() > 4000) break;  // unreachable for sane ranges; bounds the loop
  }
  return ticks;
}

std::string TickLabel(double v, double step) {
  if (!std::isfinite(v)) return std::isnan(v) ? "nan" : v > 0 ? "inf" : "-inf";
  step = std::abs(step);
  if (!(step > 0) || !std::isfinite(step)) step = v != 0 ? std::abs(v) : 1;
  if (std::abs(v) < step * 1e-6) return "0";
  // d: decimals that show the step exactly (at most 6 more than its leading digit needs).
  const int lead = static_cast<int>(std::floor(std::log10(step) + 1e-9));
  int d = -lead;
  auto whole = [](double x) {
    return std::abs(x - std::round(x)) < 1e-6 * std::max(1.0, std::abs(x));
  };
  while (d < 6 - lead && !whole(Pow10Scale(step, d))) ++d;
  std::string s;
  if (std::abs(v) < 1e5 && step >= 0.999e-3) {
    s = StrFormat("%.*f", std::max(d, 0), v);
  } else {
    const int ve = static_cast<int>(std::floor(std::log10(std::abs(v)) + 1e-9));
    s = StrFormat("%.*e", std::clamp(ve + d, 0, 6), v);
    const size_t e = s.find('e');  // compact exponent: e+05 -> e5, e-03 -> e-3
    s = s.substr(0, e + 1) + std::to_string(std::atoi(s.c_str() + e + 1));
  }
  if (s.find_first_not_of("-0.") == std::string::npos) return "0";  // "-0.0" and the like
  return s;
}

// ---------------------------------------------------------------------------------------------
// Line chart

std::vector<uint8_t> LineChartPng(const std::string& title, const std::string& xlabel,
                                  const std::string& ylabel, const std::vector<Series>& series,
                                  int width, int height) {
  Canvas cv(width, height);
  const int th = Canvas::TextHeight();

  // Data ranges over the finite points.
  double xlo = INFINITY, xhi = -INFINITY, ylo = INFINITY, yhi = -INFINITY;
  for (const Series& s : series)
    for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) continue;
      xlo = std::min(xlo, s.x[i]), xhi = std::max(xhi, s.x[i]);
      ylo = std::min(ylo, s.y[i]), yhi = std::max(yhi, s.y[i]);
    }
  std::tie(xlo, xhi) = PaddedRange(xlo, xhi, 0);
  std::tie(ylo, yhi) = PaddedRange(ylo, yhi, 0.04);

  // Layout: the y tick labels' width decides the left margin.
  const int top = title.empty() ? 16 : 48;
  const int bottom = 5 + 6 + th + (xlabel.empty() ? 8 : 12 + th + 10);
  const int py0 = top, py1 = std::max(py0 + 1, height - bottom);
  const std::vector<double> yt = NiceTicks(ylo, yhi, std::max(2, (py1 - py0) / 50));
  const double ystep = NiceStep(ylo, yhi, std::max(2, (py1 - py0) / 50));
  int ylabel_w = 0;
  for (double v : yt) ylabel_w = std::max(ylabel_w, Canvas::TextWidth(TickLabel(v, ystep)));
  const int px0 = 14 + (ylabel.empty() ? 0 : th + 12) + ylabel_w + 5 + 6;
  const int px1 = std::max(px0 + 1, width - 24);
  auto X = [&](double x) { return px0 + (x - xlo) / (xhi - xlo) * (px1 - px0); };
  auto Y = [&](double y) { return py1 - (y - ylo) / (yhi - ylo) * (py1 - py0); };

  // Grid, ticks and tick labels, frame.
  const int xn = std::max(2, (px1 - px0) / 100);
  const double xstep = NiceStep(xlo, xhi, xn);
  for (double v : NiceTicks(xlo, xhi, xn)) {
    const int x = static_cast<int>(std::lround(X(v)));
    cv.FillRect(x, py0, x + 1, py1, kGrid);
    cv.FillRect(x, py1, x + 1, py1 + 5, kFrameColor);
    Label(cv, x, py1 + 11, TickLabel(v, xstep), kInk, 0.5, 0);
  }
  for (double v : yt) {
    const int y = static_cast<int>(std::lround(Y(v)));
    cv.FillRect(px0, y, px1, y + 1, kGrid);
    cv.FillRect(px0 - 5, y, px0, y + 1, kFrameColor);
    Label(cv, px0 - 10, y, TickLabel(v, ystep), kInk, 1, 0.5);
  }
  Outline(cv, px0, py0, px1, py1, kFrameColor);

  // Title and axis labels.
  if (!title.empty()) Label(cv, (px0 + px1) / 2, 16, title, kInk, 0.5, 0, 2);
  if (!xlabel.empty()) Label(cv, (px0 + px1) / 2, height - 10, xlabel, kMuted, 0.5, 1);
  if (!ylabel.empty())
    cv.TextUp(14, (py0 + py1) / 2 - Canvas::TextWidth(ylabel) / 2, ylabel, kMuted);

  // Series: lines broken at non-finite points, optional point markers.
  for (const Series& s : series) {
    bool have_prev = false;
    double prev_x = 0, prev_y = 0;
    for (size_t i = 0; i < std::min(s.x.size(), s.y.size()); ++i) {
      if (!std::isfinite(s.x[i]) || !std::isfinite(s.y[i])) {
        have_prev = false;
        continue;
      }
      const double x = X(s.x[i]), y = Y(s.y[i]);
      if (have_prev)
        cv.Line(prev_x, prev_y, x, y, s.color, 2);
      else
        cv.Line(x, y, x, y, s.color, 2);  // an isolated point still shows
      if (s.points) cv.Line(x, y, x, y, s.color, 5);
      have_prev = true, prev_x = x, prev_y = y;
    }
  }

  // Legend, top right inside the frame.
  int n_labels = 0, label_w = 0;
  for (const Series& s : series)
    if (!s.label.empty()) ++n_labels, label_w = std::max(label_w, Canvas::TextWidth(s.label));
  if (n_labels) {
    const int row_h = th + 6, w = 10 + 24 + 8 + label_w + 10, h = 8 + n_labels * row_h;
    const int lx = px1 - 10 - w, ly = py0 + 10;
    cv.FillRect(lx, ly, lx + w, ly + h, {255, 255, 255});
    Outline(cv, lx, ly, lx + w - 1, ly + h - 1, kGrid);
    int y = ly + 6 + kCapRows / 2;
    for (const Series& s : series) {
      if (s.label.empty()) continue;
      cv.Line(lx + 10, y, lx + 34, y, s.color, 2);
      if (s.points) cv.Line(lx + 22, y, lx + 22, y, s.color, 5);
      Label(cv, lx + 42, y, s.label, kInk, 0, 0.5);
      y += row_h;
    }
  }
  return cv.Png();
}

// ---------------------------------------------------------------------------------------------
// Heatmaps

std::vector<uint8_t> HeatmapPng(const std::string& title, const std::string& xlabel,
                                const std::string& ylabel, const std::vector<double>& x,
                                const std::vector<Heatmap>& panels, double vmin, double vmax,
                                int width) {
  if (!std::isfinite(vmin) || !std::isfinite(vmax)) vmin = 0, vmax = 1;
  if (vmin > vmax) std::swap(vmin, vmax);
  if (vmin == vmax) vmax = vmin + 1;
  const int th = Canvas::TextHeight();
  size_t cols = 0, max_rows = 0, total_rows = 0;
  for (const Heatmap& p : panels) {
    max_rows = std::max(max_rows, p.values.size());
    total_rows += p.values.size();
    for (const auto& row : p.values) cols = std::max(cols, row.size());
  }

  // Vertical layout: title, then per panel a title line and rows x cell_h, then the x axis.
  const int top = title.empty() ? 16 : 48, panel_head = th + 6, panel_gap = 14;
  const int bottom = 5 + 6 + th + (xlabel.empty() ? 8 : 12 + th + 10);
  const int fixed = top + bottom + static_cast<int>(panels.size()) * (panel_head + panel_gap);
  int cell_h = max_rows ? std::clamp(static_cast<int>(160 / max_rows), 3, 22) : 22;
  const long long room = kMaxSide - 64 - fixed, rows_all = static_cast<long long>(total_rows);
  if (rows_all && rows_all * cell_h > room)
    cell_h = static_cast<int>(std::max(1LL, room / rows_all));
  const int empty_h = panels.empty() ? 60 : 0;  // room for a "no data" note
  const size_t needed = fixed + total_rows * cell_h + empty_h;
  if (needed > kMaxSide)
    Fail("plot: %zu heatmap panels with %zu rows in all do not fit in one image", panels.size(),
         total_rows);
  const int height = static_cast<int>(needed);
  Canvas cv(width, height);

  // Horizontal layout: y label, row labels, cells, color bar with its labels.
  const int row_label_w = Canvas::TextWidth(std::to_string(max_rows ? max_rows - 1 : 0));
  const int px0 = 14 + (ylabel.empty() ? 0 : th + 12) + row_label_w + 8;
  const std::vector<double> ct = NiceTicks(vmin, vmax, 5);
  const double cstep = NiceStep(vmin, vmax, 5);
  int cbar_label_w = 0;
  for (double v : ct) cbar_label_w = std::max(cbar_label_w, Canvas::TextWidth(TickLabel(v, cstep)));
  const int cb1 = width - 14 - cbar_label_w - 10, cb0 = cb1 - 16;
  const int px1 = std::max(px0 + 1, cb0 - 24);  // cells span [px0, px1)
  // The left edge of (fractional) column c.
  auto col_x = [&](double c) {
    return px0 + static_cast<int>(std::lround(c * (px1 - px0) / std::max<size_t>(cols, 1)));
  };

  if (!title.empty()) Label(cv, (px0 + px1) / 2, 16, title, kInk, 0.5, 0, 2);
  int y = top;
  const int cells_top = top + panel_head;
  int cells_bottom = cells_top + empty_h;
  if (panels.empty()) Label(cv, (px0 + px1) / 2, y + 30, "no data", kMuted, 0.5, 0.5);
  for (const Heatmap& p : panels) {
    Label(cv, px0, y + 2, p.title, kInk, 0, 0);
    y += panel_head;
    const int rows = static_cast<int>(p.values.size());
    cv.FillRect(px0, y, px1, y + rows * cell_h, kMissing);
    for (int r = 0; r < rows; ++r) {
      for (size_t c = 0; c < p.values[r].size(); ++c) {
        const double v = p.values[r][c];
        const Rgb color = std::isnan(v) ? kMissing : ColorMap((v - vmin) / (vmax - vmin));
        cv.FillRect(col_x(c), y + r * cell_h, col_x(c + 1), y + (r + 1) * cell_h, color);
      }
    }
    // Row labels: every row when there is room, else every 2nd, 5th, 10th, ...
    int stride = 1;
    while (stride * cell_h < th + 1)
      stride = std::to_string(stride)[0] == '2' ? stride / 2 * 5 : stride * 2;
    for (int r = 0; r < rows; r += stride)
      Label(cv, px0 - 6, y + r * cell_h + cell_h / 2, std::to_string(r), kMuted, 1, 0.5);
    if (rows) Outline(cv, px0 - 1, y - 1, px1, y + rows * cell_h, kFrameColor);
    y += rows * cell_h;
    cells_bottom = y;
    y += panel_gap;
  }

  // Shared x axis below the last panel: nice values of x when it gives one increasing value per
  // column, else column indices.
  const int axis_y = cells_bottom + 1;
  bool increasing = x.size() == cols && cols > 0;
  for (size_t c = 0; increasing && c < cols; ++c)
    increasing = std::isfinite(x[c]) && (c == 0 || x[c] > x[c - 1]);
  const int xn = std::max(2, (px1 - px0) / 100);
  std::vector<std::pair<double, std::string>> xticks;  // (fractional column, label)
  if (increasing && cols == 1) {
    xticks.push_back({0.5, StrFormat("%g", x[0])});
  } else if (increasing) {
    const double step = NiceStep(x.front(), x.back(), xn);
    for (double v : NiceTicks(x.front(), x.back(), xn)) {
      const size_t i =
          std::min<size_t>(std::upper_bound(x.begin(), x.end(), v) - x.begin(), cols - 1);
      const double pos = i == 0 ? 0 : (i - 1) + (v - x[i - 1]) / (x[i] - x[i - 1]);
      xticks.push_back({std::clamp(pos, 0.0, cols - 1.0) + 0.5, TickLabel(v, step)});
    }
  } else if (cols) {
    const double step = std::max(1.0, NiceStep(0, cols - 1.0, xn));
    for (double c = 0; c < cols; c += step) xticks.push_back({c + 0.5, StrFormat("%g", c)});
  }
  for (const auto& [pos, label] : xticks) {
    const int tx = col_x(pos);
    cv.FillRect(tx, axis_y, tx + 1, axis_y + 5, kFrameColor);
    Label(cv, tx, axis_y + 11, label, kInk, 0.5, 0);
  }
  if (!xlabel.empty()) Label(cv, (px0 + px1) / 2, height - 10, xlabel, kMuted, 0.5, 1);
  if (!ylabel.empty())
    cv.TextUp(14, (cells_top + cells_bottom) / 2 - Canvas::TextWidth(ylabel) / 2, ylabel, kMuted);

  // Color bar over the panels' full height, vmax at the top.
  const int bar0 = cells_top, bar1 = std::max(cells_bottom, bar0 + 2);
  for (int yy = bar0; yy < bar1; ++yy)
    cv.FillRect(cb0, yy, cb1, yy + 1, ColorMap(1.0 - double(yy - bar0) / (bar1 - bar0 - 1)));
  Outline(cv, cb0 - 1, bar0 - 1, cb1, bar1, kFrameColor);
  for (double v : ct) {
    const int ty =
        bar1 - 1 - static_cast<int>(std::lround((v - vmin) / (vmax - vmin) * (bar1 - bar0 - 1)));
    cv.FillRect(cb1, ty, cb1 + 5, ty + 1, kFrameColor);
    Label(cv, cb1 + 9, ty, TickLabel(v, cstep), kInk, 0, 0.5);
  }
  return cv.Png();
}

// ---------------------------------------------------------------------------------------------

void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes) {
  WriteFileAtomic(path, bytes.data(), bytes.size());
}

}  // namespace moe::plot
