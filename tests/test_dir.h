// A folder for a test's files: $MOE_TEST_TMP/<name> (ctest sets MOE_TEST_TMP inside the build
// tree), else /tmp/moe_test/<name>. Created if missing.
#pragma once

#include <cstdlib>
#include <filesystem>
#include <string>

namespace moe {

inline std::string TestDir(const std::string& name) {
  const char* env = std::getenv("MOE_TEST_TMP");
  const std::string d = std::string(env && *env ? env : "/tmp/moe_test") + "/" + name;
  std::filesystem::create_directories(d);
  return d;
}

}  // namespace moe
