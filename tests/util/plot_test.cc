#include "util/plot.h"

#include <gtest/gtest.h>
#include <zlib.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include "util/error.h"

namespace moe::plot {
namespace {

// ----- A strict decoder for the PNGs we write: 8-bit RGB, one zlib stream, filter 0 rows. -----

struct Image {
  int w = 0, h = 0;
  std::vector<uint8_t> rgb;
  Rgb At(int x, int y) const {
    const uint8_t* p = &rgb[(static_cast<size_t>(y) * w + x) * 3];
    return {p[0], p[1], p[2]};
  }
};

uint32_t U32(const uint8_t* p) {
  return uint32_t{p[0]} << 24 | uint32_t{p[1]} << 16 | uint32_t{p[2]} << 8 | p[3];
}

void Decode(const std::vector<uint8_t>& png, Image* img) {
  static const uint8_t kSig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
  ASSERT_GE(png.size(), 8u);
  ASSERT_TRUE(std::equal(kSig, kSig + 8, png.begin())) << "bad signature";
  std::vector<uint8_t> idat;
  std::vector<std::string> types;
  for (size_t pos = 8; pos < png.size();) {
    ASSERT_LE(pos + 12, png.size()) << "truncated chunk";
    const uint32_t len = U32(&png[pos]);
    ASSERT_LE(pos + 12 + len, png.size()) << "truncated chunk data";
    const std::string type(png.begin() + pos + 4, png.begin() + pos + 8);
    const uint8_t* data = &png[pos + 8];
    EXPECT_EQ(U32(data + len), static_cast<uint32_t>(crc32(0, &png[pos + 4], len + 4)))
        << "bad CRC in " << type;
    if (type == "IHDR") {
      ASSERT_EQ(len, 13u);
      img->w = static_cast<int>(U32(data));
      img->h = static_cast<int>(U32(data + 4));
      EXPECT_EQ(data[8], 8) << "bit depth";
      EXPECT_EQ(data[9], 2) << "color type";
      EXPECT_EQ(data[10], 0) << "compression";
      EXPECT_EQ(data[11], 0) << "filter method";
      EXPECT_EQ(data[12], 0) << "interlace";
    } else if (type == "IDAT") {
      idat.insert(idat.end(), data, data + len);
    }
    types.push_back(type);
    pos += 12 + len;
  }
  ASSERT_GE(types.size(), 3u);
  EXPECT_EQ(types.front(), "IHDR");
  EXPECT_EQ(types.back(), "IEND");
  ASSERT_GT(img->w, 0);
  ASSERT_GT(img->h, 0);
  const size_t row = static_cast<size_t>(img->w) * 3 + 1;
  std::vector<uint8_t> raw(row * img->h + 1);  // one spare byte: the stream must not fill it
  uLongf n = raw.size();
  ASSERT_EQ(uncompress(raw.data(), &n, idat.data(), idat.size()), Z_OK);
  ASSERT_EQ(n, row * img->h) << "IDAT holds the wrong amount of pixel data";
  img->rgb.clear();
  for (int y = 0; y < img->h; ++y) {
    ASSERT_EQ(raw[y * row], 0) << "row " << y << " has filter type " << int{raw[y * row]};
    img->rgb.insert(img->rgb.end(), raw.begin() + y * row + 1, raw.begin() + (y + 1) * row);
  }
}

int CountColor(const Image& img, Rgb c) {
  int n = 0;
  for (int y = 0; y < img.h; ++y)
    for (int x = 0; x < img.w; ++x) n += img.At(x, y) == c;
  return n;
}

int CountColor(const Canvas& cv, Rgb c) {
  int n = 0;
  for (int y = 0; y < cv.height(); ++y)
    for (int x = 0; x < cv.width(); ++x) n += cv.Get(x, y) == c;
  return n;
}

int CountNot(const Canvas& cv, Rgb bg) { return cv.width() * cv.height() - CountColor(cv, bg); }

// The bounding box [x0, x1) x [y0, y1) of the pixels that differ from bg; x0 = -1 when none.
struct Box {
  int x0 = -1, y0 = -1, x1 = -1, y1 = -1;
};
Box InkBox(const Canvas& cv, Rgb bg) {
  Box b;
  for (int y = 0; y < cv.height(); ++y)
    for (int x = 0; x < cv.width(); ++x) {
      if (cv.Get(x, y) == bg) continue;
      if (b.x0 < 0) b = {x, y, x + 1, y + 1};
      b = {std::min(b.x0, x), std::min(b.y0, y), std::max(b.x1, x + 1), std::max(b.y1, y + 1)};
    }
  return b;
}

constexpr Rgb kWhite{255, 255, 255}, kRed{220, 30, 30}, kBlue{20, 60, 200};

// ----- PNG -----

TEST(Plot, PngRoundTripsEveryPixel) {
  Canvas cv(37, 23, {10, 20, 30});
  cv.FillRect(2, 3, 12, 9, {200, 100, 50});
  cv.Line(0, 22, 36, 0, {1, 2, 3}, 2);
  cv.Text(14, 2, "Ab9", {250, 250, 0});
  for (int x = 0; x < 37; ++x) cv.Set(x, 20, {static_cast<uint8_t>(x * 7), 0, 255});
  Image img;
  ASSERT_NO_FATAL_FAILURE(Decode(cv.Png(), &img));
  ASSERT_EQ(img.w, 37);
  ASSERT_EQ(img.h, 23);
  for (int y = 0; y < 23; ++y)
    for (int x = 0; x < 37; ++x) ASSERT_EQ(img.At(x, y), cv.Get(x, y)) << x << "," << y;
}

TEST(Plot, PngOfOnePixelAndOfALargeCanvas) {
  Image img;
  ASSERT_NO_FATAL_FAILURE(Decode(Canvas(1, 1, kRed).Png(), &img));
  EXPECT_EQ(img.At(0, 0), kRed);
  Canvas big(1500, 900);
  big.Line(0, 0, 1499, 899, kBlue, 3);
  ASSERT_NO_FATAL_FAILURE(Decode(big.Png(), &img));
  EXPECT_EQ(img.At(750, 450), big.Get(750, 450));
  EXPECT_EQ(CountColor(img, kBlue), CountNot(big, kWhite));
}

TEST(Plot, CanvasRejectsBadSizes) {
  EXPECT_THROW(Canvas(0, 10), Error);
  EXPECT_THROW(Canvas(10, -1), Error);
  EXPECT_THROW(Canvas(100000, 10), Error);
}

// ----- Drawing -----

TEST(Plot, SetGetAndFillRectClip) {
  Canvas cv(10, 10);
  cv.Set(-1, 0, kRed);
  cv.Set(10, 10, kRed);
  EXPECT_EQ(CountNot(cv, kWhite), 0);
  EXPECT_EQ(cv.Get(-1, 3), (Rgb{0, 0, 0}));
  cv.Set(4, 5, kBlue);
  EXPECT_EQ(cv.Get(4, 5), kBlue);
  cv.FillRect(-10, -10, 3, 2, kRed);  // 3 x 2 inside
  EXPECT_EQ(CountColor(cv, kRed), 6);
  cv.FillRect(100, 100, 8, 9, kRed);  // corners reversed: x in [8, 10), y in [9, 10)
  EXPECT_EQ(CountColor(cv, kRed), 8);
  EXPECT_EQ(cv.Get(9, 9), kRed);
  cv.FillRect(3, 3, 3, 8, kRed);     // empty
  cv.FillRect(20, 0, 30, 10, kRed);  // outside
  EXPECT_EQ(CountColor(cv, kRed), 8);
}

TEST(Plot, LineHitsBothEndpoints) {
  const double pts[][4] = {{3, 4, 40, 17}, {40, 17, 3, 4},   {5, 1, 7, 29},
                           {0, 0, 49, 0},  {10, 10, 10, 10}, {2.4, 3.6, 30.2, 8.8}};
  for (const auto& p : pts) {
    for (int t : {1, 2, 3}) {
      Canvas cv(50, 30);
      cv.Line(p[0], p[1], p[2], p[3], kRed, t);
      EXPECT_EQ(cv.Get(std::lround(p[0]), std::lround(p[1])), kRed) << p[0] << "," << p[1];
      EXPECT_EQ(cv.Get(std::lround(p[2]), std::lround(p[3])), kRed) << p[2] << "," << p[3];
    }
  }
  Canvas cv(50, 30);
  cv.Line(2, 5, 12, 5, kRed);  // 11 pixels, no gaps, no extra
  EXPECT_EQ(CountColor(cv, kRed), 11);
  cv.Line(20, 0, 29, 9, kBlue);  // a diagonal: one pixel per row
  EXPECT_EQ(CountColor(cv, kBlue), 10);
  for (int i = 0; i < 10; ++i) EXPECT_EQ(cv.Get(20 + i, i), kBlue);
  Canvas thick(50, 30);
  thick.Line(10, 10, 20, 10, kRed, 3);  // a 3-pixel square pen: rows 9..11, x from 9 to 21
  EXPECT_EQ(CountColor(thick, kRed), 3 * 13);
  EXPECT_EQ(thick.Get(9, 9), kRed);
  EXPECT_EQ(thick.Get(21, 11), kRed);
}

TEST(Plot, LineClipsFarCoordinates) {
  Canvas cv(50, 40);
  cv.Line(-1e9, -1e9, 1e9, 1e9, kRed);  // the main diagonal
  for (int i = 0; i < 40; ++i) EXPECT_EQ(cv.Get(i, i), kRed) << i;
  cv.Line(-1e12, 20, 1e12, 20, kBlue, 2);  // a full-width band
  for (int x = 0; x < 50; ++x) EXPECT_EQ(cv.Get(x, 20), kBlue) << x;
  Canvas out(50, 40);
  out.Line(-1e9, -5, 1e9, -5, kRed, 3);      // above the image
  out.Line(60, -1e300, 60, 1e300, kRed, 3);  // right of it
  out.Line(-1e308, 0, 1e308, 0, kRed);       // overflowing length: skipped, no crash
  out.Line(NAN, 1, 5, 5, kRed);
  out.Line(1, 1, INFINITY, 5, kRed);
  EXPECT_EQ(CountNot(out, kWhite), 0);
}

TEST(Plot, TextDrawsInsideItsBox) {
  EXPECT_EQ(Canvas::TextWidth(""), 0);
  EXPECT_EQ(Canvas::TextWidth("a"), 5);
  EXPECT_EQ(Canvas::TextWidth("abc"), 17);
  EXPECT_EQ(Canvas::TextWidth("abc", 2), 34);
  EXPECT_EQ(Canvas::TextHeight(), 9);
  EXPECT_EQ(Canvas::TextHeight(2), 18);
  EXPECT_EQ(Canvas::TextWidth("\xc3\xa9"), 5);  // one UTF-8 character, one box

  const std::string required =
      "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz.,:;-+=()[]/%_'!?<>*#&|";
  std::set<std::vector<bool>> shapes;
  for (char ch : required) {
    for (int scale : {1, 2}) {
      Canvas cv(20, 30);
      cv.Text(3, 4, std::string(1, ch), kBlue, scale);
      const Box b = InkBox(cv, kWhite);
      ASSERT_GE(b.x0, 0) << "'" << ch << "' draws nothing";
      EXPECT_GE(b.x0, 3) << ch;
      EXPECT_GE(b.y0, 4) << ch;
      EXPECT_LE(b.x1, 3 + Canvas::TextWidth(std::string(1, ch), scale)) << ch;
      EXPECT_LE(b.y1, 4 + Canvas::TextHeight(scale)) << ch;
      if (scale == 1) {
        std::vector<bool> bits;
        for (int y = 0; y < 30; ++y)
          for (int x = 0; x < 20; ++x) bits.push_back(cv.Get(x, y) == kBlue);
        EXPECT_TRUE(shapes.insert(bits).second) << "'" << ch << "' looks like another glyph";
      }
    }
  }
  Canvas cv(40, 20);
  cv.Text(0, 0, "   ", kBlue, 2);
  EXPECT_EQ(CountNot(cv, kWhite), 0);
  cv.Text(0, 0, "\x01", kBlue);  // unknown: a small box
  EXPECT_GT(CountNot(cv, kWhite), 0);

  Canvas wide(200, 40);
  const std::string s = "Loss (val) 12.5%";
  wide.Text(7, 5, s, kRed, 2);
  const Box b = InkBox(wide, kWhite);
  EXPECT_EQ(b.x0, 7);
  EXPECT_EQ(b.x1, 7 + Canvas::TextWidth(s, 2));  // '%' reaches the last column
  wide.Text(-50, -50, s, kRed);                  // clipped, no crash
  wide.Text(195, 35, s, kRed, 2);

  Canvas up(40, 200);
  up.TextUp(5, 10, s, kRed, 2);
  const Box u = InkBox(up, kWhite);
  EXPECT_GE(u.x0, 5);
  EXPECT_LE(u.x1, 5 + Canvas::TextHeight(2));
  EXPECT_EQ(u.y0, 10);  // the last character's right edge is the top
  EXPECT_EQ(u.y1, 10 + Canvas::TextWidth(s, 2));
}

// ----- Ticks -----

TEST(Plot, NiceTicksZeroToOne) {
  const std::vector<double> t = NiceTicks(0, 1, 5);
  ASSERT_EQ(t.size(), 6u);
  for (int i = 0; i <= 5; ++i) EXPECT_NEAR(t[i], 0.2 * i, 1e-12);
  EXPECT_EQ(t[3], 0.6);              // computed as 6 / 10, not 3 * 0.2
  EXPECT_EQ(NiceTicks(1, 0, 5), t);  // either order
}

TEST(Plot, NiceTicksAreMultiplesOfANiceStepInsideTheRange) {
  const double ranges[][2] = {{0.13, 0.97},    {-3.7, 12.1},     {1e-7, 3.3e-6},  {997, 1003},
                              {12345, 987654}, {-0.02, -0.0011}, {1.0001, 1.0002}};
  for (const auto& r : ranges) {
    for (int n : {1, 2, 5, 8}) {
      const std::vector<double> t = NiceTicks(r[0], r[1], n);
      ASSERT_FALSE(t.empty()) << r[0] << ".." << r[1] << " n=" << n;
      EXPECT_LE(t.size(), static_cast<size_t>(2 * n + 3));
      const double step = NiceStep(r[0], r[1], n);
      const double mant = step / std::pow(10, std::floor(std::log10(step) + 1e-9));
      EXPECT_TRUE(std::abs(mant - 1) < 1e-9 || std::abs(mant - 2) < 1e-9 ||
                  std::abs(mant - 5) < 1e-9)
          << step;
      for (size_t i = 0; i < t.size(); ++i) {
        EXPECT_GE(t[i], r[0] - step * 1e-6);
        EXPECT_LE(t[i], r[1] + step * 1e-6);
        EXPECT_NEAR(t[i] / step, std::round(t[i] / step), 1e-6) << t[i] << " step " << step;
        if (i) {
          EXPECT_NEAR(t[i] - t[i - 1], step, step * 1e-6);
        }
      }
    }
  }
  const std::vector<double> t = NiceTicks(0.13, 0.97, 5);
  EXPECT_EQ(t, (std::vector<double>{0.2, 0.4, 0.6, 0.8}));
}

TEST(Plot, NiceTicksDegenerateAndNegative) {
  EXPECT_EQ(NiceTicks(3.5, 3.5, 5), std::vector<double>{3.5});
  EXPECT_EQ(NiceTicks(0, 0, 5), std::vector<double>{0});
  EXPECT_TRUE(NiceTicks(NAN, 1, 5).empty());
  EXPECT_TRUE(NiceTicks(0, INFINITY, 5).empty());
  EXPECT_FALSE(NiceTicks(0.1, 0.8, 1).empty());  // a step wider than the range is refined
  EXPECT_FALSE(NiceTicks(0, 1, 0).empty());
  const std::vector<double> neg = NiceTicks(-10, -2, 4);
  EXPECT_EQ(neg, (std::vector<double>{-10, -8, -6, -4, -2}));
  const std::vector<double> mid = NiceTicks(-1, 1, 4);
  EXPECT_EQ(mid, (std::vector<double>{-1, -0.5, 0, 0.5, 1}));
}

TEST(Plot, TickLabels) {
  EXPECT_EQ(TickLabel(0.5, 0.1), "0.5");
  EXPECT_EQ(TickLabel(10, 5), "10");
  EXPECT_EQ(TickLabel(2.5e-3, 5e-4), "2.5e-3");
  EXPECT_EQ(TickLabel(1.2e5, 2e4), "1.2e5");
  EXPECT_EQ(TickLabel(0, 0.2), "0");
  EXPECT_EQ(TickLabel(1e-17, 0.2), "0");
  EXPECT_EQ(TickLabel(-0.4, 0.2), "-0.4");
  EXPECT_EQ(TickLabel(0.6000000000000001, 0.2), "0.6");
  EXPECT_EQ(TickLabel(0.25, 0.25), "0.25");
  EXPECT_EQ(TickLabel(3, 0.5), "3.0");
  EXPECT_EQ(TickLabel(2000, 500), "2000");
  EXPECT_EQ(TickLabel(-3e-6, 1e-6), "-3e-6");
  EXPECT_EQ(TickLabel(1e10, 5e9), "1.0e10");
  EXPECT_EQ(TickLabel(NAN, 1), "nan");
  for (double v : NiceTicks(0, 1, 5)) EXPECT_LE(TickLabel(v, 0.2).size(), 3u);
}

// ----- Charts -----

void ExpectPng(const std::vector<uint8_t>& png, int w, int h, Image* img = nullptr) {
  Image local;
  Image* out = img ? img : &local;
  ASSERT_NO_FATAL_FAILURE(Decode(png, out));
  EXPECT_EQ(out->w, w);
  if (h > 0) {
    EXPECT_EQ(out->h, h);
  }
}

TEST(Plot, LineChart) {
  Series train{"train", {}, {}, kRed}, val{"val", {}, {}, kBlue, true};
  for (int i = 0; i <= 200; ++i) {
    train.x.push_back(i * 10);
    train.y.push_back(4 * std::exp(-i / 50.0) + 1.5);
  }
  for (int i = 0; i <= 200; i += 25)
    val.x.push_back(i * 10), val.y.push_back(4 * std::exp(-i / 45.0) + 1.7);
  Image img;
  ASSERT_NO_FATAL_FAILURE(
      ExpectPng(LineChartPng("Loss", "step", "loss", {train, val}), 900, 500, &img));
  EXPECT_GT(CountColor(img, kRed), 400);
  EXPECT_GT(CountColor(img, kBlue), 100);
  ASSERT_NO_FATAL_FAILURE(ExpectPng(LineChartPng("", "", "", {train}, 320, 200), 320, 200));
}

TEST(Plot, LineChartEdgeCases) {
  const double nan = NAN, inf = INFINITY;
  std::vector<std::vector<Series>> cases = {
      {},
      {Series{"empty", {}, {}, kRed}},
      {Series{"one", {5}, {2.5}, kRed}},
      {Series{"zero", {0}, {0}, kRed, true}},
      {Series{"flat", {0, 1, 2, 3}, {7, 7, 7, 7}, kRed}},
      {Series{"nan", {0, 1, 2, 3, 4}, {1, nan, 3, inf, 2}, kRed}},
      {Series{"all nan", {nan, 1}, {2, nan}, kRed}},
      {Series{"ragged", {0, 1, 2}, {1}, kRed}, Series{"", {0, 1}, {5, 6}, kBlue}},
      {Series{"huge", {0, 1}, {-1e300, 1e300}, kRed}},
      {Series{"tiny", {1e-9, 2e-9}, {1e-12, 3e-12}, kRed}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    SCOPED_TRACE(i);
    ASSERT_NO_FATAL_FAILURE(ExpectPng(LineChartPng("t", "x", "y", cases[i], 400, 300), 400, 300));
  }
  Image img;
  ASSERT_NO_FATAL_FAILURE(
      ExpectPng(LineChartPng("t", "x", "y", cases[2], 400, 300), 400, 300, &img));
  EXPECT_GT(CountColor(img, kRed), 4);  // the single point shows (and the legend swatch)
  ASSERT_NO_FATAL_FAILURE(
      ExpectPng(LineChartPng("a long title", "x", "y", cases[5], 30, 20), 30, 20));
  EXPECT_THROW(LineChartPng("t", "x", "y", {}, 0, 100), Error);
}

std::vector<Heatmap> LoadPanels(int n_panels, int rows, int cols) {
  std::vector<Heatmap> panels;
  for (int p = 0; p < n_panels; ++p) {
    Heatmap h{"layer " + std::to_string(p), {}};
    for (int r = 0; r < rows; ++r) {
      h.values.emplace_back();
      for (int c = 0; c < cols; ++c)
        h.values.back().push_back(1.0 / rows * (1 + 0.8 * std::sin(0.15 * c * (p + 1) + r)));
    }
    panels.push_back(h);
  }
  return panels;
}

TEST(Plot, Heatmap) {
  std::vector<double> steps;
  for (int c = 0; c < 50; ++c) steps.push_back(100 * (c + 1));
  std::vector<Heatmap> panels = LoadPanels(3, 8, 50);
  panels[0].values[0][0] = 0;     // vmin
  panels[0].values[0][1] = 0.25;  // vmax
  panels[0].values[0][2] = 9;     // clamped to vmax
  Image img;
  ASSERT_NO_FATAL_FAILURE(
      ExpectPng(HeatmapPng("Expert load", "step", "expert", steps, panels, 0, 0.25), 900, 0, &img));
  EXPECT_GT(img.h, 3 * 8 * 3);
  EXPECT_GT(CountColor(img, ColorMap(0)), 50);   // a cell and the bottom of the color bar
  EXPECT_GT(CountColor(img, ColorMap(1)), 200);  // two cells and the top of the color bar
}

TEST(Plot, HeatmapEdgeCases) {
  const double nan = NAN;
  ASSERT_NO_FATAL_FAILURE(ExpectPng(HeatmapPng("t", "x", "y", {}, {}, 0, 1), 900, 0));
  ASSERT_NO_FATAL_FAILURE(ExpectPng(HeatmapPng("", "", "", {}, {}, 0, 1, 300), 300, 0));
  ASSERT_NO_FATAL_FAILURE(
      ExpectPng(HeatmapPng("t", "x", "y", {7}, LoadPanels(2, 4, 1), 0, 1), 900, 0));
  ASSERT_NO_FATAL_FAILURE(
      ExpectPng(HeatmapPng("t", "x", "y", {}, LoadPanels(1, 4, 1), 0, 1), 900, 0));
  ASSERT_NO_FATAL_FAILURE(
      ExpectPng(HeatmapPng("t", "x", "y", {3, 1, 2}, LoadPanels(1, 2, 3), 0, 1), 900, 0));
  ASSERT_NO_FATAL_FAILURE(
      ExpectPng(HeatmapPng("t", "x", "y", {1, 2}, LoadPanels(1, 64, 2000), 0, 1, 600), 600, 0));
  std::vector<Heatmap> odd = {Heatmap{"empty", {}}, Heatmap{"ragged", {{1, 2, 3}, {}, {nan, 0.5}}},
                              Heatmap{"no cols", {{}, {}}}};
  ASSERT_NO_FATAL_FAILURE(ExpectPng(HeatmapPng("t", "x", "y", {1, 2, 3}, odd, 0, 1), 900, 0));
  ASSERT_NO_FATAL_FAILURE(ExpectPng(HeatmapPng("t", "x", "y", {1, 2, 3}, odd, 2, 2), 900, 0));
  ASSERT_NO_FATAL_FAILURE(ExpectPng(HeatmapPng("t", "x", "y", {1, 2, 3}, odd, nan, 1), 900, 0));
  ASSERT_NO_FATAL_FAILURE(ExpectPng(HeatmapPng("t", "x", "y", {1, 2, 3}, odd, 1, 0, 40), 40, 0));
  Image img;  // 64 x 100 rows at the default 3 pixels would be too tall: the cells shrink
  ASSERT_NO_FATAL_FAILURE(
      ExpectPng(HeatmapPng("t", "x", "y", {}, LoadPanels(100, 64, 4), 0, 1, 300), 300, 0, &img));
  EXPECT_LE(img.h, 16384);
  EXPECT_THROW(HeatmapPng("t", "x", "y", {}, LoadPanels(300, 64, 4), 0, 1, 300), Error);
  EXPECT_THROW(HeatmapPng("t", "x", "y", {}, {}, 0, 1, -5), Error);
}

TEST(Plot, ColorMapGetsLighter) {
  double prev = -1;
  for (int i = 0; i <= 100; ++i) {
    const Rgb c = ColorMap(i / 100.0);
    const double luma = 0.2126 * c.r + 0.7152 * c.g + 0.0722 * c.b;
    EXPECT_GT(luma, prev) << i;
    prev = luma;
  }
  EXPECT_EQ(ColorMap(-3), ColorMap(0));
  EXPECT_EQ(ColorMap(7), ColorMap(1));
  EXPECT_EQ(ColorMap(NAN), ColorMap(0));
}

// ----- Files -----

std::string TempDir() {
  const char* env = std::getenv("MOE_TEST_TMP");
  std::string dir = env && *env ? env : ::testing::TempDir();
  if (!dir.empty() && dir.back() != '/') dir += '/';
  return dir;
}

TEST(Plot, WriteFileIsAtomicAndReportsErrors) {
  std::system(("mkdir -p '" + TempDir() + "'").c_str());
  const std::string path = TempDir() + "plot_test_write.png";
  const std::vector<uint8_t> bytes = Canvas(3, 2, kRed).Png();
  WriteFile(path, bytes);
  WriteFile(path, bytes);  // replaces
  std::ifstream in(path, std::ios::binary);
  const std::vector<uint8_t> back{std::istreambuf_iterator<char>(in), {}};
  EXPECT_EQ(back, bytes);
  EXPECT_EQ(std::fopen((path + ".tmp").c_str(), "rb"), nullptr);
  std::remove(path.c_str());
  try {
    WriteFile("/nonexistent-dir/x/plot.png", bytes);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent-dir/x/plot.png"), std::string::npos);
    EXPECT_EQ(std::string(e.what()).find('\n'), std::string::npos);
  }
}

// With MOE_PLOT_EXAMPLES=DIR, writes example charts there for a look.
TEST(Plot, Examples) {
  const char* dir = std::getenv("MOE_PLOT_EXAMPLES");
  if (!dir || !*dir) GTEST_SKIP() << "set MOE_PLOT_EXAMPLES=DIR to write example charts";
  Series train{"train", {}, {}, Palette(0)}, val{"validation", {}, {}, Palette(1), true};
  uint32_t seed = 1;
  auto noise = [&] {
    return ((seed = seed * 1664525u + 1013904223u) >> 8) / double(1 << 24) - 0.5;
  };
  for (int s = 0; s <= 3000; s += 10) {
    train.x.push_back(s);
    train.y.push_back(2.1 + 8.3 * std::exp(-s / 400.0) + 0.15 * noise());
  }
  for (int s = 0; s <= 3000; s += 250)
    val.x.push_back(s), val.y.push_back(2.3 + 8.1 * std::exp(-s / 420.0));
  WriteFile(std::string(dir) + "/loss.png",
            LineChartPng("Training loss", "step", "loss", {train, val}));
  std::vector<double> steps;
  for (int c = 0; c < 50; ++c) steps.push_back(20 * (c + 1));
  WriteFile(std::string(dir) + "/expert_load.png",
            HeatmapPng("Expert load (fraction of tokens)", "step", "expert", steps,
                       LoadPanels(3, 8, 50), 0, 0.25));
}

}  // namespace
}  // namespace moe::plot
