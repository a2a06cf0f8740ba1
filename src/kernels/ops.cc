// Dispatched entry points for the vector and element-wise kernels of kernels.h.
// Each call dispatches once; the per-target bodies are in ops-inl.h.

#undef HWY_TARGET_INCLUDE
#define HWY_TARGET_INCLUDE "kernels/ops.cc"
#include "hwy/foreach_target.h"  // IWYU pragma: keep
#include "hwy/highway.h"
#include "kernels/ops-inl.h"

#if HWY_ONCE
#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/kernels.h"

namespace moe::kernels {

HWY_EXPORT(DotF32);
HWY_EXPORT(Axpy);
HWY_EXPORT(Scale);
HWY_EXPORT(Add);
HWY_EXPORT(RmsNorm);
HWY_EXPORT(RopeApply);
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
void RopeTables(int n_rot, float freq_base, int pos0, int n_pos, float* cos_table, float* sin_table,
                const RopeScaling& sc) {
  if (n_rot <= 0) return;
  const int half = n_rot / 2;
  const float theta_scale = std::pow(freq_base, -2.0f / static_cast<float>(n_rot));
  float mscale = sc.attn_factor;
  if (sc.ext_factor != 0.0f) mscale *= 1.0f + 0.1f * std::log(1.0f / sc.freq_scale);
  for (int p = 0; p < n_pos; ++p) {
    float theta = static_cast<float>(pos0 + p);  // ggml's recurrence
    float* c = cos_table + static_cast<size_t>(p) * half;
    float* s = sin_table + static_cast<size_t>(p) * half;
    for (int i = 0; i < half; ++i) {
      float angle = sc.freq_scale * theta;
      if (sc.ext_factor != 0.0f) {  // YaRN: ggml's rope_yarn
        const float y = (static_cast<float>(i) - sc.corr_dims[0]) / std::max(0.001f, sc.corr_dims[1] - sc.corr_dims[0]);
        const float ramp = (1.0f - std::min(1.0f, std::max(0.0f, y))) * sc.ext_factor;
        angle = angle * (1.0f - ramp) + theta * ramp;
      }
      c[i] = std::cos(angle) * mscale;
      s[i] = std::sin(angle) * mscale;
      theta *= theta_scale;
    }
  }
}
void RopeApply(float* x, int n_heads, int head_dim, int n_rot, const float* cos_row, const float* sin_row, bool neox,
               bool inverse) {
  HWY_DYNAMIC_DISPATCH(RopeApply)(x, n_heads, head_dim, n_rot, cos_row, sin_row, neox, inverse);
}
void Rope(float* x, int n_heads, int head_dim, int n_rot, int pos, float freq_base, bool neox,
          const RopeScaling& scaling) {
  if (n_rot <= 0 || n_heads <= 0) return;
  std::vector<float> c(static_cast<size_t>(n_rot / 2)), s(c.size());
  RopeTables(n_rot, freq_base, pos, 1, c.data(), s.data(), scaling);
  RopeApply(x, n_heads, head_dim, n_rot, c.data(), s.data(), neox);
}
void Softmax(float* x, int64_t n) { HWY_DYNAMIC_DISPATCH(Softmax)(x, n); }
void SiluMul(const float* gate, const float* up, float* out, int64_t n) {
  HWY_DYNAMIC_DISPATCH(SiluMul)(gate, up, out, n);
}
void Attend(const AttendRows& a, DType kv, const KvRows& K, int64_t Dk, const KvRows& V, int64_t Dv, int64_t n,
            float scale, float* s) {
  HWY_DYNAMIC_DISPATCH(Attend)(a, kv, K, Dk, V, Dv, n, scale, s);
}
void TopK(const float* x, int n, int k, int* idx) { HWY_DYNAMIC_DISPATCH(TopK)(x, n, k, idx); }
const char* ActiveTarget() { return HWY_DYNAMIC_DISPATCH(ActiveTarget)(); }

}  // namespace moe::kernels
#endif  // HWY_ONCE
