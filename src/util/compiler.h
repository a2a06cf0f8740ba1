// Compiler helpers shared by the kernels.
#pragma once

// Forces inlining of a function or (after a lambda's parameter list) a lambda. The vector
// kernels' per-chunk helpers need it: a call left out of line spills every vector register
// around it (all of them are caller-saved), and GCC's heuristics leave some out.
#if defined(__GNUC__) || defined(__clang__)
#define MOE_ALWAYS_INLINE __attribute__((always_inline))
#else
#define MOE_ALWAYS_INLINE
#endif
