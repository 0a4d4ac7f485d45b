// Reports how this library was built, so `stm-env` can say which kernels are present.
#include <torch/library.h>

namespace stm_dist {
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
}
