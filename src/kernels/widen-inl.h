// Per-target widening of F32 / F16 / BF16 rows to float, shared by MatMul's float activations
// (matmul-inl.h) and DequantizeRow (quant.cc: token embeddings, an F16 KV cache's rows).

#if defined(MOE_KERNELS_WIDEN_INL_H_) == defined(HWY_TARGET_TOGGLE)
#ifdef MOE_KERNELS_WIDEN_INL_H_
#undef MOE_KERNELS_WIDEN_INL_H_
#else
#define MOE_KERNELS_WIDEN_INL_H_
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "hwy/highway.h"

HWY_BEFORE_NAMESPACE();
namespace moe::kernels {
namespace HWY_NAMESPACE {

// Widens n elements of type T (float, float16_t or bfloat16_t) to float, any alignment.
template <typename T>
HWY_INLINE void WidenToF32(const uint8_t* src_bytes, float* HWY_RESTRICT f, int64_t n) {
  namespace hn = hwy::HWY_NAMESPACE;
  const T* src = reinterpret_cast<const T*>(src_bytes);
  const hn::ScalableTag<float> df;
  const hn::Rebind<T, decltype(df)> dt;
  const hn::CappedTag<float, 1> d1;
  const hn::Rebind<T, decltype(d1)> dt1;
  const int64_t N = static_cast<int64_t>(hn::Lanes(df));
  int64_t i = 0;
  if constexpr (std::is_same_v<T, float>) {
    for (; i + N <= n; i += N) hn::StoreU(hn::LoadU(df, src + i), df, f + i);
    std::memcpy(f + i, src_bytes + 4 * i, static_cast<size_t>(n - i) * sizeof(float));
  } else {
    for (; i + N <= n; i += N) hn::StoreU(hn::PromoteTo(df, hn::LoadU(dt, src + i)), df, f + i);
    for (; i < n; ++i) hn::StoreU(hn::PromoteTo(d1, hn::LoadU(dt1, src + i)), d1, f + i);
  }
}

}  // namespace HWY_NAMESPACE
}  // namespace moe::kernels
HWY_AFTER_NAMESPACE();

#endif  // MOE_KERNELS_WIDEN_INL_H_
