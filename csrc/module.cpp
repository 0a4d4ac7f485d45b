// Python module entry for stm_dist._C. The operators themselves are registered with the
// dispatcher through TORCH_LIBRARY blocks in the other sources; importing this module only has to
// load the shared library so that those static registrations run.
#include <Python.h>

static struct PyModuleDef stm_dist_c_module = {
    PyModuleDef_HEAD_INIT, "_C",
    "Compiled operators of stm_dist (registered under torch.ops.stm_dist)", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&stm_dist_c_module); }
