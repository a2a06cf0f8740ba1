// Dispatched entry points for the vector and element-wise kernels of kernels.h.
// Each call dispatches once; the per-target bodies are in ops-inl.h.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/ops.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kernels/ops-inl.h"

#if HWY_ONCE
#include "kernels/kernels.h"

namespace moe::kernels {

HWY_EXPORT(DotF32);
HWY_EXPORT(Axpy);
HWY_EXPORT(Scale);
HWY_EXPORT(Add);
HWY_EXPORT(RmsNorm);
HWY_EXPORT(Rope);
HWY_EXPORT(RopeAngles);
HWY_EXPORT(RopeRotate);
HWY_EXPORT(Softmax);
HWY_EXPORT(SiluMul);
HWY_EXPORT(Attend);
HWY_EXPORT(TopK);
HWY_EXPORT(ActiveTarget);

float DotF32(const float* a, const float* b, int64_t n) {
  return HWY_DYNAMIC_DISPATCH(DotF32)(a, b, n);
}
void Axpy(float a, const float* x, float* y, int64_t n) {
  HWY_DYNAMIC_DISPATCH(Axpy)(a, x, y, n);
}
void Scale(float a, float* y, int64_t n) { HWY_DYNAMIC_DISPATCH(Scale)(a, y, n); }
void Add(const float* a, const float* b, float* y, int64_t n) {
  HWY_DYNAMIC_DISPATCH(Add)(a, b, y, n);
}
void RmsNorm(const float* x, const float* w, int64_t n, float eps, float* out) {
  HWY_DYNAMIC_DISPATCH(RmsNorm)(x, w, n, eps, out);
}
void Rope(float* x, int n_heads, int head_dim, int n_rot, int pos, float freq_base, bool neox,
          const RopeScaling& scaling) {
  HWY_DYNAMIC_DISPATCH(Rope)(x, n_heads, head_dim, n_rot, pos, freq_base, neox, scaling);
}
void RopeAngles(int n_rot, int pos, float freq_base, const RopeScaling& scaling, float* cs) {
  HWY_DYNAMIC_DISPATCH(RopeAngles)(n_rot, pos, freq_base, scaling, cs);
}
void RopeRotate(float* x, int n_heads, int head_dim, int n_rot, bool neox, const float* cs) {
  HWY_DYNAMIC_DISPATCH(RopeRotate)(x, n_heads, head_dim, n_rot, neox, cs);
}
void Softmax(float* x, int64_t n) { HWY_DYNAMIC_DISPATCH(Softmax)(x, n); }
void SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SiluMul)(gate, up, out, n);
}
void Attend(const AttendRows& a, DType kv, const void* K, int64_t k_stride, int64_t Dk, const void* V,
            int64_t v_stride, int64_t Dv, int64_t n, float scale, float* s) {
  HWY_DYNAMIC_DISPATCH(Attend)(a, kv, K, k_stride, Dk, V, v_stride, Dv, n, scale, s);
}
void TopK(const float* x, int n, int k, int* idx) { HWY_DYNAMIC_DISPATCH(TopK)(x, n, k, idx); }
const char* ActiveTarget() { return HWY_DYNAMIC_DISPATCH(ActiveTarget)(); }

}  // namespace moe::kernels
#endif  // HWY_ONCE
