// CPU kernels of ms_deform_attn: forward and backward, float32 / float64 / bfloat16.
//
// Forward parallelises over (n, q, m) rows; backward over (n, m) pairs so that every task owns a
// disjoint slice value[n, :, m, :] of the value gradient: no atomics, no per-thread copies, and
// the result does not depend on the thread count. Arithmetic is in float (double for float64).
// The hot loops are compiled for AVX2+FMA and for the baseline ISA, chosen at run time.
#include "ms_deform_attn.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace stm_dist {
namespace {

// Each entry point below is compiled twice, for AVX2+FMA and for the baseline ISA, and picked
// at run time: the extension is built without -march flags, and GCC's target_clones resolver
// does not recognise every AVX2 CPU (it picked the baseline on an AMD EPYC guest here).
// flatten: the template bodies must be inlined into each copy to be compiled for its target.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define STM_X86_DISPATCH 1
#define STM_AVX2 __attribute__((target("avx2,fma"), flatten))
#else
#define STM_X86_DISPATCH 0
#define STM_AVX2
#endif
#define STM_BASE __attribute__((flatten))

bool cpu_has_avx2() {
#if STM_X86_DISPATCH
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
#else
  return false;
#endif
}

// Head widths compiled with a constant channel count (fully unrolled inner loops); any other
// width takes the runtime-D path.
constexpr int64_t kRuntimeD = 0;

// Bilinear footprint of one sample: four neighbour offsets (in pixels, relative to the level
// start) and their weights; neighbours outside the map get offset -1 and weight 0.
template <typename acc_t>
struct Footprint {
  int64_t idx[4];
  acc_t w[4];
  acc_t lh, lw;  // fractional parts, needed by the backward pass
};

// Returns false when the sample lies wholly outside the map (it then contributes nothing, as in
// grid_sample with zero padding).
template <typename acc_t>
inline bool footprint(acc_t x, acc_t y, int64_t H, int64_t W, Footprint<acc_t>& f) {
  const acc_t h = y * static_cast<acc_t>(H) - acc_t(0.5);
  const acc_t w = x * static_cast<acc_t>(W) - acc_t(0.5);
  if (!(h > acc_t(-1) && w > acc_t(-1) && h < static_cast<acc_t>(H) && w < static_cast<acc_t>(W)))
    return false;
  const acc_t hf = std::floor(h), wf = std::floor(w);
  const int64_t h0 = static_cast<int64_t>(hf), w0 = static_cast<int64_t>(wf);
  const int64_t h1 = h0 + 1, w1 = w0 + 1;
  f.lh = h - hf;
  f.lw = w - wf;
  const acc_t hh = acc_t(1) - f.lh, hw = acc_t(1) - f.lw;
  const bool top = h0 >= 0, bottom = h1 <= H - 1, left = w0 >= 0, right = w1 <= W - 1;
  f.idx[0] = (top && left) ? h0 * W + w0 : -1;
  f.idx[1] = (top && right) ? h0 * W + w1 : -1;
  f.idx[2] = (bottom && left) ? h1 * W + w0 : -1;
  f.idx[3] = (bottom && right) ? h1 * W + w1 : -1;
  f.w[0] = hh * hw;
  f.w[1] = hh * f.lw;
  f.w[2] = f.lh * hw;
  f.w[3] = f.lh * f.lw;
  for (int k = 0; k < 4; ++k)
    if (f.idx[k] < 0) f.w[k] = acc_t(0);
  return true;
}

// acc[c] += sum_k coef[k] * v_k[c]; missing neighbours point at a zero row.
template <int64_t kD, typename scalar_t, typename acc_t>
inline void gather4(acc_t* __restrict acc, const scalar_t* __restrict v0,
                    const scalar_t* __restrict v1, const scalar_t* __restrict v2,
                    const scalar_t* __restrict v3, const acc_t* coef, int64_t D_) {
  const int64_t D = kD == kRuntimeD ? D_ : kD;
  const acc_t c0 = coef[0], c1 = coef[1], c2 = coef[2], c3 = coef[3];
#pragma omp simd
  for (int64_t c = 0; c < D; ++c)
    acc[c] += c0 * static_cast<acc_t>(v0[c]) + c1 * static_cast<acc_t>(v1[c]) +
              c2 * static_cast<acc_t>(v2[c]) + c3 * static_cast<acc_t>(v3[c]);
}

template <typename scalar_t, int64_t kD>
void forward_rows(const MsDeformGeometry& g, const scalar_t* value, const scalar_t* loc,
                  const scalar_t* attn, scalar_t* out, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = g.D, M = g.M, LP = g.L * g.P, pix = M * D;
  std::vector<acc_t> acc(D);
  const std::vector<scalar_t> zero(D, scalar_t(0));
  for (int64_t i = begin; i < end; ++i) {  // i = (n * Lq + q) * M + m
    const int64_t m = i % M, n = i / (g.Lq * M);
    std::fill(acc.begin(), acc.end(), acc_t(0));
    const scalar_t* li = loc + i * LP * 2;
    const scalar_t* ai = attn + i * LP;
    for (int64_t l = 0; l < g.L; ++l) {
      const scalar_t* base = value + ((n * g.S + g.start[l]) * M + m) * D;
      for (int64_t p = 0; p < g.P; ++p) {
        const int64_t lp = l * g.P + p;
        Footprint<acc_t> f;
        if (!footprint<acc_t>(li[2 * lp], li[2 * lp + 1], g.H[l], g.W[l], f)) continue;
        const acc_t a = static_cast<acc_t>(ai[lp]);
        const acc_t coef[4] = {a * f.w[0], a * f.w[1], a * f.w[2], a * f.w[3]};
        const scalar_t* v[4];
        for (int k = 0; k < 4; ++k) v[k] = f.idx[k] >= 0 ? base + f.idx[k] * pix : zero.data();
        gather4<kD>(acc.data(), v[0], v[1], v[2], v[3], coef, D);
      }
    }
    scalar_t* o = out + i * D;
    for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[c]);
  }
}

