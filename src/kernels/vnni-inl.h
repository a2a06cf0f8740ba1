// Included inside HWY_NAMESPACE, once per Highway target (no include guard, like Highway's own
// -inl headers): MOE_VNNI is 1 where GCC compiles the AVX3_DL target, and there enables
// avx512vnni for the vpdpbusd kernels. AVX3_DL is only chosen on CPUs with AVX512-VNNI (Highway
// checks it at run time), but Highway 1.0.3's AVX3_DL target string lacks "avx512vnni". Popped
// by HWY_AFTER_NAMESPACE together with Highway's own target options. (Other compilers take the
// int16 paths, which are also correct on AVX3_DL.)
#undef MOE_VNNI
#if HWY_TARGET == HWY_AVX3_DL && HWY_COMPILER_GCC_ACTUAL
#define MOE_VNNI 1
HWY_PRAGMA(GCC target("avx512vnni"))
#else
#define MOE_VNNI 0
#endif
