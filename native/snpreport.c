/*
 * agent.quote._snpreport: the Python face of snpreport_core.c.
 *
 * SnpReport(buffer) parses any buffer-protocol object without copying it: the object keeps the
 * Py_buffer export (so a bytearray cannot be resized underneath it) and every byte-field getter
 * slices the requested field into a new bytes object on demand. Malformed input raises
 * SnpReportError (agent.errors.BadInputError and ValueError) whose message and .field/.offset name
 * the culprit.
 *
 * Built like agent.quote._tdxquote (native/tdxquote.c): multi-phase init, a heap type, the exception
 * and the type in module state, GC support for the held buffer. The field tables come from the
 * X-macros in snpreport_core.h; the module exports them as BYTES_FIELDS / INT_FIELDS.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "snpreport_core.h"

typedef struct {
    PyObject *report_error;
    PyTypeObject *report_type;
} module_state;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    struct snpr_report r;
} ReportObject;

static struct PyModuleDef snpreport_module;

static module_state *
state_of_module(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

/* The module state reachable from a type, including Python subclasses of SnpReport. */
static module_state *
state_of_type(PyTypeObject *type)
{
    PyObject *module = PyType_GetModuleByDef(type, &snpreport_module);

    return module == NULL ? NULL : state_of_module(module);
}

static PyObject *
raise_report_error(module_state *st, const struct snpr_error *err)
{
    PyObject *exc, *val;

    exc = PyObject_CallFunction(st->report_error, "s", err->msg);
    if (exc == NULL)
        return NULL;
    val = PyUnicode_FromString(err->field);
    if (val == NULL || PyObject_SetAttrString(exc, "field", val) < 0)
        goto fail;
    Py_DECREF(val);
    val = PyLong_FromSize_t(err->offset);
    if (val == NULL || PyObject_SetAttrString(exc, "offset", val) < 0)
        goto fail;
    Py_DECREF(val);
    PyErr_SetObject(st->report_error, exc);
    Py_DECREF(exc);
    return NULL;
fail:
    Py_XDECREF(val);
    Py_DECREF(exc);
    return NULL;
}

static PyObject *
Report_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *src;
    ReportObject *self;
    struct snpr_error err;
    module_state *st = state_of_type(type);

    if (st == NULL)
        return NULL;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "SnpReport() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "SnpReport", 1, 1, &src))
        return NULL;
    self = (ReportObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (PyObject_GetBuffer(src, &self->view, PyBUF_SIMPLE) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->have_view = 1;
    if (snpr_parse((const uint8_t *)self->view.buf, (size_t)self->view.len, &self->r, &err) < 0) {
        Py_DECREF(self);
        return raise_report_error(st, &err);
    }
    return (PyObject *)self;
}

static int
Report_traverse(ReportObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    if (self->have_view)
        Py_VISIT(self->view.obj);
    return 0;
}

static int
Report_clear(ReportObject *self)
{
    if (self->have_view) {
        self->have_view = 0;
        PyBuffer_Release(&self->view);
    }
    return 0;
}

static void
Report_dealloc(ReportObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);

    PyObject_GC_UnTrack(self);
    (void)Report_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* Only reachable after the GC broke a reference cycle through the buffer: fail, never read freed memory. */
static int
check_view(ReportObject *self)
{
    if (self->have_view)
        return 0;
    PyErr_SetString(PyExc_ValueError, "the report's buffer was released");
    return -1;
}

static PyObject *
slice(ReportObject *self, size_t off, size_t len)
{
    if (check_view(self) < 0)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)self->view.buf + off, (Py_ssize_t)len);
}

static PyObject *
get_bytes(ReportObject *self, void *closure)
{
    const struct snpr_bytes_desc *d = &snpr_bytes_desc[(intptr_t)closure];

    if (self->r.version < d->first_version)
        Py_RETURN_NONE;
    return slice(self, d->off, d->len);
}

