// CPU kernels of ms_deform_attn: forward and backward for float32, float64, bfloat16 and
// float16 values; for the half types the locations and weights may be float32 (what autocast
// hands them, see stm_dist/ops/registration.py).
//
// Forward parallelises over (n, q, m) rows; backward over (n, m) pairs so that every task owns a
// disjoint slice value[n, :, m, :] of the value gradient: no atomics, and the result does not
// depend on the thread count. Arithmetic is in float (double for float64).
// The hot loops are compiled for AVX2+FMA and for the baseline ISA, chosen at run time.
#include "ms_deform_attn.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

// A row of kD accumulators: a fixed array when the width is a compile-time constant (the
// compiler keeps it in registers across the sample loop), a vector otherwise.
template <typename T, int64_t kD>
struct Row {
  T buf[kD];
  explicit Row(int64_t) {}
  T* data() { return buf; }
};
template <typename T>
struct Row<T, kRuntimeD> {
  std::vector<T> buf;
  explicit Row(int64_t D) : buf(D) {}
  T* data() { return buf.data(); }
};

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

// scalar_t: value / output type; geo_t: sampling locations and attention weights (the same, or
// float next to a half-precision value, so that coordinates keep 24 bits).
template <typename scalar_t, typename geo_t, int64_t kD>
void forward_rows(const MsDeformGeometry& g, const scalar_t* value, const geo_t* loc,
                  const geo_t* attn, scalar_t* out, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = kD == kRuntimeD ? g.D : kD, M = g.M, LP = g.L * g.P, pix = M * D;
  Row<acc_t, kD> row(D);
  acc_t* acc = row.data();
  const std::vector<scalar_t> zero(D, scalar_t(0));
  // Rows in (n, q, m) order: the heads of one pixel are adjacent in value (N, S, M, D), so the
  // M rows sampled around one query share cache lines and prefetches. Tried on the 2-core box
  // and dropped: (n, m, q) order (~25% slower) and computing a chunk of footprints before their
  // gathers (the gather loop then stopped vectorising).
  for (int64_t i = begin; i < end; ++i) {  // i = (n * Lq + q) * M + m
    const int64_t m = i % M, n = i / (g.Lq * M);
    for (int64_t c = 0; c < D; ++c) acc[c] = acc_t(0);
    const geo_t* li = loc + i * LP * 2;
    const geo_t* ai = attn + i * LP;
    for (int64_t l = 0; l < g.L; ++l) {
      const scalar_t* base = value + ((n * g.S + g.start[l]) * M + m) * D;
      for (int64_t p = 0; p < g.P; ++p) {
        const int64_t lp = l * g.P + p;
        Footprint<acc_t> f;
        if (!footprint<acc_t>(static_cast<acc_t>(li[2 * lp]), static_cast<acc_t>(li[2 * lp + 1]),
                              g.H[l], g.W[l], f))
          continue;
        const acc_t a = static_cast<acc_t>(ai[lp]);
        const acc_t coef[4] = {a * f.w[0], a * f.w[1], a * f.w[2], a * f.w[3]};
        const scalar_t* v[4];
        for (int k = 0; k < 4; ++k) v[k] = f.idx[k] >= 0 ? base + f.idx[k] * pix : zero.data();
        gather4<kD>(acc, v[0], v[1], v[2], v[3], coef, D);
      }
    }
    scalar_t* o = out + i * D;
    for (int64_t c = 0; c < D; ++c) o[c] = static_cast<scalar_t>(acc[c]);
  }
}

// One sample's backward over the D channels of its head: scatters the value gradient into the
// four neighbour rows and returns the channel dot products d[k] = sum_c grad[c] * v_k[c], from
// which the attention-weight and location gradients follow.
template <int64_t kD, typename scalar_t, typename acc_t>
inline void scatter4(const acc_t* __restrict tg, const scalar_t* __restrict v0,
                     const scalar_t* __restrict v1, const scalar_t* __restrict v2,
                     const scalar_t* __restrict v3, acc_t* __restrict g0, acc_t* __restrict g1,
                     acc_t* __restrict g2, acc_t* __restrict g3, const Footprint<acc_t>& f,
                     acc_t a, int64_t D_, acc_t (&d)[4]) {
  const int64_t D = kD == kRuntimeD ? D_ : kD;
  const acc_t a0 = a * f.w[0], a1 = a * f.w[1], a2 = a * f.w[2], a3 = a * f.w[3];
  acc_t d0 = 0, d1 = 0, d2 = 0, d3 = 0;
  // Reassociating the channel sums is what lets this loop vectorise.
#pragma omp simd reduction(+ : d0, d1, d2, d3)
  for (int64_t c = 0; c < D; ++c) {
    const acc_t t = tg[c];
    d0 += t * static_cast<acc_t>(v0[c]);
    d1 += t * static_cast<acc_t>(v1[c]);
    d2 += t * static_cast<acc_t>(v2[c]);
    d3 += t * static_cast<acc_t>(v3[c]);
    g0[c] += a0 * t;
    g1[c] += a1 * t;
    g2[c] += a2 * t;
    g3[c] += a3 * t;
  }
  d[0] = d0;
  d[1] = d1;
  d[2] = d2;
  d[3] = d3;
}

