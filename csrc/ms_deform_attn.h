// Shared declarations of the multi-scale deformable sampling operator (spec section 5).
//
// Layouts (all row-major, made contiguous by the kernels):
//   value               (N, S, M, D)         S = sum_l H_l * W_l
//   spatial_shapes      (L, 2) int64          (H_l, W_l)
//   level_start_index   (L,)   int64          exclusive prefix sum of H_l * W_l
//   sampling_locations  (N, Lq, M, L, P, 2)   normalised (x, y); 0 and 1 are the outer pixel edges
//   attention_weights   (N, Lq, M, L, P)
//   output              (N, Lq, M * D)
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace stm_dist {

// Sizes of one call, validated, with the level table read to the host. CUDA kernels receive the
// level table by value, so the number of levels is bounded.
struct MsDeformGeometry {
  static constexpr int kMaxLevels = 16;
  int64_t N, S, M, D, Lq, L, P;
  std::vector<int64_t> H, W, start;
};

// Validates the five inputs (and grad_output when given) and returns the geometry. Every error
// names the argument at fault. `op` is the name used in messages.
MsDeformGeometry check_ms_deform_inputs(const char* op, const at::Tensor& value,
                                        const at::Tensor& spatial_shapes,
                                        const at::Tensor& level_start_index,
                                        const at::Tensor& sampling_locations,
                                        const at::Tensor& attention_weights,
                                        const at::Tensor* grad_output = nullptr);

}  // namespace stm_dist
