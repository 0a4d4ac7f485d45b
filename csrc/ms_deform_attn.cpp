// Schema of torch.ops.stm_dist.ms_deform_attn{,_backward} and the argument checks both device
// kernels share. The kernels live in cpu/ and cuda/; autograd and the fake (meta) kernel are
// registered from Python (stm_dist/ops/registration.py).
#include "ms_deform_attn.h"

// Only the headers used: <ATen/ATen.h> pulls every operator's declarations, a third of the
// compile time of each source that includes it.
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <torch/library.h>


namespace stm_dist {
namespace {

std::string shape_str(const at::Tensor& t) { return msg::piece(t.sizes()); }

// ref: the tensor whose dtype `t` must share (value for grad_output and the locations,
// the locations for the weights); float32 locations are also accepted next to a half-precision
// value, so that coordinates keep 24 bits when the values are bf16/fp16.
void check_float_input(const char* op, const char* name, const at::Tensor& t, int64_t dim,
                       const char* layout, const at::Tensor& value, const char* ref_name,
                       const at::Tensor& ref, bool allow_f32) {
  STM_CHECK(t.defined(), op, ": ", name, " is undefined");
  STM_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D ", layout, ", got shape ",
              shape_str(t));
  const bool half_value =
      value.scalar_type() == at::kHalf || value.scalar_type() == at::kBFloat16;
  STM_CHECK(t.scalar_type() == ref.scalar_type() ||
                (allow_f32 && half_value && t.scalar_type() == at::kFloat),
            op, ": ", name, " has dtype ", t.scalar_type(), " but ", ref_name, " has dtype ",
            ref.scalar_type(),
            " (sampling_locations and attention_weights share one dtype: value's, or float32 "
            "next to a float16/bfloat16 value; grad_output has value's)");
  STM_CHECK(t.device() == value.device(), op, ": ", name, " is on ", t.device(),
              " but value is on ", value.device());
}

}  // namespace

MsDeformGeometry check_ms_deform_inputs(const char* op, const at::Tensor& value,
                                        const at::Tensor& spatial_shapes,
                                        const at::Tensor& level_start_index,
                                        const at::Tensor& sampling_locations,
                                        const at::Tensor& attention_weights,
                                        const at::Tensor* grad_output) {
  STM_CHECK(value.defined() && value.dim() == 4, op,
              ": value must be 4-D (N, S, M, D), got shape ",
              value.defined() ? shape_str(value) : "undefined");
  STM_CHECK(at::isFloatingType(value.scalar_type()), op,
              ": value must be a floating tensor, got ", value.scalar_type());
  check_float_input(op, "sampling_locations", sampling_locations, 6, "(N, Lq, M, L, P, 2)", value,
                    "value", value, true);
  check_float_input(op, "attention_weights", attention_weights, 5, "(N, Lq, M, L, P)", value,
                    "sampling_locations", sampling_locations, false);

  MsDeformGeometry g;
  g.N = value.size(0);
  g.S = value.size(1);
  g.M = value.size(2);
  g.D = value.size(3);
  g.Lq = sampling_locations.size(1);
  g.L = sampling_locations.size(3);
  g.P = sampling_locations.size(4);

  const auto& loc = sampling_locations;
  STM_CHECK(loc.size(0) == g.N && loc.size(2) == g.M && loc.size(5) == 2, op,
              ": sampling_locations must be (N, Lq, M, L, P, 2) = (", g.N, ", Lq, ", g.M,
              ", L, P, 2) to match value ", shape_str(value), ", got ", shape_str(loc));
  STM_CHECK(attention_weights.sizes() == loc.sizes().slice(0, 5), op,
              ": attention_weights must be (N, Lq, M, L, P) = ", loc.sizes().slice(0, 5),
              " to match sampling_locations, got ", shape_str(attention_weights));
  if (grad_output != nullptr) {
    check_float_input(op, "grad_output", *grad_output, 3, "(N, Lq, M*D)", value, "value", value,
                      false);
    STM_CHECK(grad_output->size(0) == g.N && grad_output->size(1) == g.Lq &&
                    grad_output->size(2) == g.M * g.D,
                op, ": grad_output must be (N, Lq, M*D) = (", g.N, ", ", g.Lq, ", ", g.M * g.D,
                "), got ", shape_str(*grad_output));
  }

  STM_CHECK(spatial_shapes.defined() && spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              op, ": spatial_shapes must be (L, 2) rows of (H, W), got shape ",
              spatial_shapes.defined() ? shape_str(spatial_shapes) : "undefined");
  STM_CHECK(!at::isFloatingType(spatial_shapes.scalar_type()) &&
                  spatial_shapes.scalar_type() != at::kBool,
              op, ": spatial_shapes must be an integer tensor, got ", spatial_shapes.scalar_type());
  STM_CHECK(spatial_shapes.size(0) == g.L, op, ": spatial_shapes has ", spatial_shapes.size(0),
              " levels but sampling_locations has L = ", g.L);
  STM_CHECK(level_start_index.defined() && level_start_index.dim() == 1 &&
                  level_start_index.size(0) == g.L,
              op, ": level_start_index must be (L,) = (", g.L, ",), got shape ",
              level_start_index.defined() ? shape_str(level_start_index) : "undefined");
  STM_CHECK(!at::isFloatingType(level_start_index.scalar_type()) &&
                  level_start_index.scalar_type() != at::kBool,
              op, ": level_start_index must be an integer tensor, got ",
              level_start_index.scalar_type());
  STM_CHECK(g.L >= 1 && g.L <= MsDeformGeometry::kMaxLevels, op, ": ", g.L,
              " levels given; between 1 and ", MsDeformGeometry::kMaxLevels, " are supported");

  // The level table is tiny; reading it costs a device sync when it lives on the GPU, which is
  // why callers are told to keep it on the CPU.
  const auto shapes = spatial_shapes.to(at::kCPU, at::kLong).contiguous();
  const auto starts = level_start_index.to(at::kCPU, at::kLong).contiguous();
  const int64_t* sh = shapes.data_ptr<int64_t>();
  const int64_t* st = starts.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t h = sh[2 * l], w = sh[2 * l + 1];
    STM_CHECK(h > 0 && w > 0, op, ": spatial_shapes[", l, "] = (", h, ", ", w,
                ") must be positive");
    STM_CHECK(st[l] == total, op, ": level_start_index[", l, "] = ", st[l],
                " but the sizes in spatial_shapes put level ", l, " at ", total);
    g.H.push_back(h);
    g.W.push_back(w);
    g.start.push_back(total);
    total += h * w;
  }
  STM_CHECK(total == g.S, op, ": spatial_shapes give sum(H*W) = ", total,
              " positions but value has S = ", g.S, " (value shape ", shape_str(value), ")");
  return g;
}

}  // namespace stm_dist

namespace stm_dist {
// Reports how this library was built, so `stm-env` can say which kernels are present. (Here
// rather than in a source of its own: every source that registers operators includes
// torch/library.h, ~13 s of compile time each.)
static bool built_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace stm_dist

TORCH_LIBRARY_FRAGMENT(stm_dist, m) {
  m.def("built_with_cuda() -> bool", &stm_dist::built_with_cuda);
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention_weights) "
      "-> (Tensor, Tensor, Tensor)");
}
