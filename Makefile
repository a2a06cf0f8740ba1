# Thin wrapper over CMake. `make` builds Release into build/ (CLI: build/bin/moe).
JOBS ?= $(shell nproc)
BUILD ?= build

.PHONY: all build cli setup test demo bench clean asan

all: build

setup:
	@bash scripts/setup.sh

$(BUILD)/CMakeCache.txt:
	@cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release >/dev/null

build: $(BUILD)/CMakeCache.txt
	@cmake --build $(BUILD) -j $(JOBS)

# The CLI alone (what the demo and the benchmarks run), without the test binaries.
cli: $(BUILD)/CMakeCache.txt
	@cmake --build $(BUILD) -j $(JOBS) --target moe

# Sanitizer build of the format tests (truncated / bit-flipped / random GGUF files).
asan:
	@cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_SANITIZE=ON >/dev/null
	@cmake --build build-asan -j $(JOBS) --target test_formats test_moe
	@cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ./bin/test_formats
	@cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ./bin/test_moe --gtest_brief=1

test: setup build asan
	@cd $(BUILD) && ctest --output-on-failure -j 1

demo: setup cli
	@bash scripts/demo.sh

bench: setup cli
	@bash bench/run.sh

clean:
	rm -rf $(BUILD) build-asan
