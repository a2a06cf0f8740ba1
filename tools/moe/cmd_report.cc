// moe report DIR: a training run's metrics.jsonl as PNG plots (training and validation loss
// against step; the expert load of every layer over the steps as a heatmap) and a short
// markdown summary, written to DIR/report/ (or -o) and printed.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "commands.h"
#include "model/model.h"
#include "util/atomic_file.h"
#include "util/error.h"
#include "util/plot.h"

namespace moe::cli {

namespace fs = std::filesystem;

namespace {

struct Run {
  std::vector<double> step, loss, tps, max_vio, elapsed;
  std::vector<std::vector<std::vector<double>>> load;  // [step][layer][target]
  std::vector<double> val_step, val_loss;
};

Run ReadMetrics(const fs::path& path) {
  std::istringstream in(ReadRegularFile(path.string(), "the metrics of a moe train output folder,"));
  Run r;
  std::string line;
  int n = 0;
  while (std::getline(in, line)) {
    ++n;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object() || !j.contains("step"))
      Fail("%s line %d is not a metrics record", path.c_str(), n);
    const double step = j["step"].get<double>();
    if (j.contains("val_loss")) {
      r.val_step.push_back(step);
      r.val_loss.push_back(j["val_loss"].get<double>());
      continue;
    }
    r.step.push_back(step);
    r.loss.push_back(j.value("loss", std::nan("")));
    r.tps.push_back(j.value("tokens_per_s", std::nan("")));
    r.max_vio.push_back(j.value("max_vio", std::nan("")));
    r.elapsed.push_back(j.value("elapsed_s", std::nan("")));
    r.load.push_back(j.value("expert_load", std::vector<std::vector<double>>()));
  }
  if (r.step.empty()) Fail("%s has no training steps", path.c_str());
  return r;
}

std::string Fmt(double v, const char* f = "%.4f") { return std::isfinite(v) ? StrFormat(f, v) : "-"; }

}  // namespace