// Backward for the (n, m) pairs [begin, end). The value gradient of one pair is accumulated in a
// compact (S + 1) x D buffer in acc_t (the last row takes the gradient of missing neighbours and
// is dropped), then written once, converted, into grad_value[n, :, m, :]: each pair has exactly
// one writer, so the result does not depend on how pairs are split across threads.
template <typename scalar_t, typename geo_t, int64_t kD>
void backward_pairs(const MsDeformGeometry& g, const scalar_t* grad_out, const scalar_t* value,
                    const geo_t* loc, const geo_t* attn, scalar_t* grad_value, geo_t* grad_loc,
                    geo_t* grad_attn, int64_t begin, int64_t end) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = kD == kRuntimeD ? g.D : kD, M = g.M, LP = g.L * g.P, pix = M * D;
  Row<acc_t, kD> tg_row(D);
  acc_t* tg = tg_row.data();
  const std::vector<scalar_t> zero(D, scalar_t(0));
  std::vector<acc_t> gbuf((g.S + 1) * D);
  acc_t* sink = gbuf.data() + g.S * D;
  for (int64_t nm = begin; nm < end; ++nm) {
    const int64_t n = nm / M, m = nm % M;
    std::fill(gbuf.begin(), gbuf.end(), acc_t(0));
    for (int64_t q = 0; q < g.Lq; ++q) {
      const int64_t i = (n * g.Lq + q) * M + m;
      const scalar_t* go = grad_out + i * D;
      for (int64_t c = 0; c < D; ++c) tg[c] = static_cast<acc_t>(go[c]);
      const geo_t* li = loc + i * LP * 2;
      const geo_t* ai = attn + i * LP;
      geo_t* gli = grad_loc + i * LP * 2;
      geo_t* gai = grad_attn + i * LP;
      for (int64_t l = 0; l < g.L; ++l) {
        const scalar_t* base = value + ((n * g.S + g.start[l]) * M + m) * D;
        acc_t* gbase = gbuf.data() + g.start[l] * D;
        for (int64_t p = 0; p < g.P; ++p) {
          const int64_t lp = l * g.P + p;
          Footprint<acc_t> f;
          if (!footprint<acc_t>(static_cast<acc_t>(li[2 * lp]), static_cast<acc_t>(li[2 * lp + 1]),
                                g.H[l], g.W[l], f)) {
            gli[2 * lp] = gli[2 * lp + 1] = gai[lp] = geo_t(0);
            continue;
          }
          const acc_t a = static_cast<acc_t>(ai[lp]);
          const scalar_t* v[4];
          acc_t* gv[4];
          for (int k = 0; k < 4; ++k) {
            const bool in = f.idx[k] >= 0;
            v[k] = in ? base + f.idx[k] * pix : zero.data();
            gv[k] = in ? gbase + f.idx[k] * D : sink;
          }
          acc_t d[4];
          scatter4<kD>(tg, v[0], v[1], v[2], v[3], gv[0], gv[1], gv[2], gv[3], f, a, D, d);
          const acc_t lh = f.lh, lw = f.lw, hh = acc_t(1) - lh, hw = acc_t(1) - lw;
          // Missing neighbours have weight 0 and a zero row (d = 0), as in the forward.
          gai[lp] = static_cast<geo_t>(f.w[0] * d[0] + f.w[1] * d[1] + f.w[2] * d[2] + f.w[3] * d[3]);
          const acc_t s_dw = hh * (d[1] - d[0]) + lh * (d[3] - d[2]);
          const acc_t s_dh = hw * (d[2] - d[0]) + lw * (d[3] - d[1]);
          gli[2 * lp] = static_cast<geo_t>(a * s_dw * static_cast<acc_t>(g.W[l]));
          gli[2 * lp + 1] = static_cast<geo_t>(a * s_dh * static_cast<acc_t>(g.H[l]));
        }
      }
    }
    for (int64_t s = 0; s < g.S; ++s) {
      scalar_t* out = grad_value + ((n * g.S + s) * M + m) * D;
      const acc_t* src = gbuf.data() + s * D;
      for (int64_t c = 0; c < D; ++c) out[c] = static_cast<scalar_t>(src[c]);
    }
  }
}

// Non-template entry points, one per (value dtype, location dtype) and ISA, overloaded on the
// pointer types so that the dispatch below can call them from a generic lambda.
#define STM_ENTRY(T, G, ATTR, SUFFIX)                                                           \
  ATTR void forward_##SUFFIX(const MsDeformGeometry& g, const T* v, const G* l, const G* a,     \
                             T* o, int64_t b, int64_t e) {                                     \
    if (g.D == 16) return forward_rows<T, G, 16>(g, v, l, a, o, b, e);                         \
    if (g.D == 32) return forward_rows<T, G, 32>(g, v, l, a, o, b, e);                         \
    forward_rows<T, G, kRuntimeD>(g, v, l, a, o, b, e);                                        \
  }                                                                                            \
  ATTR void backward_##SUFFIX(const MsDeformGeometry& g, const T* go, const T* v, const G* l,  \
                              const G* a, T* gv, G* gl, G* ga, int64_t b, int64_t e) {         \
    if (g.D == 16) return backward_pairs<T, G, 16>(g, go, v, l, a, gv, gl, ga, b, e);          \
    if (g.D == 32) return backward_pairs<T, G, 32>(g, go, v, l, a, gv, gl, ga, b, e);          \
    backward_pairs<T, G, kRuntimeD>(g, go, v, l, a, gv, gl, ga, b, e);                         \
  }