static PyObject *
get_int(ReportObject *self, void *closure)
{
    intptr_t which = (intptr_t)closure;

    if (self->r.version < snpr_int_desc[which].first_version)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLongLong((unsigned long long)self->r.v[which]);
}

static PyObject *
get_debug(ReportObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->r.debug);
}

static PyObject *
get_signing_key(ReportObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLong(self->r.signing_key);
}

static PyObject *
get_platform_unknown_bits(ReportObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong((unsigned long long)self->r.platform_unknown_bits);
}

static PyObject *
get_product(ReportObject *self, void *closure)
{
    const char *name = snpr_product_name(self->r.product);

    (void)closure;
    if (name == NULL)
        Py_RETURN_NONE;
    return PyUnicode_InternFromString(name);
}

static PyObject *
get_signed_data(ReportObject *self, void *closure)
{
    (void)closure;
    return slice(self, 0, SNPR_SIGNED_LEN);
}

static PyObject *
get_raw(ReportObject *self, void *closure)
{
    (void)closure;
    return slice(self, 0, SNPR_REPORT_LEN);
}

#define BYTES_GETSET(id, name, off, len, ver, doc) {name, (getter)get_bytes, NULL, doc, (void *)(intptr_t)SNPR_B_##id},
#define INT_GETSET(id, name, off, width, ver, doc) {name, (getter)get_int, NULL, doc, (void *)(intptr_t)SNPR_I_##id},

static PyGetSetDef Report_getset[] = {
    SNPR_BYTES_FIELDS(BYTES_GETSET)
    SNPR_INT_FIELDS(INT_GETSET)
    {"signed_data", (getter)get_signed_data, NULL, "the signed bytes [0, 0x2A0)", NULL},
    {"raw", (getter)get_raw, NULL, "the whole 1184-byte report", NULL},
    {"debug", (getter)get_debug, NULL, "POLICY bit 19: the host may debug (decrypt) the guest", NULL},
    {"signing_key", (getter)get_signing_key, NULL, "KEY_INFO bits 4:2: 0 = VCEK, 1 = VLEK", NULL},
    {"platform_unknown_bits", (getter)get_platform_unknown_bits, NULL,
     "PLATFORM_INFO bits this parser does not know (reported, never fatal)", NULL},
    {"product", (getter)get_product, NULL,
     "'Milan', 'Genoa' (also Bergamo/Siena) or 'Turin' from CPUID (v3+); None on v2 or an unknown CPU", NULL},
    {NULL, NULL, NULL, NULL, NULL}
};

#undef BYTES_GETSET
#undef INT_GETSET

PyDoc_STRVAR(Report_doc,
"SnpReport(buffer, /)\n--\n\n"
"A parsed AMD SEV-SNP attestation report (v2 to v5) over a buffer-protocol object, held without copying.");

static PyType_Slot Report_slots[] = {
    {Py_tp_new, Report_new},
    {Py_tp_dealloc, Report_dealloc},
    {Py_tp_traverse, Report_traverse},
    {Py_tp_clear, Report_clear},
    {Py_tp_getset, Report_getset},
    {Py_tp_doc, (void *)Report_doc},
    {0, NULL}
};

