// Errors: the three tiers of DESIGN.md §10.
//   MOE_DASSERT  debug-only checks in hot loops;
//   MOE_ASSERT   always-on invariants (a bug in moe.cpp if it fires; aborts with file:line);
//   moe::Error   exceptions thrown at I/O, format and API boundaries, carrying one line that
//                tells the user what is wrong and what to change. The CLI prints it as
//                "moe: error: <message>" and exits with code 2. Kernels never throw.
// We use an exception rather than StatusOr<T> at boundaries: the GGUF validator has ~100 checks,
// and a thrown one-line message keeps each to one readable statement (see docs/DESIGN-NOTES.md).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace moe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// printf-style formatting into a std::string.
std::string StrFormat(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

[[noreturn]] void Fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

[[noreturn]] void AssertFailed(const char* expr, const char* file, int line);

}  // namespace moe

#define MOE_ASSERT(cond) \
  do { if (!(cond)) ::moe::AssertFailed(#cond, __FILE__, __LINE__); } while (0)
#ifndef NDEBUG
#define MOE_DASSERT(cond) MOE_ASSERT(cond)
#else
#define MOE_DASSERT(cond) do { (void)sizeof(cond); } while (0)
#endif
