/*
 * agent.quote._tdxquote: the Python face of tdxquote_core.c.
 *
 * Quote(buffer) parses any buffer-protocol object without copying it: the object keeps the
 * Py_buffer export (so a bytearray cannot be resized underneath it) and every attribute getter
 * slices the requested field into a new bytes object on demand. Malformed input raises
 * QuoteError (a ValueError subclass) whose message and .field/.offset name the culprit.
 *
 * Built the way CPython's own Modules/_struct.c is: multi-phase init (Py_mod_exec), a heap type,
 * the exception and the type in module state (no process globals, so sub-interpreters and
 * reloading are safe), and GC support because the held buffer can reference back to us.
 * The field tables come from the X-macros in tdxquote_core.h; the module exports them as
 * BYTES_FIELDS / INT_FIELDS so the Python side never lists a field again.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "tdxquote_core.h"

typedef struct {
    PyObject *quote_error;
    PyTypeObject *quote_type;
} module_state;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    struct tdxq_quote q;
} QuoteObject;

static struct PyModuleDef tdxquote_module;

static module_state *
state_of_module(PyObject *module)
{
    return (module_state *)PyModule_GetState(module);
}

/* The module state reachable from a type, including Python subclasses of Quote. */
static module_state *
state_of_type(PyTypeObject *type)
{
    PyObject *module = PyType_GetModuleByDef(type, &tdxquote_module);

    return module == NULL ? NULL : state_of_module(module);
}

#define INT_ENUM_ENTRY(id, name, member, doc) I_##id,
enum int_field { TDXQ_INT_FIELDS(INT_ENUM_ENTRY) I_COUNT };
#undef INT_ENUM_ENTRY

static PyObject *
raise_quote_error(module_state *st, const struct tdxq_error *err)
{
    PyObject *exc, *val;

    exc = PyObject_CallFunction(st->quote_error, "s", err->msg);
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
    PyErr_SetObject(st->quote_error, exc);
    Py_DECREF(exc);
    return NULL;
fail:
    Py_XDECREF(val);
    Py_DECREF(exc);
    return NULL;
}