static PyType_Spec Report_spec = {
    .name = "agent.quote._snpreport.SnpReport",
    .basicsize = sizeof(ReportObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Report_slots,
};

/* A tuple of the names an X-macro table lists, in table order. */
static PyObject *
names_tuple(const char *const *names, Py_ssize_t n)
{
    PyObject *t = PyTuple_New(n);
    Py_ssize_t i;

    if (t == NULL)
        return NULL;
    for (i = 0; i < n; i++) {
        PyObject *s = PyUnicode_FromString(names[i]);

        if (s == NULL) {
            Py_DECREF(t);
            return NULL;
        }
        PyTuple_SET_ITEM(t, i, s);
    }
    return t;
}

#define BYTES_NAME(id, name, off, len, ver, doc) name,
#define INT_NAME(id, name, off, width, ver, doc) name,
static const char *const bytes_field_names[] = {SNPR_BYTES_FIELDS(BYTES_NAME)};
static const char *const int_field_names[] = {SNPR_INT_FIELDS(INT_NAME)};
#undef BYTES_NAME
#undef INT_NAME

static int
add_tuple(PyObject *m, const char *attr, const char *const *names, size_t n)
{
    PyObject *t = names_tuple(names, (Py_ssize_t)n);
    int rc;

    if (t == NULL)
        return -1;
    rc = PyModule_AddObjectRef(m, attr, t);
    Py_DECREF(t);
    return rc;
}

/* SnpReportError derives from the project's error root (agent.errors.BadInputError: exit code 4, stable
 * reason "bad_input") and from ValueError, so callers may catch either. */
static PyObject *
new_report_error(void)
{
    PyObject *errors, *base, *bases, *exc = NULL;

    errors = PyImport_ImportModule("agent.errors");
    if (errors == NULL)
        return NULL;
    base = PyObject_GetAttrString(errors, "BadInputError");
    Py_DECREF(errors);
    if (base == NULL)
        return NULL;
    bases = PyTuple_Pack(2, base, PyExc_ValueError);
    Py_DECREF(base);
    if (bases == NULL)
        return NULL;
    exc = PyErr_NewExceptionWithDoc(
        "agent.quote._snpreport.SnpReportError",
        "Malformed SEV-SNP report; .field and .offset name the offending field.", bases, NULL);
    Py_DECREF(bases);
    return exc;
}

static int
snpreport_exec(PyObject *m)
{
    module_state *st = state_of_module(m);

    st->report_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Report_spec, NULL);
    if (st->report_type == NULL)
        return -1;
    st->report_error = new_report_error();
    if (st->report_error == NULL)
        return -1;
    if (PyModule_AddObjectRef(m, "SnpReportError", st->report_error) < 0 ||
        PyModule_AddObjectRef(m, "SnpReport", (PyObject *)st->report_type) < 0 ||
        PyModule_AddIntConstant(m, "REPORT_SIZE", SNPR_REPORT_LEN) < 0 ||
        PyModule_AddIntConstant(m, "SIGNED_SIZE", SNPR_SIGNED_LEN) < 0)
        return -1;
    if (add_tuple(m, "BYTES_FIELDS", bytes_field_names, sizeof(bytes_field_names) / sizeof(bytes_field_names[0])) < 0 ||
        add_tuple(m, "INT_FIELDS", int_field_names, sizeof(int_field_names) / sizeof(int_field_names[0])) < 0)
        return -1;
    return 0;
}

static int
snpreport_traverse(PyObject *m, visitproc visit, void *arg)
{
    module_state *st = state_of_module(m);

    Py_VISIT(st->report_error);
    Py_VISIT(st->report_type);
    return 0;
}

static int
snpreport_clear(PyObject *m)
{
    module_state *st = state_of_module(m);

    Py_CLEAR(st->report_error);
    Py_CLEAR(st->report_type);
    return 0;
}

static void
snpreport_free(void *m)
{
    (void)snpreport_clear((PyObject *)m);
}

static PyModuleDef_Slot snpreport_slots[] = {
    {Py_mod_exec, snpreport_exec},
    {0, NULL}
};

static struct PyModuleDef snpreport_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_snpreport",
    .m_doc = "Strict, zero-copy AMD SEV-SNP attestation report (v2 to v5) parser.",
    .m_size = sizeof(module_state),
    .m_slots = snpreport_slots,
    .m_traverse = snpreport_traverse,
    .m_clear = snpreport_clear,
    .m_free = snpreport_free,
};

PyMODINIT_FUNC
PyInit__snpreport(void)
{
    return PyModuleDef_Init(&snpreport_module);
}
