// CUDA kernels of ms_deform_attn: forward and backward for float32, float16 and bfloat16, any
// batch size (no im2col step).
//
// Thread mapping (as in DCNv4): one thread owns K consecutive channels of one (n, q, m) row,
// K = 16 bytes / sizeof(T) when the head width and pointers allow 16-byte vector loads, else 1.
// The G = D / K threads of a row sit in consecutive lanes and compute the same bilinear
// footprint, so weights are shared without shared memory. Arithmetic is in float.
// Sampling locations and attention weights come in value's dtype or, next to a half type, in
// float32 (what autocast hands them; stm_dist/ops/registration.py).
// Backward: the value gradient is scattered with float atomics (into a float buffer for the
// half types, vector atomics on sm_90); the per-sample channel sums for the location and
// attention gradients are reduced across a row's lanes with shuffles when G is a power of two
// up to 32, otherwise with float atomics. Atomics make the sums' order vary: the backward
// refuses to run under torch.use_deterministic_algorithms(True).
#include "ms_deform_attn.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>

namespace stm_dist {
namespace {

constexpr int kThreads = 256;

struct Levels {
  int L;
  int H[MsDeformGeometry::kMaxLevels];
  int W[MsDeformGeometry::kMaxLevels];
  int64_t start[MsDeformGeometry::kMaxLevels];
};

template <typename T, int K>
struct alignas(sizeof(T) * K) Pack {
  T v[K];
};

struct Footprint {
  int idx[4];  // pixel offsets inside the level, -1 for neighbours outside the map
  float w[4];
  float lh, lw;
};

// Mirrors footprint() of the CPU kernel; false when the sample misses the map entirely.
__device__ __forceinline__ bool footprint(float x, float y, int H, int W, Footprint& f) {
  const float h = y * H - 0.5f, w = x * W - 0.5f;
  if (!(h > -1.f && w > -1.f && h < H && w < W)) return false;
  const float hf = floorf(h), wf = floorf(w);
  const int h0 = static_cast<int>(hf), w0 = static_cast<int>(wf), h1 = h0 + 1, w1 = w0 + 1;
  f.lh = h - hf;
  f.lw = w - wf;
  const float hh = 1.f - f.lh, hw = 1.f - f.lw;
  const bool top = h0 >= 0, bottom = h1 <= H - 1, left = w0 >= 0, right = w1 <= W - 1;
  f.idx[0] = (top && left) ? h0 * W + w0 : -1;
  f.idx[1] = (top && right) ? h0 * W + w1 : -1;
  f.idx[2] = (bottom && left) ? h1 * W + w0 : -1;
  f.idx[3] = (bottom && right) ? h1 * W + w1 : -1;
  f.w[0] = f.idx[0] >= 0 ? hh * hw : 0.f;
  f.w[1] = f.idx[1] >= 0 ? hh * f.lw : 0.f;
  f.w[2] = f.idx[2] >= 0 ? f.lh * hw : 0.f;
  f.w[3] = f.idx[3] >= 0 ? f.lh * f.lw : 0.f;
  return true;
}

template <typename T, int K>
__device__ __forceinline__ void load(const T* p, float (&x)[K]) {
  const Pack<T, K> pk = *reinterpret_cast<const Pack<T, K>*>(p);
#pragma unroll
  for (int j = 0; j < K; ++j) x[j] = static_cast<float>(pk.v[j]);
}

template <int K>
__device__ __forceinline__ void atomic_add(float* p, const float (&x)[K]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (K % 4 == 0) {
#pragma unroll
    for (int j = 0; j < K; j += 4)
      atomicAdd(reinterpret_cast<float4*>(p + j), make_float4(x[j], x[j + 1], x[j + 2], x[j + 3]));
  } else
#endif
  {
#pragma unroll
    for (int j = 0; j < K; ++j) atomicAdd(p + j, x[j]);
  }
}

// T: value / output type; Geo: sampling locations and attention weights (T, or float next to a
// half type so that coordinates keep 24 bits).
template <typename T, typename Geo, int K>
__global__ void __launch_bounds__(kThreads)
    forward_kernel(const T* __restrict__ value, const Geo* __restrict__ loc,
                   const Geo* __restrict__ attn, T* __restrict__ out, const Levels lv,
                   const int64_t rows, const int64_t S, const int Lq, const int M, const int D,
                   const int P) {
  const int G = D / K;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows * G) return;
  const int cg = static_cast<int>(t % G);
  const int64_t i = t / G;  // (n * Lq + q) * M + m
  const int m = static_cast<int>(i % M);
  const int64_t n = i / (static_cast<int64_t>(Lq) * M);
  const int LP = lv.L * P;
  const int64_t pix = static_cast<int64_t>(M) * D;
  const Geo* li = loc + i * LP * 2;
  const Geo* ai = attn + i * LP;
  float acc[K];
#pragma unroll
  for (int j = 0; j < K; ++j) acc[j] = 0.f;
  for (int l = 0; l < lv.L; ++l) {
    const T* base = value + ((n * S + lv.start[l]) * M + m) * D + cg * K;
    for (int p = 0; p < P; ++p) {
      const int lp = l * P + p;
      Footprint f;
      if (!footprint(static_cast<float>(li[2 * lp]), static_cast<float>(li[2 * lp + 1]), lv.H[l],
                     lv.W[l], f))
        continue;
      const float a = static_cast<float>(ai[lp]);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (f.idx[k] < 0) continue;
        float x[K];
        load<T, K>(base + f.idx[k] * pix, x);
        const float c = a * f.w[k];
#pragma unroll
        for (int j = 0; j < K; ++j) acc[j] = fmaf(c, x[j], acc[j]);
      }
    }
  }
  Pack<T, K> o;
#pragma unroll
  for (int j = 0; j < K; ++j) o.v[j] = static_cast<T>(acc[j]);
  *reinterpret_cast<Pack<T, K>*>(out + i * D + cg * K) = o;
}

