// Shared declarations of the multi-scale deformable sampling operator (spec section 5).
//
// Layouts (all row-major, made contiguous by the kernels):
//   value               (N, S, M, D)         S = sum_l H_l * W_l
//   spatial_shapes      (L, 2) int64          (H_l, W_l)
//   level_start_index   (L,)   int64          exclusive prefix sum of H_l * W_l
//   sampling_locations  (N, Lq, M, L, P, 2)   normalised (x, y); 0 and 1 are the outer pixel edges;
//                                            value's dtype, or float32 next to a bf16/fp16 value
//   attention_weights   (N, Lq, M, L, P)      the dtype of sampling_locations
//   output              (N, Lq, M * D)
#pragma once

#include <ATen/core/Tensor.h>

#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>
#include <type_traits>
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

// Error messages are assembled from std::string pieces and handed to TORCH_CHECK as one string,
// never through std::ostringstream (which a multi-argument TORCH_CHECK instantiates in this
// library): on the lent H100 image (gcc 13.3, torch 2.11) an extension that formatted a message
// with a stream crashed the process instead of raising the error.
namespace msg {
inline std::string piece(const char* s) { return s; }
inline std::string piece(const std::string& s) { return s; }
inline std::string piece(c10::ScalarType t) { return c10::toString(t); }
inline std::string piece(const c10::Device& d) { return d.str(); }
inline std::string piece(c10::IntArrayRef a) {
  std::string out = "[";
  for (size_t i = 0; i < a.size(); ++i) out += (i ? ", " : "") + std::to_string(a[i]);
  return out + "]";
}
template <typename T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
inline std::string piece(T v) {
  return std::to_string(v);
}
template <typename... Args>
std::string cat(const Args&... args) {
  std::string out;
  ((out += piece(args)), ...);
  return out;
}
}  // namespace msg

}  // namespace stm_dist

// TORCH_CHECK with a message built by stm_dist::msg::cat (see above).
#define STM_CHECK(cond, ...) TORCH_CHECK((cond), ::stm_dist::msg::cat(__VA_ARGS__))
