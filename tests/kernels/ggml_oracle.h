// ggml's own format code as a test oracle: the prebuilt CPU libraries node-llama-cpp ships
// (third_party/npm/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64, installed by
// scripts/setup.sh), loaded with dlopen. Never linked into moe: tests only.
//   libggml-base.so  dequantize_row_<t>, quantize_row_<t>_ref, ggml_quantize_chunk,
//                    ggml_get_type_traits (block size and bytes)
//   libggml-cpu-haswell.so  ggml_get_type_traits_cpu: each weight type's vec_dot and its
//                    vec-dot type's from_float, built for AVX2: what llama.cpp runs on any
//                    x86-64 moe.cpp supports (its AVX-512 variants share the AVX2 activation
//                    code). libggml-cpu-x64.so (baseline x86-64, ggml's generic code, which
//                    rounds activation ties away from zero) only where the CPU lacks AVX2.
// Type ids are ggml's (enum ggml_type), the same numbers as moe::DType.
#pragma once

#include <dlfcn.h>

#include <cstdint>
#include <cstdio>
#include <string>

namespace moe::test {

class GgmlOracle {
 public:
  using ToFloat = void (*)(const void* x, float* y, int64_t k);
  using FromFloat = void (*)(const float* x, void* y, int64_t k);
  using VecDot = void (*)(int n, float* s, size_t bs, const void* x, size_t bx, const void* y, size_t by, int nrc);
  struct TypeTraits {  // ggml.h: struct ggml_type_traits
    const char* type_name;
    int64_t blck_size;
    int64_t blck_size_interleave;
    size_t type_size;
    bool is_quantized;
    ToFloat to_float;
    FromFloat from_float_ref;
  };
  struct TypeTraitsCpu {  // ggml-cpu.h: struct ggml_type_traits_cpu
    FromFloat from_float;
    VecDot vec_dot;
    int vec_dot_type;
    int64_t nrows;
  };

  // The loaded oracle, or nullptr with the reason in *why.
  static const GgmlOracle* Get(std::string* why) {
    static GgmlOracle o;
    static const bool ok = o.Load();
    if (!ok) {
      if (why) *why = o.error_;
      return nullptr;
    }
    return &o;
  }

  const TypeTraits* Traits(int type) const { return traits_(type); }
  // The type's dequantizer: its traits' to_float, else dequantize_row_<type name> (q8_K has no
  // to_float in the traits).
  ToFloat Dequantizer(int type) const {
    const TypeTraits* t = traits_(type);
    if (t->to_float) return t->to_float;
    return reinterpret_cast<ToFloat>(dlsym(base_, ("dequantize_row_" + std::string(t->type_name)).c_str()));
  }
  const TypeTraitsCpu* TraitsCpu(int type) const { return traits_cpu_(type); }
  // quantize_row_<name>_ref (nullptr if this ggml has none for the name).
  FromFloat QuantizeRef(const char* name) const {
    return reinterpret_cast<FromFloat>(dlsym(base_, ("quantize_row_" + std::string(name) + "_ref").c_str()));
  }
  // ggml_quantize_chunk: nrows rows of n_per_row floats; returns bytes written.
  size_t QuantizeChunk(int type, const float* src, void* dst, int64_t nrows, int64_t n_per_row,
                       const float* imatrix) const {
    init_(type);
    return chunk_(type, src, dst, 0, nrows, n_per_row, imatrix);
  }

 private:
  static std::string Root() {
    std::string f = __FILE__;  // <root>/tests/kernels/ggml_oracle.h
    for (int i = 0; i < 3; ++i) f = f.substr(0, f.find_last_of('/'));
    return f;
  }
  bool Load() {
    const std::string dir = Root() + "/third_party/npm/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64/";
    base_ = dlopen((dir + "libggml-base.so").c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (!base_) return Fail(std::string("cannot load ggml's libggml-base.so (run scripts/setup.sh): ") + dlerror());
#if defined(__x86_64__)
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("bmi2");
#else
    const bool avx2 = false;  // (the libraries are x86-64 ones: dlopen fails, tests skip)
#endif
    const std::string cpu_lib = getenv("MOE_GGML_CPU") ? getenv("MOE_GGML_CPU") : avx2 ? "libggml-cpu-haswell.so" : "libggml-cpu-x64.so";
    cpu_ = dlopen((dir + cpu_lib).c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!cpu_) return Fail("cannot load ggml's " + cpu_lib + ": " + dlerror());
    traits_ = reinterpret_cast<const TypeTraits* (*)(int)>(dlsym(base_, "ggml_get_type_traits"));
    traits_cpu_ = reinterpret_cast<const TypeTraitsCpu* (*)(int)>(dlsym(cpu_, "ggml_get_type_traits_cpu"));
    init_ = reinterpret_cast<void (*)(int)>(dlsym(base_, "ggml_quantize_init"));
    chunk_ = reinterpret_cast<size_t (*)(int, const float*, void*, int64_t, int64_t, int64_t, const float*)>(
        dlsym(base_, "ggml_quantize_chunk"));
    auto cpu_init = reinterpret_cast<void (*)()>(dlsym(cpu_, "ggml_cpu_init"));
    if (!traits_ || !traits_cpu_ || !init_ || !chunk_ || !cpu_init) return Fail("ggml's libraries lack an expected symbol");
    cpu_init();
    return true;
  }
  bool Fail(const std::string& e) {
    error_ = e;
    return false;
  }
  void* base_ = nullptr;
  void* cpu_ = nullptr;
  const TypeTraits* (*traits_)(int) = nullptr;
  const TypeTraitsCpu* (*traits_cpu_)(int) = nullptr;
  void (*init_)(int) = nullptr;
  size_t (*chunk_)(int, const float*, void*, int64_t, int64_t, int64_t, const float*) = nullptr;
  std::string error_;
};

}  // namespace moe::test