template <typename T, typename Geo, int K, bool kShuffle>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const T* __restrict__ grad_out, const T* __restrict__ value,
                    const Geo* __restrict__ loc, const Geo* __restrict__ attn,
                    float* __restrict__ grad_value, float* __restrict__ grad_loc,
                    float* __restrict__ grad_attn, const Levels lv, const int64_t rows,
                    const int64_t S, const int Lq, const int M, const int D, const int P) {
  const int G = D / K;
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= rows * G) return;  // whole rows leave together: rows * G is a multiple of G
  const int cg = static_cast<int>(t % G);
  const int64_t i = t / G;
  const int m = static_cast<int>(i % M);
  const int64_t n = i / (static_cast<int64_t>(Lq) * M);
  const int LP = lv.L * P;
  const int64_t pix = static_cast<int64_t>(M) * D;
  const Geo* li = loc + i * LP * 2;
  const Geo* ai = attn + i * LP;
  // The lanes of this row; G divides 32 on the shuffle path and rows start at multiples of G.
  const unsigned lane = threadIdx.x & 31u;
  const unsigned mask =
      G >= 32 ? 0xffffffffu : (((1u << G) - 1u) << (lane & ~static_cast<unsigned>(G - 1)));
  float tg[K];
  load<T, K>(grad_out + i * D + cg * K, tg);
  for (int l = 0; l < lv.L; ++l) {
    const int64_t off = ((n * S + lv.start[l]) * M + m) * D + cg * K;
    for (int p = 0; p < P; ++p) {
      const int lp = l * P + p;
      Footprint f;
      if (!footprint(static_cast<float>(li[2 * lp]), static_cast<float>(li[2 * lp + 1]), lv.H[l],
                     lv.W[l], f))
        continue;  // same for every lane of the row
      const float a = static_cast<float>(ai[lp]);
      float x[4][K];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (f.idx[k] >= 0) {
          load<T, K>(value + off + f.idx[k] * pix, x[k]);
        } else {
#pragma unroll
          for (int j = 0; j < K; ++j) x[k][j] = 0.f;
        }
      }
      const float hh = 1.f - f.lh, hw = 1.f - f.lw;
      float sv = 0.f, sh = 0.f, sw = 0.f;
#pragma unroll
      for (int j = 0; j < K; ++j) {
        sv += tg[j] * (f.w[0] * x[0][j] + f.w[1] * x[1][j] + f.w[2] * x[2][j] + f.w[3] * x[3][j]);
        sh += tg[j] * (hw * (x[2][j] - x[0][j]) + f.lw * (x[3][j] - x[1][j]));
        sw += tg[j] * (hh * (x[1][j] - x[0][j]) + f.lh * (x[3][j] - x[2][j]));
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if (f.idx[k] < 0) continue;
        const float c = a * f.w[k];
        float gv[K];
#pragma unroll
        for (int j = 0; j < K; ++j) gv[j] = c * tg[j];
        atomic_add<K>(grad_value + off + f.idx[k] * pix, gv);
      }
      const int64_t o = i * LP + lp;
      if constexpr (kShuffle) {
        for (int s = G / 2; s > 0; s >>= 1) {
          sv += __shfl_xor_sync(mask, sv, s, G);
          sh += __shfl_xor_sync(mask, sh, s, G);
          sw += __shfl_xor_sync(mask, sw, s, G);
        }
        if (cg == 0) {
          grad_attn[o] = sv;
          grad_loc[2 * o] = a * sw * lv.W[l];
          grad_loc[2 * o + 1] = a * sh * lv.H[l];
        }
      } else {
        atomicAdd(grad_attn + o, sv);
        atomicAdd(grad_loc + 2 * o, a * sw * lv.W[l]);
        atomicAdd(grad_loc + 2 * o + 1, a * sh * lv.H[l]);
      }
    }
  }
}

