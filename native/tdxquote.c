/* Placeholder until the parser lands (issue 2). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
static struct PyModuleDef mod = {PyModuleDef_HEAD_INIT, "_tdxquote", NULL, -1, NULL, NULL, NULL, NULL, NULL};
PyMODINIT_FUNC PyInit__tdxquote(void) { return PyModule_Create(&mod); }
