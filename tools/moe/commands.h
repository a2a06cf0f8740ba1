// The `moe` CLI: each sub-command registers its flags (declared once, with defaults and help
// text) and returns a runner. Runners throw moe::Error for user errors.
#pragma once

#include <functional>

#include <CLI/CLI.hpp>

namespace moe::cli {

using Runner = std::function<int()>;

Runner AddInit(CLI::App& app);
Runner AddInspect(CLI::App& app);
Runner AddRun(CLI::App& app);
Runner AddBench(CLI::App& app);
Runner AddBenchLayer(CLI::App& app);

}  // namespace moe::cli
