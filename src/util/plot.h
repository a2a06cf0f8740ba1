// Dependency-free plotting for `moe report`: an RGB canvas with a 5x7 bitmap font, a PNG encoder
// (zlib deflate + crc32), and two chart types: line charts (loss vs step) and stacked heatmaps
// (expert load per MoE layer over steps).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moe::plot {

struct Rgb {
  uint8_t r, g, b;
  bool operator==(const Rgb&) const = default;
};

// A categorical palette of distinct, readable colors for series; cycles for i >= 8.
Rgb Palette(int i);

// An 8-bit RGB image, origin at the top-left, x to the right and y down. Every drawing call is
// clipped to the image, so any coordinates are safe.
class Canvas {
 public:
  // Throws moe::Error for a non-positive or absurdly large (> 16384) width or height.
  Canvas(int width, int height, Rgb background = {255, 255, 255});
  int width() const { return width_; }
  int height() const { return height_; }

  void Set(int x, int y, Rgb c);  // ignored outside the image
  Rgb Get(int x, int y) const;    // {0, 0, 0} outside the image
  // Fills x in [x0, x1), y in [y0, y1) (corners in either order).
  void FillRect(int x0, int y0, int x1, int y1, Rgb c);
  // A straight line between pixel centres (x, y) and (x1, y1), both endpoints drawn; `thickness`
  // pixels wide (a square pen). Non-finite coordinates draw nothing.
  void Line(double x0, double y0, double x1, double y1, Rgb c, int thickness = 1);
  // Draws `s` with its top-left at (x, y), each font pixel a scale x scale block. Glyphs are 5x7
  // in a 6-wide, 9-tall cell (rows 7-8 hold descenders); characters outside printable ASCII
  // (a UTF-8 sequence counts as one) draw as a small box.
  void Text(int x, int y, const std::string& s, Rgb c, int scale = 1);
  // Same, rotated 90 degrees counter-clockwise (reads bottom to top); (x, y) is the top-left of
  // the rotated text's bounding box, which is TextHeight wide and TextWidth tall.
  void TextUp(int x, int y, const std::string& s, Rgb c, int scale = 1);
  static int TextWidth(const std::string& s, int scale = 1);  // pixels; 0 for ""
  static int TextHeight(int scale = 1);                       // cell height incl. descenders

  std::vector<uint8_t> Png() const;  // a complete PNG file (8-bit RGB, no interlace)

 private:
  int width_, height_;
  std::vector<uint8_t> rgb_;  // row-major, 3 bytes per pixel
};

// "Nice" axis ticks for [lo, hi] (either order): about n + 1 multiples of a 1, 2 or 5 x 10^k
// step, all inside the range. lo == hi gives {lo}; non-finite bounds give {}.
std::vector<double> NiceTicks(double lo, double hi, int n);
// The step NiceTicks(lo, hi, n) uses (1 when lo == hi).
double NiceStep(double lo, double hi, int n);
// A compact label for tick value v on an axis with tick spacing `step`: "0", "0.5", "10",
// "2.5e-3", "1.2e5" (scientific for |v| >= 1e5 or step < 1e-3).
std::string TickLabel(double v, double step);

struct Series {
  std::string label;         // shown in the legend; "" leaves the series out of it
  std::vector<double> x, y;  // the first min(x.size(), y.size()) points are drawn
  Rgb color;
  bool points = false;  // also mark each point with a small square
};
// Line chart: frame, x and y axes with nice ticks, grid and labels, title, axis labels and a
// legend (top right, inside the frame). Non-finite points are skipped and break the line. An
// empty series list or empty series draw just the axes; a single point or a constant series get
// a padded range. Throws moe::Error for an unusable size.
std::vector<uint8_t> LineChartPng(const std::string& title, const std::string& xlabel,
                                  const std::string& ylabel, const std::vector<Series>& series,
                                  int width = 900, int height = 500);

// One heatmap panel: values[row][col] (rows = e.g. experts, cols = e.g. steps).
struct Heatmap {
  std::string title;
  std::vector<std::vector<double>> values;
};
// Heatmaps stacked vertically, one panel per entry, sharing the x axis (labelled with a nice
// subset of x[col]; column indices when x does not have one increasing value per column), rows
// labelled 0..rows-1, each panel titled, and one color bar for [vmin, vmax] on the right.
// Values are clamped into [vmin, vmax]; NaN cells and missing cells of ragged rows are gray.
// The height follows from the panels' row counts. Throws moe::Error for an unusable width.
std::vector<uint8_t> HeatmapPng(const std::string& title, const std::string& xlabel,
                                const std::string& ylabel, const std::vector<double>& x,
                                const std::vector<Heatmap>& panels, double vmin, double vmax,
                                int width = 900);
// The heatmaps' sequential colormap (dark blue -> teal -> green -> yellow), t clamped to [0, 1].
Rgb ColorMap(double t);

// Writes bytes to path atomically (util/atomic_file.h); throws moe::Error on failure.
void WriteFile(const std::string& path, const std::vector<uint8_t>& bytes);

}  // namespace moe::plot