Levels make_levels(const MsDeformGeometry& g) {
  Levels lv{};
  lv.L = static_cast<int>(g.L);
  for (int64_t l = 0; l < g.L; ++l) {
    lv.H[l] = static_cast<int>(g.H[l]);
    lv.W[l] = static_cast<int>(g.W[l]);
    lv.start[l] = g.start[l];
  }
  return lv;
}

void check_cuda_inputs(const char* op, const MsDeformGeometry& g, const at::Tensor& value) {
  const auto t = value.scalar_type();
  STM_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16, op, " (CUDA): value dtype ",
              t, " is not supported; use float32, float16 or bfloat16");
  STM_CHECK(g.Lq <= INT32_MAX && g.M * g.D <= INT32_MAX && g.L * g.P <= INT32_MAX, op,
              " (CUDA): sizes too large (Lq, M*D and L*P must fit in 32 bits)");
  for (int64_t l = 0; l < g.L; ++l)
    STM_CHECK(g.H[l] * g.W[l] <= INT32_MAX, op, " (CUDA): level ", l, " has more than 2^31 pixels");
}

// Calls f(T{}, Geo{}) for the dtypes of value and of the locations / weights (already validated
// by check_ms_deform_inputs: the same, or float next to a half type).
template <typename F>
void dispatch_dtype(at::ScalarType t, at::ScalarType geo, F&& f) {
  const bool f32_geo = geo == at::kFloat;
  switch (t) {
    case at::kFloat: return f(float{}, float{});
    case at::kHalf: return f32_geo ? f(at::Half{}, float{}) : f(at::Half{}, at::Half{});
    case at::kBFloat16:
      return f32_geo ? f(at::BFloat16{}, float{}) : f(at::BFloat16{}, at::BFloat16{});
    default: STM_CHECK(false, "ms_deform_attn (CUDA): unsupported dtype ", t);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Channels per thread: a 16-byte vector when every row starts 16-byte aligned, else one.
template <typename T>
int pick_k(int64_t D, std::initializer_list<const void*> ptrs) {
  constexpr int kv = 16 / sizeof(T);
  if (D % kv != 0) return 1;
  for (const void* p : ptrs)
    if (!aligned16(p)) return 1;
  return kv;
}

unsigned blocks_for(int64_t threads) {
  return static_cast<unsigned>((threads + kThreads - 1) / kThreads);
}

at::Tensor ms_deform_attn_cuda(const at::Tensor& value_in, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& loc_in,
                               const at::Tensor& attn_in) {
  const auto g = check_ms_deform_inputs("ms_deform_attn", value_in, spatial_shapes,
                                        level_start_index, loc_in, attn_in);
  check_cuda_inputs("ms_deform_attn", g, value_in);
  const c10::cuda::CUDAGuard guard(value_in.device());
  const auto value = value_in.contiguous();
  const auto loc = loc_in.contiguous();
  const auto attn = attn_in.contiguous();
  auto out = at::empty({g.N, g.Lq, g.M * g.D}, value.options());
  const int64_t rows = g.N * g.Lq * g.M;
  if (rows == 0 || g.D == 0) return out.zero_();
  const Levels lv = make_levels(g);
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_dtype(value.scalar_type(), loc.scalar_type(), [&](auto tag, auto geo_tag) {
    using T = decltype(tag);
    using Geo = decltype(geo_tag);
    const T* v = value.const_data_ptr<T>();
    T* o = out.mutable_data_ptr<T>();
    const int K = pick_k<T>(g.D, {v, o});
    const int64_t threads = rows * (g.D / K);
    auto launch = [&](auto kernel) {
      kernel<<<blocks_for(threads), kThreads, 0, stream>>>(
          v, loc.const_data_ptr<Geo>(), attn.const_data_ptr<Geo>(), o, lv, rows, g.S,
          static_cast<int>(g.Lq), static_cast<int>(g.M), static_cast<int>(g.D),
          static_cast<int>(g.P));
    };
    if (K == 1)
      launch(forward_kernel<T, Geo, 1>);
    else
      launch(forward_kernel<T, Geo, 16 / sizeof(T)>);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& value_in, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& loc_in, const at::Tensor& attn_in) {
  const auto g = check_ms_deform_inputs("ms_deform_attn_backward", value_in, spatial_shapes,
                                        level_start_index, loc_in, attn_in, &grad_in);
  check_cuda_inputs("ms_deform_attn_backward", g, value_in);
  // The value gradient (and, for some head widths, the location / weight gradients) are summed
  // with float atomics, whose order varies from run to run: under
  // torch.use_deterministic_algorithms(True) this raises (a warning with warn_only=True).
  at::globalContext().alertNotDeterministic("ms_deform_attn_backward (CUDA)");
  const c10::cuda::CUDAGuard guard(value_in.device());
  const auto value = value_in.contiguous();
  const auto loc = loc_in.contiguous();
  const auto attn = attn_in.contiguous();
  const auto grad = grad_in.contiguous();
  const auto f32 = value.options().dtype(at::kFloat);
  auto grad_value = at::zeros(value.sizes(), f32);
  auto grad_loc = at::zeros(loc.sizes(), f32);
  auto grad_attn = at::zeros(attn.sizes(), f32);
  const int64_t rows = g.N * g.Lq * g.M;
  if (rows > 0 && g.D > 0) {
    const Levels lv = make_levels(g);
    const auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_dtype(value.scalar_type(), loc.scalar_type(), [&](auto tag, auto geo_tag) {
      using T = decltype(tag);
      using Geo = decltype(geo_tag);
      const T* v = value.const_data_ptr<T>();
      const T* go = grad.const_data_ptr<T>();
      const int K = pick_k<T>(g.D, {v, go});
      const int G = static_cast<int>(g.D / K);
      const bool shuffle = G <= 32 && (G & (G - 1)) == 0;
      const int64_t threads = rows * G;
      auto launch = [&](auto kernel) {
        kernel<<<blocks_for(threads), kThreads, 0, stream>>>(
            go, v, loc.const_data_ptr<Geo>(), attn.const_data_ptr<Geo>(),
            grad_value.mutable_data_ptr<float>(), grad_loc.mutable_data_ptr<float>(),
            grad_attn.mutable_data_ptr<float>(), lv, rows, g.S, static_cast<int>(g.Lq),
            static_cast<int>(g.M), static_cast<int>(g.D), static_cast<int>(g.P));
      };
      constexpr int kv = 16 / sizeof(T);
      if (K == 1)
        shuffle ? launch(backward_kernel<T, Geo, 1, true>) : launch(backward_kernel<T, Geo, 1, false>);
      else
        shuffle ? launch(backward_kernel<T, Geo, kv, true>) : launch(backward_kernel<T, Geo, kv, false>);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  // Each gradient in the dtype of its input (float32 buffers need no cast).
  const auto dt = value.scalar_type(), geo = loc.scalar_type();
  return {dt == at::kFloat ? grad_value : grad_value.to(dt),
          geo == at::kFloat ? grad_loc : grad_loc.to(geo),
          geo == at::kFloat ? grad_attn : grad_attn.to(geo)};
}

}  // namespace
}  // namespace stm_dist

TORCH_LIBRARY_IMPL(stm_dist, CUDA, m) {
  m.impl("ms_deform_attn", &stm_dist::ms_deform_attn_cuda);
  m.impl("ms_deform_attn_backward", &stm_dist::ms_deform_attn_backward_cuda);
}