// One sample's backward over the D channels of its head. Returns through the three sums the
// channel reductions needed for the attention-weight and location gradients.
template <int64_t kD, typename scalar_t, typename acc_t>
inline void scatter4(const acc_t* __restrict tg, const scalar_t* __restrict v0,
                     const scalar_t* __restrict v1, const scalar_t* __restrict v2,
                     const scalar_t* __restrict v3, acc_t* __restrict g0, acc_t* __restrict g1,
                     acc_t* __restrict g2, acc_t* __restrict g3, const Footprint<acc_t>& f,
                     acc_t a, int64_t D_, acc_t& s_val, acc_t& s_dh, acc_t& s_dw) {
  const int64_t D = kD == kRuntimeD ? D_ : kD;
  const acc_t lh = f.lh, lw = f.lw, hh = acc_t(1) - lh, hw = acc_t(1) - lw;
  const acc_t w0 = f.w[0], w1 = f.w[1], w2 = f.w[2], w3 = f.w[3];
  const acc_t a0 = a * w0, a1 = a * w1, a2 = a * w2, a3 = a * w3;
  acc_t sv = 0, sh = 0, sw = 0;
  // Reassociating the three channel sums is what lets this loop vectorise.
#pragma omp simd reduction(+ : sv, sh, sw)
  for (int64_t c = 0; c < D; ++c) {
    const acc_t x0 = static_cast<acc_t>(v0[c]), x1 = static_cast<acc_t>(v1[c]);
    const acc_t x2 = static_cast<acc_t>(v2[c]), x3 = static_cast<acc_t>(v3[c]);
    const acc_t t = tg[c];
    sv += t * (w0 * x0 + w1 * x1 + w2 * x2 + w3 * x3);
    sh += t * (hw * (x2 - x0) + lw * (x3 - x1));
    sw += t * (hh * (x1 - x0) + lh * (x3 - x2));
    g0[c] += a0 * t;
    g1[c] += a1 * t;
    g2[c] += a2 * t;
    g3[c] += a3 * t;
  }
  s_val = sv;
  s_dh = sh;
  s_dw = sw;
}

