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

int CountNot(const Canvas& cv, Rgb bg) {
  int n = 0;
  for (int y = 0; y < cv.height(); ++y)
    for (int x = 0; x < cv.width(); ++x) n += !(cv.Get(x, y) == bg);
  return n;
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
  cv.FillRect(-10, -10, 3, 2, kRed);  // 3 x 2 inside
  EXPECT_EQ(CountNot(cv, kWhite), 6);
  cv.FillRect(100, 100, 8, 9, kBlue);  // corners reversed: x in [8, 10), y in [9, 10)
  EXPECT_EQ(CountColor(Image{10, 10, Decode10(cv)}, kBlue), 2);
}

}  // namespace
}  // namespace moe::plot
