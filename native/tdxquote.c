/*
 * agent.quote._tdxquote: the Python face of tdxquote_core.c.
 *
 * Quote(buffer) parses any buffer-protocol object without copying it: the object keeps the
 * Py_buffer export (so a bytearray cannot be resized underneath it) and every attribute getter
 * slices the requested field into a new bytes object on demand. Malformed input raises
 * QuoteError (a ValueError subclass) whose message and .field/.offset name the culprit.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include "tdxquote_core.h"

static PyObject *QuoteError;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int have_view;
    struct tdxq_quote q;
} QuoteObject;

/* Integer-valued attributes, dispatched by closure in get_int(). */
enum int_field {
    I_VERSION, I_ATT_KEY_TYPE, I_TEE_TYPE, I_QE_SVN, I_PCE_SVN, I_BODY_TYPE, I_BODY_SIZE,
    I_SIG_DATA_LEN, I_CERT_DATA_TYPE, I_CERT_DATA_SIZE, I_PCK_CERT_CHAIN_TYPE, I_QE_MISC_SELECT,
    I_QE_ISV_PROD_ID, I_QE_ISV_SVN, I_QUOTE_LEN, I_TRAILING_LEN
};

static PyObject *
raise_quote_error(const struct tdxq_error *err)
{
    PyObject *exc, *val;

    exc = PyObject_CallFunction(QuoteError, "s", err->msg);
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
    PyErr_SetObject(QuoteError, exc);
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
        return raise_quote_error(&err);
    }
    return (PyObject *)self;
}

static void
Quote_dealloc(QuoteObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);

    if (self->have_view) {
        self->have_view = 0;
        PyBuffer_Release(&self->view);
    }
    tp->tp_free((PyObject *)self);
}

static PyObject *
slice(QuoteObject *self, size_t off, size_t len)
{
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

    switch ((enum int_field)(intptr_t)closure) {
    case I_VERSION: return PyLong_FromLong(q->version);
    case I_ATT_KEY_TYPE: return PyLong_FromLong(q->att_key_type);
    case I_TEE_TYPE: return PyLong_FromUnsignedLong(q->tee_type);
    case I_QE_SVN: return PyLong_FromLong(q->qe_svn);
    case I_PCE_SVN: return PyLong_FromLong(q->pce_svn);
    case I_BODY_TYPE: return PyLong_FromLong(q->body_type);
    case I_BODY_SIZE: return PyLong_FromUnsignedLong(q->body_size);
    case I_SIG_DATA_LEN: return PyLong_FromUnsignedLong(q->sig_data_len);
    case I_CERT_DATA_TYPE: return PyLong_FromLong(q->cert_data_type);
    case I_CERT_DATA_SIZE: return PyLong_FromUnsignedLong(q->cert_data_size);
    case I_PCK_CERT_CHAIN_TYPE: return PyLong_FromLong(q->pck_cert_chain_type);
    case I_QE_MISC_SELECT: return PyLong_FromUnsignedLong(q->qe_misc_select);
    case I_QE_ISV_PROD_ID: return PyLong_FromLong(q->qe_isv_prod_id);
    case I_QE_ISV_SVN: return PyLong_FromLong(q->qe_isv_svn);
    case I_QUOTE_LEN: return PyLong_FromSize_t(q->quote_len);
    case I_TRAILING_LEN: return PyLong_FromSize_t(q->trailing_len);
    }
    PyErr_SetString(PyExc_SystemError, "bad integer field");
    return NULL;
}

static PyObject *
get_vmid(QuoteObject *self, void *closure)
{
    (void)closure;
    if (self->q.body_type != 4)
        Py_RETURN_NONE;
    return PyLong_FromLong(self->q.vmid);
}