// Backward for the (n, m) pairs [begin, end). grad_value is in acc_t (float for bfloat16) and
// this task is its only writer for value[n, :, m, :].
template <typename scalar_t, int64_t kD>
void backward_pairs(const MsDeformGeometry& g, const scalar_t* grad_out, const scalar_t* value,
                    const scalar_t* loc, const scalar_t* attn,
                    at::opmath_type<scalar_t>* grad_value, scalar_t* grad_loc,
                    scalar_t* grad_attn, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = g.D, M = g.M, LP = g.L * g.P, pix = M * D;
  std::vector<acc_t> tg(D);
  const std::vector<scalar_t> zero(D, scalar_t(0));
  std::vector<acc_t> sink(4 * D);  // gradient rows of missing neighbours land here, unused
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / M, m = nm % M;
    for (int64_t q = 0; q < g.Lq; ++q) {
      const int64_t i = (n * g.Lq + q) * M + m;
      const scalar_t* go = grad_out + i * D;
      for (int64_t c = 0; c < D; ++c) tg[c] = static_cast<acc_t>(go[c]);
      const scalar_t* li = loc + i * LP * 2;
      const scalar_t* ai = attn + i * LP;
      scalar_t* gli = grad_loc + i * LP * 2;
      scalar_t* gai = grad_attn + i * LP;
      for (int64_t l = 0; l < g.L; ++l) {
        const int64_t off = ((n * g.S + g.start[l]) * M + m) * D;
        const scalar_t* base = value + off;
        acc_t* gbase = grad_value + off;
        for (int64_t p = 0; p < g.P; ++p) {
          const int64_t lp = l * g.P + p;
          Footprint<acc_t> f;
          if (!footprint<acc_t>(li[2 * lp], li[2 * lp + 1], g.H[l], g.W[l], f)) {
            gli[2 * lp] = gli[2 * lp + 1] = gai[lp] = scalar_t(0);
            continue;
          }
          const acc_t a = static_cast<acc_t>(ai[lp]);
          const scalar_t* v[4];
          acc_t* gv[4];
          for (int k = 0; k < 4; ++k) {
            const bool in = f.idx[k] >= 0;
            v[k] = in ? base + f.idx[k] * pix : zero.data();
            gv[k] = in ? gbase + f.idx[k] * pix : sink.data() + k * D;
          }
          acc_t s_val, s_dh, s_dw;
          scatter4<kD>(tg.data(), v[0], v[1], v[2], v[3], gv[0], gv[1], gv[2], gv[3], f, a, D, s_val,
                   s_dh, s_dw);
          gai[lp] = static_cast<scalar_t>(s_val);
          gli[2 * lp] = static_cast<scalar_t>(a * s_dw * static_cast<acc_t>(g.W[l]));
          gli[2 * lp + 1] = static_cast<scalar_t>(a * s_dh * static_cast<acc_t>(g.H[l]));
        }
      }
    }
  }
}

// Non-template entry points, one per dtype and ISA.
#define STM_ENTRY(T, NAME, ATTR)                                                                \
  ATTR void forward_##NAME(const MsDeformGeometry& g, const T* v, const T* l, const T* a, T* o, \
                           int64_t b, int64_t e) {                                              \
    if (g.D == 16) return forward_rows<T, 16>(g, v, l, a, o, b, e);                            \
    if (g.D == 32) return forward_rows<T, 32>(g, v, l, a, o, b, e);                            \
    forward_rows<T, kRuntimeD>(g, v, l, a, o, b, e);                                            \
  }                                                                                             \
  ATTR void backward_##NAME(const MsDeformGeometry& g, const T* go, const T* v, const T* l,     \
                            const T* a, at::opmath_type<T>* gv, T* gl, T* ga, int64_t b,        \
                            int64_t e) {                                                        \
    if (g.D == 16) return backward_pairs<T, 16>(g, go, v, l, a, gv, gl, ga, b, e);             \
    if (g.D == 32) return backward_pairs<T, 32>(g, go, v, l, a, gv, gl, ga, b, e);             \
    backward_pairs<T, kRuntimeD>(g, go, v, l, a, gv, gl, ga, b, e);                             \
  }
#define STM_INSTANTIATE(T, NAME)                                                                \
  STM_ENTRY(T, NAME##_avx2, STM_AVX2)                                                           \
  STM_ENTRY(T, NAME##_base, STM_BASE)                                                           \
  void forward_##NAME(const MsDeformGeometry& g, const T* v, const T* l, const T* a, T* o,      \
                      int64_t b, int64_t e) {                                                   \
    cpu_has_avx2() ? forward_##NAME##_avx2(g, v, l, a, o, b, e)                                 \
                   : forward_##NAME##_base(g, v, l, a, o, b, e);                                \
  }                                                                                             \
  void backward_##NAME(const MsDeformGeometry& g, const T* go, const T* v, const T* l,          \
                       const T* a, at::opmath_type<T>* gv, T* gl, T* ga, int64_t b, int64_t e) { \
    cpu_has_avx2() ? backward_##NAME##_avx2(g, go, v, l, a, gv, gl, ga, b, e)                   \
                   : backward_##NAME##_base(g, go, v, l, a, gv, gl, ga, b, e);                  \
  }
STM_INSTANTIATE(float, f32)
STM_INSTANTIATE(double, f64)
STM_INSTANTIATE(c10::BFloat16, bf16)
#undef STM_INSTANTIATE
#undef STM_ENTRY