#define STM_INSTANTIATE(T, G, NAME)                                                            \
  STM_ENTRY(T, G, STM_AVX2, NAME##_avx2)                                                       \
  STM_ENTRY(T, G, STM_BASE, NAME##_base)                                                       \
  void forward_dispatch(const MsDeformGeometry& g, const T* v, const G* l, const G* a, T* o,   \
                        int64_t b, int64_t e) {                                                \
    cpu_has_avx2() ? forward_##NAME##_avx2(g, v, l, a, o, b, e)                                \
                   : forward_##NAME##_base(g, v, l, a, o, b, e);                               \
  }                                                                                            \
  void backward_dispatch(const MsDeformGeometry& g, const T* go, const T* v, const G* l,       \
                         const G* a, T* gv, G* gl, G* ga, int64_t b, int64_t e) {              \
    cpu_has_avx2() ? backward_##NAME##_avx2(g, go, v, l, a, gv, gl, ga, b, e)                  \
                   : backward_##NAME##_base(g, go, v, l, a, gv, gl, ga, b, e);                 \
  }
STM_INSTANTIATE(float, float, f32)
STM_INSTANTIATE(double, double, f64)
STM_INSTANTIATE(c10::BFloat16, c10::BFloat16, bf16)
STM_INSTANTIATE(c10::BFloat16, float, bf16_f32)
STM_INSTANTIATE(c10::Half, c10::Half, f16)
STM_INSTANTIATE(c10::Half, float, f16_f32)
#undef STM_INSTANTIATE
#undef STM_ENTRY

// Calls f(scalar_t{}, geo_t{}) for the dtypes of value and of the locations / weights (already
// validated by check_ms_deform_inputs: the same, or float next to a half type).
template <typename F>
void dispatch_cpu(const at::Tensor& value, const at::Tensor& loc, F&& f) {
  const bool f32_geo = loc.scalar_type() == at::kFloat;
  switch (value.scalar_type()) {
    case at::kFloat: return f(float{}, float{});
    case at::kDouble: return f(double{}, double{});
    case at::kBFloat16: return f32_geo ? f(c10::BFloat16{}, float{}) : f(c10::BFloat16{}, c10::BFloat16{});
    case at::kHalf: return f32_geo ? f(c10::Half{}, float{}) : f(c10::Half{}, c10::Half{});
    default: STM_CHECK(false, "ms_deform_attn (CPU): unsupported dtype ", value.scalar_type());
  }
}

void check_cpu_dtype(const at::Tensor& value) {
  const auto t = value.scalar_type();
  STM_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
            "ms_deform_attn (CPU): value dtype ", t,
            " is not supported; use float32, float64, bfloat16 or float16");
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
  dispatch_cpu(value, loc, [&](auto vtag, auto gtag) {
    using T = decltype(vtag);
    using G = decltype(gtag);
    const T* v = value.const_data_ptr<T>();
    const G* l = loc.const_data_ptr<G>();
    const G* a = attn.const_data_ptr<G>();
    T* o = out.mutable_data_ptr<T>();
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
  auto grad_value = at::empty(value.sizes(), value.options());
  auto grad_loc = at::empty(loc.sizes(), loc.options());
  auto grad_attn = at::empty(attn.sizes(), attn.options());
  const int64_t pairs = g.N * g.M;
  if (pairs == 0 || g.Lq == 0 || g.D == 0) {
    grad_value.zero_();
    grad_loc.zero_();
    grad_attn.zero_();
    return {grad_value, grad_loc, grad_attn};
  }
  dispatch_cpu(value, loc, [&](auto vtag, auto gtag) {
    using T = decltype(vtag);
    using G = decltype(gtag);
    const T* go = grad.const_data_ptr<T>();
    const T* v = value.const_data_ptr<T>();
    const G* l = loc.const_data_ptr<G>();
    const G* a = attn.const_data_ptr<G>();
    T* gv = grad_value.mutable_data_ptr<T>();
    G* gl = grad_loc.mutable_data_ptr<G>();
    G* ga = grad_attn.mutable_data_ptr<G>();
    at::parallel_for(0, pairs, 1, [&](int64_t b, int64_t e) {
      backward_dispatch(g, go, v, l, a, gv, gl, ga, b, e);
    });
  });
  return {grad_value, grad_loc, grad_attn};
}

}  // namespace
}  // namespace stm_dist

TORCH_LIBRARY_IMPL(stm_dist, CPU, m) {
  m.impl("ms_deform_attn", &stm_dist::ms_deform_attn_cpu);
  m.impl("ms_deform_attn_backward", &stm_dist::ms_deform_attn_backward_cpu);
}