static PyObject *
Quote_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    PyObject *src;
    QuoteObject *self;
    struct tdxq_error err;
    module_state *st = state_of_type(type);

    if (st == NULL)
        return NULL;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) != 0) {
        PyErr_SetString(PyExc_TypeError, "Quote() takes no keyword arguments");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Quote", 1, 1, &src))
        return NULL;
    self = (QuoteObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (PyObject_GetBuffer(src, &self->view, PyBUF_SIMPLE) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->have_view = 1;
    if (tdxq_parse((const uint8_t *)self->view.buf, (size_t)self->view.len, &self->q, &err) < 0) {
        Py_DECREF(self);
        return raise_quote_error(st, &err);
    }
    return (PyObject *)self;
}

static int
Quote_traverse(QuoteObject *self, visitproc visit, void *arg)
{
    Py_VISIT(Py_TYPE(self));
    if (self->have_view)
        Py_VISIT(self->view.obj);
    return 0;
}

static int
Quote_clear(QuoteObject *self)
{
    if (self->have_view) {
        self->have_view = 0;
        PyBuffer_Release(&self->view);
    }
    return 0;
}

static void
Quote_dealloc(QuoteObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);

    PyObject_GC_UnTrack(self);
    (void)Quote_clear(self);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* Only reachable after the GC broke a reference cycle through the buffer: fail, never read freed memory. */
static int
check_view(QuoteObject *self)
{
    if (self->have_view)
        return 0;
    PyErr_SetString(PyExc_ValueError, "the quote's buffer was released");
    return -1;
}

static PyObject *
slice(QuoteObject *self, size_t off, size_t len)
{
    if (check_view(self) < 0)
        return NULL;
    return PyBytes_FromStringAndSize((const char *)self->view.buf + off, (Py_ssize_t)len);
}

static PyObject *
get_bytes(QuoteObject *self, void *closure)
{
    const struct tdxq_span *s = &self->q.f[(intptr_t)closure];

    if (!s->present)
        Py_RETURN_NONE;
    return slice(self, s->off, s->len);
}

static PyObject *
get_int(QuoteObject *self, void *closure)
{
    const struct tdxq_quote *q = &self->q;
    enum int_field which = (enum int_field)(intptr_t)closure;

    if (which == I_VMID && q->body_type != 4)
        Py_RETURN_NONE;
    switch (which) {
#define INT_CASE(id, name, member, doc) case I_##id: return PyLong_FromSize_t((size_t)q->member);
    TDXQ_INT_FIELDS(INT_CASE)
#undef INT_CASE
    case I_COUNT:
        break;
    }
    PyErr_SetString(PyExc_SystemError, "bad integer field");
    return NULL;
}

static PyObject *
get_debug(QuoteObject *self, void *closure)
{
    const struct tdxq_span *s = &self->q.f[TDXQ_TD_ATTRIBUTES];

    (void)closure;
    if (check_view(self) < 0)
        return NULL;
    return PyBool_FromLong(((const uint8_t *)self->view.buf)[s->off] & 1);
}

static PyObject *
get_signed_region(QuoteObject *self, void *closure)
{
    (void)closure;
    return Py_BuildValue("(nn)", (Py_ssize_t)0, (Py_ssize_t)self->q.signed_end);
}

static PyObject *
get_signed_data(QuoteObject *self, void *closure)
{
    (void)closure;
    return slice(self, 0, self->q.signed_end);
}

static PyObject *
get_raw(QuoteObject *self, void *closure)
{
    (void)closure;
    return slice(self, 0, self->q.quote_len);
}

#define BYTES_GETSET(id, name, doc) {name, (getter)get_bytes, NULL, doc, (void *)(intptr_t)TDXQ_##id},
#define INT_GETSET(id, name, member, doc) {name, (getter)get_int, NULL, doc, (void *)(intptr_t)I_##id},

static PyGetSetDef Quote_getset[] = {
    TDXQ_BYTES_FIELDS(BYTES_GETSET)
    TDXQ_INT_FIELDS(INT_GETSET)
    {"pck_cert_chain", (getter)get_bytes, NULL, "nested certification data, one trailing NUL stripped",
     (void *)(intptr_t)TDXQ_PCK_CERT_CHAIN},
    {"signed_region", (getter)get_signed_region, NULL, "(start, end) of the quote-signed bytes", NULL},
    {"signed_data", (getter)get_signed_data, NULL, "the quote-signed bytes", NULL},
    {"raw", (getter)get_raw, NULL, "the quote bytes without trailing data", NULL},
    {"debug", (getter)get_debug, NULL, "td_attributes bit 0: a debug (untrusted) TD", NULL},
    {NULL, NULL, NULL, NULL, NULL}
};

#undef BYTES_GETSET
#undef INT_GETSET

PyDoc_STRVAR(Quote_doc,
"Quote(buffer, /)\n--\n\n"
"A parsed TDX quote (v4/v5) over a buffer-protocol object, held without copying.");

static PyType_Slot Quote_slots[] = {
    {Py_tp_new, Quote_new},
    {Py_tp_dealloc, Quote_dealloc},
    {Py_tp_traverse, Quote_traverse},
    {Py_tp_clear, Quote_clear},
    {Py_tp_getset, Quote_getset},
    {Py_tp_doc, (void *)Quote_doc},
    {0, NULL}
};

static PyType_Spec Quote_spec = {
    .name = "agent.quote._tdxquote.Quote",
    .basicsize = sizeof(QuoteObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = Quote_slots,
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

#define BYTES_NAME(id, name, doc) name,
#define INT_NAME(id, name, member, doc) name,
static const char *const bytes_field_names[] = {TDXQ_BYTES_FIELDS(BYTES_NAME)};
static const char *const int_field_names[] = {TDXQ_INT_FIELDS(INT_NAME)};
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

/* QuoteError derives from the project's error root (agent.errors.BadInputError: exit code 4, stable
 * reason "bad_input") and from ValueError, so callers may catch either. */
static PyObject *
new_quote_error(void)
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
        "agent.quote._tdxquote.QuoteError",
        "Malformed TDX quote; .field and .offset name the offending field.", bases, NULL);
    Py_DECREF(bases);
    return exc;
}

static int
tdxquote_exec(PyObject *m)
{
    module_state *st = state_of_module(m);

    st->quote_type = (PyTypeObject *)PyType_FromModuleAndSpec(m, &Quote_spec, NULL);
    if (st->quote_type == NULL)
        return -1;
    st->quote_error = new_quote_error();
    if (st->quote_error == NULL)
        return -1;
    if (PyModule_AddObjectRef(m, "QuoteError", st->quote_error) < 0 ||
        PyModule_AddObjectRef(m, "Quote", (PyObject *)st->quote_type) < 0)
        return -1;
    if (add_tuple(m, "BYTES_FIELDS", bytes_field_names, sizeof(bytes_field_names) / sizeof(bytes_field_names[0])) < 0 ||
        add_tuple(m, "INT_FIELDS", int_field_names, sizeof(int_field_names) / sizeof(int_field_names[0])) < 0)
        return -1;
    return 0;
}

static int
tdxquote_traverse(PyObject *m, visitproc visit, void *arg)
{
    module_state *st = state_of_module(m);

    Py_VISIT(st->quote_error);
    Py_VISIT(st->quote_type);
    return 0;
}

static int
tdxquote_clear(PyObject *m)
{
    module_state *st = state_of_module(m);

    Py_CLEAR(st->quote_error);
    Py_CLEAR(st->quote_type);
    return 0;
}

static void
tdxquote_free(void *m)
{
    (void)tdxquote_clear((PyObject *)m);
}

static PyModuleDef_Slot tdxquote_slots[] = {
    {Py_mod_exec, tdxquote_exec},
    {0, NULL}
};

static struct PyModuleDef tdxquote_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_tdxquote",
    .m_doc = "Strict, zero-copy TDX quote (v4/v5) parser.",
    .m_size = sizeof(module_state),
    .m_slots = tdxquote_slots,
    .m_traverse = tdxquote_traverse,
    .m_clear = tdxquote_clear,
    .m_free = tdxquote_free,
};

PyMODINIT_FUNC
PyInit__tdxquote(void)
{
    return PyModuleDef_Init(&tdxquote_module);
}
