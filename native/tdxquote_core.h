/*
 * TDX quote layout parser (versions 4 and 5), free of Python so the fuzz harness can link it alone.
 *
 * tdxq_parse() validates every length field against its container and the buffer, and records
 * where each field lives (offset + length). It never dereferences a byte outside [buf, buf+len).
 * Layout reference: docs/reference/tdx-quote.md section 1.
 */
#ifndef TDXQUOTE_CORE_H
#define TDXQUOTE_CORE_H

#include <stddef.h>
#include <stdint.h>

/*
 * The byte-string fields, defined once. X(ID, "python_name", "docstring or NULL") expands into the
 * enum below, the Python getters in tdxquote.c and the module's BYTES_FIELDS tuple (which
 * agent/quote/parser.py uses for its JSON view), so a field is added in exactly one place.
 * The order is the output order of Quote.to_dict(). TDXQ_PCK_CERT_CHAIN is kept outside the list:
 * it is rendered specially (PEM text or hex).
 */
#define TDXQ_BYTES_FIELDS(X) \
    X(QE_VENDOR_ID, "qe_vendor_id", "QE vendor ID (16 bytes)") \
    X(USER_DATA, "user_data", "header user data (20 bytes, QE ID first)") \
    /* TD report body (TDX 1.0) */ \
    X(TEE_TCB_SVN, "tee_tcb_svn", NULL) \
    X(MR_SEAM, "mr_seam", NULL) \
    X(MR_SIGNER_SEAM, "mr_signer_seam", NULL) \
    X(SEAM_ATTRIBUTES, "seam_attributes", NULL) \
    X(TD_ATTRIBUTES, "td_attributes", NULL) \
    X(XFAM, "xfam", NULL) \
    X(MR_TD, "mr_td", NULL) \
    X(MR_CONFIG_ID, "mr_config_id", NULL) \
    X(MR_OWNER, "mr_owner", NULL) \
    X(MR_OWNER_CONFIG, "mr_owner_config", NULL) \
    X(RTMR0, "rtmr0", NULL) \
    X(RTMR1, "rtmr1", NULL) \
    X(RTMR2, "rtmr2", NULL) \
    X(RTMR3, "rtmr3", NULL) \
    X(REPORT_DATA, "report_data", NULL) \
    /* TDX 1.5 */ \
    X(TEE_TCB_SVN2, "tee_tcb_svn2", "TDX 1.5 only, else None") \
    X(MR_SERVICE_TD, "mr_service_td", "TDX 1.5 only, else None") \
    /* TDX 1.5 "Ex" (v5 body type 4); vmid is an integer field */ \
    X(TD_ID, "td_id", "body type 4 only, else None") \
    X(DEV_INFO, "dev_info", "body type 4 only, else None") \
    X(INIT_SERVTD_HASH, "init_servtd_hash", "body type 4 only, else None") \
    X(INIT_SERVTD_ATTRIBUTES, "init_servtd_attributes", "body type 4 only, else None") \
    X(INIT_CPU_SVN, "init_cpu_svn", "body type 4 only, else None") \
    X(INIT_TEE_TCB_SVN, "init_tee_tcb_svn", "body type 4 only, else None") \
    X(INIT_TEE_FMSPC, "init_tee_fmspc", "body type 4 only, else None") \
    X(CUR_SERVTD_HASH, "cur_servtd_hash", "body type 4 only, else None") \
    X(CUR_SERVTD_ATTRIBUTES, "cur_servtd_attributes", "body type 4 only, else None") \
    /* signature data, then the QE report (SGX report body) sub-fields */ \
    X(SIGNATURE, "signature", "ECDSA quote signature r||s (64 bytes)") \
    X(ATTESTATION_KEY, "attestation_key", "ECDSA attestation public key x||y (64 bytes)") \
    X(QE_REPORT, "qe_report", "QE report (384 raw bytes)") \
    X(QE_CPU_SVN, "qe_cpu_svn", NULL) \
    X(QE_ATTRIBUTES, "qe_attributes", NULL) \
    X(QE_MR_ENCLAVE, "qe_mr_enclave", NULL) \
    X(QE_MR_SIGNER, "qe_mr_signer", NULL) \
    X(QE_REPORT_DATA, "qe_report_data", NULL) \
    X(QE_REPORT_SIGNATURE, "qe_report_signature", "QE report signature r||s by the PCK key") \
    X(QE_AUTH_DATA, "qe_auth_data", NULL)