static PyObject *
get_debug(QuoteObject *self, void *closure)
{
    const struct tdxq_span *s = &self->q.f[TDXQ_TD_ATTRIBUTES];

    (void)closure;
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

#define BYTES(name, id, doc) {name, (getter)get_bytes, NULL, doc, (void *)(intptr_t)(id)}
#define INT(name, id, doc) {name, (getter)get_int, NULL, doc, (void *)(intptr_t)(id)}

static PyGetSetDef Quote_getset[] = {
    INT("version", I_VERSION, "quote version (4 or 5)"),
    INT("att_key_type", I_ATT_KEY_TYPE, "attestation key type (2 = ECDSA P-256)"),
    INT("tee_type", I_TEE_TYPE, "TEE type (0x81 = TDX)"),
    INT("qe_svn", I_QE_SVN, "header u16 at offset 8"),
    INT("pce_svn", I_PCE_SVN, "header u16 at offset 10"),
    BYTES("qe_vendor_id", TDXQ_QE_VENDOR_ID, "QE vendor ID (16 bytes)"),
    BYTES("user_data", TDXQ_USER_DATA, "header user data (20 bytes, QE ID first)"),
    INT("body_type", I_BODY_TYPE, "2 = TDX 1.0 (all v4), 3 = TDX 1.5, 4 = TDX 1.5 Ex"),
    INT("body_size", I_BODY_SIZE, "TD report body size (584, 648 or 885)"),
    BYTES("tee_tcb_svn", TDXQ_TEE_TCB_SVN, NULL),
    BYTES("mr_seam", TDXQ_MR_SEAM, NULL),
    BYTES("mr_signer_seam", TDXQ_MR_SIGNER_SEAM, NULL),
    BYTES("seam_attributes", TDXQ_SEAM_ATTRIBUTES, NULL),
    BYTES("td_attributes", TDXQ_TD_ATTRIBUTES, NULL),
    BYTES("xfam", TDXQ_XFAM, NULL),
    BYTES("mr_td", TDXQ_MR_TD, NULL),
    BYTES("mr_config_id", TDXQ_MR_CONFIG_ID, NULL),
    BYTES("mr_owner", TDXQ_MR_OWNER, NULL),
    BYTES("mr_owner_config", TDXQ_MR_OWNER_CONFIG, NULL),
    BYTES("rtmr0", TDXQ_RTMR0, NULL),
    BYTES("rtmr1", TDXQ_RTMR1, NULL),
    BYTES("rtmr2", TDXQ_RTMR2, NULL),
    BYTES("rtmr3", TDXQ_RTMR3, NULL),
    BYTES("report_data", TDXQ_REPORT_DATA, NULL),
    BYTES("tee_tcb_svn2", TDXQ_TEE_TCB_SVN2, "TDX 1.5 only, else None"),
    BYTES("mr_service_td", TDXQ_MR_SERVICE_TD, "TDX 1.5 only, else None"),
    {"vmid", (getter)get_vmid, NULL, "body type 4 only, else None", NULL},
    BYTES("td_id", TDXQ_TD_ID, "body type 4 only, else None"),
    BYTES("dev_info", TDXQ_DEV_INFO, "body type 4 only, else None"),
    BYTES("init_servtd_hash", TDXQ_INIT_SERVTD_HASH, "body type 4 only, else None"),
    BYTES("init_servtd_attributes", TDXQ_INIT_SERVTD_ATTRIBUTES, "body type 4 only, else None"),
    BYTES("init_cpu_svn", TDXQ_INIT_CPU_SVN, "body type 4 only, else None"),
    BYTES("init_tee_tcb_svn", TDXQ_INIT_TEE_TCB_SVN, "body type 4 only, else None"),
    BYTES("init_tee_fmspc", TDXQ_INIT_TEE_FMSPC, "body type 4 only, else None"),
    BYTES("cur_servtd_hash", TDXQ_CUR_SERVTD_HASH, "body type 4 only, else None"),
    BYTES("cur_servtd_attributes", TDXQ_CUR_SERVTD_ATTRIBUTES, "body type 4 only, else None"),
    INT("sig_data_len", I_SIG_DATA_LEN, "signature data length field"),
    BYTES("signature", TDXQ_SIGNATURE, "ECDSA quote signature r||s (64 bytes)"),
    BYTES("attestation_key", TDXQ_ATTESTATION_KEY, "ECDSA attestation public key x||y (64 bytes)"),
    INT("cert_data_type", I_CERT_DATA_TYPE, "outer certification data type (6)"),
    INT("cert_data_size", I_CERT_DATA_SIZE, "outer certification data size"),
    BYTES("qe_report", TDXQ_QE_REPORT, "QE report (384 raw bytes)"),
    BYTES("qe_cpu_svn", TDXQ_QE_CPU_SVN, NULL),
    INT("qe_misc_select", I_QE_MISC_SELECT, NULL),
    BYTES("qe_attributes", TDXQ_QE_ATTRIBUTES, NULL),
    BYTES("qe_mr_enclave", TDXQ_QE_MR_ENCLAVE, NULL),
    BYTES("qe_mr_signer", TDXQ_QE_MR_SIGNER, NULL),
    INT("qe_isv_prod_id", I_QE_ISV_PROD_ID, NULL),
    INT("qe_isv_svn", I_QE_ISV_SVN, NULL),
    BYTES("qe_report_data", TDXQ_QE_REPORT_DATA, NULL),
    BYTES("qe_report_signature", TDXQ_QE_REPORT_SIGNATURE, "QE report signature r||s by the PCK key"),
    BYTES("qe_auth_data", TDXQ_QE_AUTH_DATA, NULL),
    INT("pck_cert_chain_type", I_PCK_CERT_CHAIN_TYPE, "nested certification data type (5 = PEM chain)"),
    BYTES("pck_cert_chain", TDXQ_PCK_CERT_CHAIN, "nested certification data, one trailing NUL stripped"),
    {"signed_region", (getter)get_signed_region, NULL, "(start, end) of the quote-signed bytes", NULL},
    {"signed_data", (getter)get_signed_data, NULL, "the quote-signed bytes", NULL},
    {"raw", (getter)get_raw, NULL, "the quote bytes without trailing data", NULL},
    INT("quote_len", I_QUOTE_LEN, "header through the end of the signature data"),
    INT("trailing_len", I_TRAILING_LEN, "buffer bytes after the quote (tolerated, reported)"),
    {"debug", (getter)get_debug, NULL, "td_attributes bit 0: a debug (untrusted) TD", NULL},
    {NULL, NULL, NULL, NULL, NULL}
};

PyDoc_STRVAR(Quote_doc,
"Quote(buffer)\n--\n\n"
"A parsed TDX quote (v4/v5) over a buffer-protocol object, held without copying.");

static PyTypeObject QuoteType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "agent.quote._tdxquote.Quote",
    .tp_basicsize = sizeof(QuoteObject),
    .tp_dealloc = (destructor)Quote_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = Quote_doc,
    .tp_getset = Quote_getset,
    .tp_new = Quote_new,
};

static struct PyModuleDef tdxquote_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_tdxquote",
    .m_doc = "Strict, zero-copy TDX quote (v4/v5) parser.",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__tdxquote(void)
{
    PyObject *m;

    if (PyType_Ready(&QuoteType) < 0)
        return NULL;
    m = PyModule_Create(&tdxquote_module);
    if (m == NULL)
        return NULL;
    QuoteError = PyErr_NewExceptionWithDoc(
        "agent.quote._tdxquote.QuoteError",
        "Malformed TDX quote; .field and .offset name the offending field.", PyExc_ValueError, NULL);
    if (QuoteError == NULL || PyModule_AddObjectRef(m, "QuoteError", QuoteError) < 0 ||
        PyModule_AddObjectRef(m, "Quote", (PyObject *)&QuoteType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