inline void forward_dispatch(const MsDeformGeometry& g, const float* v, const float* l,
                             const float* a, float* o, int64_t b, int64_t e) {
  forward_f32(g, v, l, a, o, b, e);
}
inline void forward_dispatch(const MsDeformGeometry& g, const double* v, const double* l,
                             const double* a, double* o, int64_t b, int64_t e) {
  forward_f64(g, v, l, a, o, b, e);
}
inline void forward_dispatch(const MsDeformGeometry& g, const c10::BFloat16* v,
                             const c10::BFloat16* l, const c10::BFloat16* a, c10::BFloat16* o,
                             int64_t b, int64_t e) {
  forward_bf16(g, v, l, a, o, b, e);
}
inline void backward_dispatch(const MsDeformGeometry& g, const float* go, const float* v,
                              const float* l, const float* a, float* gv, float* gl, float* ga,
                              int64_t b, int64_t e) {
  backward_f32(g, go, v, l, a, gv, gl, ga, b, e);
}
inline void backward_dispatch(const MsDeformGeometry& g, const double* go, const double* v,
                              const double* l, const double* a, double* gv, double* gl,
                              double* ga, int64_t b, int64_t e) {
  backward_f64(g, go, v, l, a, gv, gl, ga, b, e);
}
inline void backward_dispatch(const MsDeformGeometry& g, const c10::BFloat16* go,
                              const c10::BFloat16* v, const c10::BFloat16* l,
                              const c10::BFloat16* a, float* gv, c10::BFloat16* gl,
                              c10::BFloat16* ga, int64_t b, int64_t e) {
  backward_bf16(g, go, v, l, a, gv, gl, ga, b, e);
}

void check_cpu_dtype(const at::Tensor& value) {
  const auto t = value.scalar_type();
  STM_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16,
              "ms_deform_attn (CPU): value dtype ", t,
              " is not supported; use float32, float64 or bfloat16");
}

at::Tensor ms_deform_attn_cpu(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                              const at::Tensor& level_start_index, const at::Tensor& loc_in,
                              const at::Tensor& attn_in) {
  const auto g = check_ms_deform_inputs("ms_deform_attn", value_in, spatial_shapes,
                                        level_start_index, loc_in, attn_in);
  check_cpu_dtype(value_in);
  const auto value = value_in.contiguous();
  const auto loc = loc_in.contiguous();
  const auto attn = attn_in.contiguous();
  auto out = at::empty({g.N, g.Lq, g.M * g.D}, value.options());
  const int64_t rows = g.N * g.Lq * g.M;
  if (rows == 0 || g.D == 0) return out.zero_();
  // ~16 rows per task keeps scheduling overhead small against ~L*P*4*D flops per row.
  const int64_t grain = std::max<int64_t>(1, 2048 / std::max<int64_t>(1, g.L * g.P * g.D / 8));
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_cpu", [&] {
    const scalar_t* v = value.const_data_ptr<scalar_t>();
    const scalar_t* l = loc.const_data_ptr<scalar_t>();
    const scalar_t* a = attn.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
      forward_dispatch(g, v, l, a, o, b, e);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& value_in, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& loc_in, const at::Tensor& attn_in) {
  const auto g = check_ms_deform_inputs("ms_deform_attn_backward", value_in, spatial_shapes,
                                        level_start_index, loc_in, attn_in, &grad_in);
  check_cpu_dtype(value_in);
  const auto value = value_in.contiguous();
  const auto loc = loc_in.contiguous();
  const auto attn = attn_in.contiguous();
  const auto grad = grad_in.contiguous();
  const auto acc_type = at::toOpMathType(value.scalar_type());
  auto grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  const int64_t pairs = g.N * g.M;
  if (pairs > 0 && g.Lq > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, value.scalar_type(), "ms_deform_attn_bwd_cpu", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const scalar_t* go = grad.const_data_ptr<scalar_t>();
      const scalar_t* v = value.const_data_ptr<scalar_t>();
      const scalar_t* l = loc.const_data_ptr<scalar_t>();
      const scalar_t* a = attn.const_data_ptr<scalar_t>();
      acc_t* gv = grad_value_acc.mutable_data_ptr<acc_t>();
      scalar_t* gl = grad_loc.mutable_data_ptr<scalar_t>();
      scalar_t* ga = grad_attn.mutable_data_ptr<scalar_t>();
      at::parallel_for(0, pairs, 1, [&](int64_t b, int64_t e) {
        backward_dispatch(g, go, v, l, a, gv, gl, ga, b, e);
      });
    });
  } else {
    grad_loc.zero_();
    grad_attn.zero_();
  }
  auto grad_value = grad_value_acc.scalar_type() == value.scalar_type()
                        ? grad_value_acc
                        : grad_value_acc.to(value.scalar_type());
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace stm_dist

TORCH_LIBRARY_IMPL(stm_dist, CPU, m) {
  m.impl("ms_deform_attn", &stm_dist::ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &stm_dist::ms_deform_attn_backward_cpu);
}