#define TDXQ_ENUM_ENTRY(id, name, doc) TDXQ_##id,
enum tdxq_field {
    TDXQ_BYTES_FIELDS(TDXQ_ENUM_ENTRY)
    TDXQ_PCK_CERT_CHAIN,         /* nested certification data, one trailing NUL stripped */
    TDXQ_FIELD_COUNT
};
#undef TDXQ_ENUM_ENTRY

/*
 * The integer fields, defined once: X(ID, "python_name", member of struct tdxq_quote, "doc").
 * Order = output order of Quote.to_dict(). "vmid" is None unless the body type is 4.
 */
#define TDXQ_INT_FIELDS(X) \
    X(VERSION, "version", version, "quote version (4 or 5)") \
    X(ATT_KEY_TYPE, "att_key_type", att_key_type, "attestation key type (2 = ECDSA P-256)") \
    X(TEE_TYPE, "tee_type", tee_type, "TEE type (0x81 = TDX)") \
    X(QE_SVN, "qe_svn", qe_svn, "header u16 at offset 8") \
    X(PCE_SVN, "pce_svn", pce_svn, "header u16 at offset 10") \
    X(BODY_TYPE, "body_type", body_type, "2 = TDX 1.0 (all v4), 3 = TDX 1.5, 4 = TDX 1.5 Ex") \
    X(BODY_SIZE, "body_size", body_size, "TD report body size (584, 648 or 885)") \
    X(VMID, "vmid", vmid, "body type 4 only, else None") \
    X(SIG_DATA_LEN, "sig_data_len", sig_data_len, "signature data length field") \
    X(CERT_DATA_TYPE, "cert_data_type", cert_data_type, "outer certification data type (6)") \
    X(CERT_DATA_SIZE, "cert_data_size", cert_data_size, "outer certification data size") \
    X(QE_MISC_SELECT, "qe_misc_select", qe_misc_select, NULL) \
    X(QE_ISV_PROD_ID, "qe_isv_prod_id", qe_isv_prod_id, NULL) \
    X(QE_ISV_SVN, "qe_isv_svn", qe_isv_svn, NULL) \
    X(PCK_CERT_CHAIN_TYPE, "pck_cert_chain_type", pck_cert_chain_type, \
      "nested certification data type (5 = PEM chain)") \
    X(QUOTE_LEN, "quote_len", quote_len, "header through the end of the signature data") \
    X(TRAILING_LEN, "trailing_len", trailing_len, "buffer bytes after the quote (tolerated, reported)")

struct tdxq_span {
    size_t off;
    size_t len;
    int present;
};

struct tdxq_quote {
    uint16_t version, att_key_type, qe_svn, pce_svn;
    uint32_t tee_type;
    uint16_t body_type;          /* v4: 2 (TDX 1.0); v5: from the body descriptor */
    uint32_t body_size;
    uint32_t sig_data_len;
    uint16_t cert_data_type;     /* outer, always 6 */
    uint32_t cert_data_size;
    uint16_t pck_cert_chain_type;/* inner, 1..5 (5 = PEM chain) */
    uint32_t pck_cert_chain_size;/* as declared, before the trailing NUL is stripped */
    uint32_t qe_misc_select;
    uint16_t qe_isv_prod_id, qe_isv_svn;
    uint8_t vmid;                /* body type 4 only */
    size_t signed_end;           /* signed region is [0, signed_end) */
    size_t quote_len;            /* header through the end of the signature data */
    size_t trailing_len;         /* buffer bytes after quote_len */
    struct tdxq_span f[TDXQ_FIELD_COUNT];
};

struct tdxq_error {
    const char *field;           /* static string naming the offending field */
    size_t offset;               /* absolute offset of that field in the buffer */
    char msg[256];               /* full human-readable message */
};

/* Returns 0 and fills *q on success; returns -1 and fills *err on malformed input. */
int tdxq_parse(const uint8_t *buf, size_t len, struct tdxq_quote *q, struct tdxq_error *err);

#endif