Runner AddReport(CLI::App& app) {
  struct Options {
    std::string dir, out;
    int max_columns = 200;
  };
  auto o = std::make_shared<Options>();
  app.add_option("dir", o->dir, "a moe train output folder (metrics.jsonl, model.gguf)")->required();
  app.add_option("-o,--out", o->out, "where to write the report (default DIR/report)");
  app.add_option("--max-columns", o->max_columns, "heatmap columns (steps are averaged into at most this many)")
      ->default_val(200);
  return [=]() {
    if (o->max_columns < 1) Fail("--max-columns must be >= 1");
    const fs::path dir(o->dir);
    const Run r = ReadMetrics(dir / "metrics.jsonl");
    const fs::path out = o->out.empty() ? dir / "report" : fs::path(o->out);
    std::error_code ec;
    fs::create_directories(out, ec);
    if (ec) Fail("%s: cannot create the report folder: %s", out.c_str(), ec.message().c_str());

    // Loss curves.
    std::vector<plot::Series> series = {{"training loss", r.step, r.loss, plot::Palette(0), false}};
    if (!r.val_step.empty()) series.push_back({"validation loss", r.val_step, r.val_loss, plot::Palette(1), true});
    plot::WriteFile((out / "loss.png").string(), plot::LineChartPng("Loss", "step", "cross-entropy (nats)", series));

    // Expert load: one panel per layer, targets x (binned) steps.
    const size_t n_layers = r.load.empty() ? 0 : r.load.back().size();
    const size_t n_steps = r.step.size();
    const size_t cols = std::min<size_t>(n_steps, static_cast<size_t>(o->max_columns));
    std::vector<plot::Heatmap> panels;
    std::vector<double> xs(cols);
    for (size_t c = 0; c < cols; ++c) xs[c] = r.step[std::min(n_steps - 1, (c * n_steps + n_steps / cols / 2) / cols)];
    double vmax = 0;
    for (size_t il = 0; il < n_layers; ++il) {
      const size_t n_targets = r.load.back()[il].size();
      if (n_targets == 0) continue;  // a dense block (deepseek2's leading blocks) routes nothing
      plot::Heatmap h{StrFormat("layer %zu", il), std::vector<std::vector<double>>(n_targets, std::vector<double>(cols, 0))};
      for (size_t c = 0; c < cols; ++c) {
        const size_t s0 = c * n_steps / cols, s1 = std::max(s0 + 1, (c + 1) * n_steps / cols);
        for (size_t e = 0; e < n_targets; ++e) {
          double sum = 0;
          int cnt = 0;
          for (size_t s = s0; s < s1; ++s) {
            if (il < r.load[s].size() && e < r.load[s][il].size()) {
              sum += r.load[s][il][e];
              ++cnt;
            }
          }
          h.values[e][c] = cnt ? sum / cnt : std::nan("");
          if (cnt) vmax = std::max(vmax, h.values[e][c]);
        }
      }
      panels.push_back(std::move(h));
    }
    plot::WriteFile((out / "expert_load.png").string(),
                    plot::HeatmapPng("Expert load (share of routed slots)", "step", "expert", xs, panels, 0.0,
                                     vmax > 0 ? vmax : 1.0));

    // Summary.
    std::string md = "# Training report: " + o->dir + "\n\n";
    if (fs::exists(dir / "model.gguf")) {
      try {
        auto m = Model::Load((dir / "model.gguf").string(), /*allow_training_only=*/true);
        const ModelConfig& c = m->config();
        uint64_t params = 0;
        for (const GgufTensorInfo& t : m->file().tensors()) params += static_cast<uint64_t>(t.view.NumElements());
        md += StrFormat("Model: %s, %u layers, dim %u, %u experts of width %u, top-%u, router %s; %.2fM parameters "
                        "(%.2fM active per token); vocabulary %u (%s).\n\n",
                        c.arch_name.c_str(), c.n_layer, c.n_embd, c.n_expert, c.n_ff_exp, c.n_expert_used,
                        MoeRouterName(c.router_kind), params / 1e6,
                        (params - static_cast<double>(c.n_layer - c.n_layer_dense_lead) * 3 * c.n_embd * c.n_ff_exp *
                                      (c.n_expert - c.n_expert_used)) / 1e6,
                        c.n_vocab, m->tokenizer().model().c_str());
      } catch (const Error& e) {
        md += std::string("Model: cannot read model.gguf (") + e.what() + ").\n\n";
      }
    }
    std::vector<double> tps;
    for (double v : r.tps)
      if (std::isfinite(v)) tps.push_back(v);
    double best_val = std::nan(""), best_val_step = 0;
    for (size_t i = 0; i < r.val_loss.size(); ++i) {
      if (!(r.val_loss[i] >= best_val)) {
        best_val = r.val_loss[i];
        best_val_step = r.val_step[i];
      }
    }
    md += "| steps | first loss | last loss | last validation loss | best validation loss (step) | tokens/s (median) | time |\n";
    md += "|---|---|---|---|---|---|---|\n";
    md += StrFormat("| %.0f | %s | %s | %s (ppl %s) | %s (%.0f) | %s | %s s |\n\n", r.step.back(), Fmt(r.loss.front()).c_str(),
                    Fmt(r.loss.back()).c_str(), Fmt(r.val_loss.empty() ? std::nan("") : r.val_loss.back()).c_str(),
                    Fmt(r.val_loss.empty() ? std::nan("") : std::exp(r.val_loss.back()), "%.2f").c_str(),
                    Fmt(best_val).c_str(), best_val_step, Fmt(tps.empty() ? std::nan("") : Median(tps), "%.0f").c_str(),
                    Fmt(r.elapsed.back(), "%.0f").c_str());
    if (n_layers > 0) {
      md += "Routing at the last step (share of routed slots per target; MaxVio = (max load - mean) / mean over the FFN experts, "
            "averaged over layers: " + Fmt(r.max_vio.back(), "%.3f") + "):\n\n| layer | shares | min | max |\n|---|---|---|---|\n";
      for (size_t il = 0; il < n_layers; ++il) {
        const std::vector<double>& s = r.load.back()[il];
        if (s.empty()) {  // a dense block
          md += StrFormat("| %zu | (dense) | - | - |\n", il);
          continue;
        }
        std::string shares;
        for (double v : s) shares += (shares.empty() ? "" : " ") + StrFormat("%.3f", v);
        md += StrFormat("| %zu | %s | %.3f | %.3f |\n", il, shares.c_str(), *std::min_element(s.begin(), s.end()),
                        *std::max_element(s.begin(), s.end()));
      }
      md += "\n";
    }
    md += "Plots: [loss.png](loss.png) (training and validation loss), [expert_load.png](expert_load.png) "
          "(expert load per layer over the steps).\n";
    std::vector<uint8_t> bytes(md.begin(), md.end());
    plot::WriteFile((out / "summary.md").string(), bytes);
    std::fwrite(md.data(), 1, md.size(), stdout);
    std::fflush(stdout);
    std::fprintf(stderr, "report: wrote %s, %s and %s\n", (out / "summary.md").c_str(), (out / "loss.png").c_str(),
                 (out / "expert_load.png").c_str());
    return 0;
  };
}

}  // namespace moe::cli
