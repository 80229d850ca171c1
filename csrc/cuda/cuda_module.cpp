// The module object of urda_fast._C_cuda. Importing it runs the TORCH_LIBRARY_IMPL(urda_fast, CUDA, ...) initialisers
// of csrc/cuda/*.cu; the schemas themselves come from urda_fast._C, which must be imported first.
#include <Python.h>

extern "C" {
PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
