// The machine's ceilings, measured by the same kind of instructions the engine runs (bench/: the
// decode floor is the bytes a token reads divided by the read bandwidth; prefill is bounded by
// the int8 and fp32 multiply-add rates). Single-threaded probes; `moe bench-machine` runs them on
// the pinned thread pool.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moe::kernels {

// Reads bytes [0, n) of p (n a multiple of 256, p 64-byte aligned) with vector loads, 8
// independent accumulators; returns a checksum so the reads cannot be elided.
uint64_t ReadStream(const uint8_t* p, size_t n);

// Runs `iters` rounds of independent fp32 fused multiply-add chains on full vectors, all in
// registers; returns the floating-point operations done (2 per lane per FMA).
double FmaProbe(int64_t iters);

// The same with the int8 product the quantized kernels use: VNNI dpbusd (u8 x s8, 4 products
// into an int32 lane) where the target has it, else int8 widened to int16 pairs multiplied and
// added (madd). Returns the int8 operations done (2 per multiply-add).
double Int8Probe(int64_t iters);

}  // namespace moe::kernels
