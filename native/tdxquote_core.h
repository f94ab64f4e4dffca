/*
 * TDX quote layout parser (versions 4 and 5), free of Python so the fuzz harness can link it alone.
 *
 * tdxq_parse() validates every length field against its container and the buffer, and records
 * where each field lives (offset + length). It never dereferences a byte outside [buf, buf+len).
 * Layout reference: shared/docs/reference/tdx-quote.md section 1.
 */
#ifndef TDXQUOTE_CORE_H
#define TDXQUOTE_CORE_H

#include <stddef.h>
#include <stdint.h>

/* Byte-string fields, each located by a span. Order matters only for the tables in tdxquote.c. */
enum tdxq_field {
    TDXQ_QE_VENDOR_ID, TDXQ_USER_DATA,
    /* TD report body (TDX 1.0) */
    TDXQ_TEE_TCB_SVN, TDXQ_MR_SEAM, TDXQ_MR_SIGNER_SEAM, TDXQ_SEAM_ATTRIBUTES, TDXQ_TD_ATTRIBUTES,
    TDXQ_XFAM, TDXQ_MR_TD, TDXQ_MR_CONFIG_ID, TDXQ_MR_OWNER, TDXQ_MR_OWNER_CONFIG,
    TDXQ_RTMR0, TDXQ_RTMR1, TDXQ_RTMR2, TDXQ_RTMR3, TDXQ_REPORT_DATA,
    /* TDX 1.5 */
    TDXQ_TEE_TCB_SVN2, TDXQ_MR_SERVICE_TD,
    /* TDX 1.5 "Ex" (v5 body type 4); vmid is an integer, see tdxq_quote.vmid */
    TDXQ_TD_ID, TDXQ_DEV_INFO, TDXQ_INIT_SERVTD_HASH, TDXQ_INIT_SERVTD_ATTRIBUTES, TDXQ_INIT_CPU_SVN,
    TDXQ_INIT_TEE_TCB_SVN, TDXQ_INIT_TEE_FMSPC, TDXQ_CUR_SERVTD_HASH, TDXQ_CUR_SERVTD_ATTRIBUTES,
    /* signature data */
    TDXQ_SIGNATURE, TDXQ_ATTESTATION_KEY, TDXQ_QE_REPORT, TDXQ_QE_REPORT_SIGNATURE, TDXQ_QE_AUTH_DATA,
    TDXQ_PCK_CERT_CHAIN,
    /* QE report (SGX report body) sub-fields */
    TDXQ_QE_CPU_SVN, TDXQ_QE_ATTRIBUTES, TDXQ_QE_MR_ENCLAVE, TDXQ_QE_MR_SIGNER, TDXQ_QE_REPORT_DATA,
    TDXQ_FIELD_COUNT
};

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
