/*
 * TDX quote layout parser; see tdxquote_core.h. Every read goes through rd16/rd32 after a bounds
 * check against the enclosing container, and all offset arithmetic is done in size_t with the
 * "size <= end - pos" form so a hostile length cannot wrap.
 */
#include "tdxquote_core.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define HEADER_LEN 48u
#define V5_DESC_LEN 6u
#define TDX_TEE_TYPE 0x00000081u
#define ATT_KEY_ECDSA_P256 2u
#define CERT_TYPE_QE_REPORT 6u
#define CERT_TYPE_PCK_CHAIN 5u
#define BODY_TD10 584u
#define BODY_TD15 648u
#define BODY_TD15EX 885u
#define QE_REPORT_LEN 384u
#define SIG_LEN 64u
#define KEY_LEN 64u

/* Header (tdx-quote.md section 1.1) */
#define HDR_VERSION_OFF 0u
#define HDR_ATT_KEY_TYPE_OFF 2u
#define HDR_TEE_TYPE_OFF 4u
#define HDR_QE_SVN_OFF 8u
#define HDR_PCE_SVN_OFF 10u
#define HDR_QE_VENDOR_ID_OFF 12u
#define HDR_USER_DATA_OFF 28u
/* v5 body descriptor, right after the header */
#define V5_DESC_TYPE_OFF HEADER_LEN
#define V5_DESC_SIZE_OFF (HEADER_LEN + 2u)
/* TD report body: vmid (1 byte) of the TDX 1.5 Ex layout */
#define BODY_VMID_OFF 648u
/* Signature data, relative to its start */
#define SD_SIGNATURE_OFF 0u
#define SD_ATT_KEY_OFF (SD_SIGNATURE_OFF + SIG_LEN)
#define SD_CERT_TYPE_OFF (SD_ATT_KEY_OFF + KEY_LEN)
#define SD_CERT_SIZE_OFF (SD_CERT_TYPE_OFF + 2u)
#define SD_CERT_DATA_OFF (SD_CERT_SIZE_OFF + 4u)
/* QE report (SGX report body), relative to its start */
#define QE_CPU_SVN_OFF 0u
#define QE_MISC_SELECT_OFF 16u
#define QE_ATTRIBUTES_OFF 48u
#define QE_MR_ENCLAVE_OFF 64u
#define QE_MR_SIGNER_OFF 128u
#define QE_ISV_PROD_ID_OFF 256u
#define QE_ISV_SVN_OFF 258u
#define QE_REPORT_DATA_OFF 320u

static uint16_t
rd16(const uint8_t *p)
{
    return (uint16_t)(p[0] | (p[1] << 8));
}

static uint32_t
rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

/* The one error helper: records the field and its offset, formats "field 'f' at offset o: <reason>". */
static int __attribute__((format(printf, 4, 5)))
fail(struct tdxq_error *err, const char *field, size_t offset, const char *fmt, ...)
{
    char reason[160];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    err->field = field;
    err->offset = offset;
    snprintf(err->msg, sizeof(err->msg), "field '%s' at offset %zu: %s", field, offset, reason);
    return -1;
}

/* Require [pos, pos+size) to lie inside a container ending at end (end <= buffer length). */
static int
need(const char *field, size_t pos, size_t size, size_t end, const char *container,
     struct tdxq_error *err)
{
    if (pos <= end && size <= end - pos)
        return 0;
    return fail(err, field, pos, "truncated: needs %zu bytes but the %s ends at offset %zu", size, container, end);
}

static void
span(struct tdxq_quote *q, enum tdxq_field f, size_t off, size_t len)
{
    q->f[f].off = off;
    q->f[f].len = len;
    q->f[f].present = 1;
}

static void
body_spans(struct tdxq_quote *q, size_t b)
{
    static const struct { enum tdxq_field f; size_t off, len; } td10[] = {
        {TDXQ_TEE_TCB_SVN, 0, 16}, {TDXQ_MR_SEAM, 16, 48}, {TDXQ_MR_SIGNER_SEAM, 64, 48},
        {TDXQ_SEAM_ATTRIBUTES, 112, 8}, {TDXQ_TD_ATTRIBUTES, 120, 8}, {TDXQ_XFAM, 128, 8},
        {TDXQ_MR_TD, 136, 48}, {TDXQ_MR_CONFIG_ID, 184, 48}, {TDXQ_MR_OWNER, 232, 48},
        {TDXQ_MR_OWNER_CONFIG, 280, 48}, {TDXQ_RTMR0, 328, 48}, {TDXQ_RTMR1, 376, 48},
        {TDXQ_RTMR2, 424, 48}, {TDXQ_RTMR3, 472, 48}, {TDXQ_REPORT_DATA, 520, 64},
        /* TDX 1.5 */
        {TDXQ_TEE_TCB_SVN2, 584, 16}, {TDXQ_MR_SERVICE_TD, 600, 48},
        /* TDX 1.5 Ex (vmid, 1 byte at 648, is read as an integer) */
        {TDXQ_TD_ID, 649, 32}, {TDXQ_DEV_INFO, 681, 48}, {TDXQ_INIT_SERVTD_HASH, 729, 48},
        {TDXQ_INIT_SERVTD_ATTRIBUTES, 777, 8}, {TDXQ_INIT_CPU_SVN, 785, 16},
        {TDXQ_INIT_TEE_TCB_SVN, 801, 16}, {TDXQ_INIT_TEE_FMSPC, 817, 12},
        {TDXQ_CUR_SERVTD_HASH, 829, 48}, {TDXQ_CUR_SERVTD_ATTRIBUTES, 877, 8},
    };
    size_t i;

    for (i = 0; i < sizeof(td10) / sizeof(td10[0]); i++) {
        if (td10[i].off + td10[i].len <= q->body_size)
            span(q, td10[i].f, b + td10[i].off, td10[i].len);
    }
}

static void
qe_report_spans(struct tdxq_quote *q, const uint8_t *buf, size_t r)
{
    span(q, TDXQ_QE_CPU_SVN, r + QE_CPU_SVN_OFF, 16);
    q->qe_misc_select = rd32(buf + r + QE_MISC_SELECT_OFF);
    span(q, TDXQ_QE_ATTRIBUTES, r + QE_ATTRIBUTES_OFF, 16);
    span(q, TDXQ_QE_MR_ENCLAVE, r + QE_MR_ENCLAVE_OFF, 32);
    span(q, TDXQ_QE_MR_SIGNER, r + QE_MR_SIGNER_OFF, 32);
    q->qe_isv_prod_id = rd16(buf + r + QE_ISV_PROD_ID_OFF);
    q->qe_isv_svn = rd16(buf + r + QE_ISV_SVN_OFF);
    span(q, TDXQ_QE_REPORT_DATA, r + QE_REPORT_DATA_OFF, 64);
}

/* Signature data: ECDSA sig, attestation key, certification data type 6 wrapping the QE report,
 * its signature, the QE auth data and the nested certification data (normally a PEM chain). */
static int
parse_sig_data(const uint8_t *buf, struct tdxq_quote *q, size_t sd, size_t sd_end,
               struct tdxq_error *err)
{
    const char *sdc = "signature data", *cdc = "certification data";
    size_t cd, cd_end, pos, n;

    if (need("signature", sd + SD_SIGNATURE_OFF, SIG_LEN, sd_end, sdc, err) < 0)
        return -1;
    span(q, TDXQ_SIGNATURE, sd + SD_SIGNATURE_OFF, SIG_LEN);
    if (need("attestation_key", sd + SD_ATT_KEY_OFF, KEY_LEN, sd_end, sdc, err) < 0)
        return -1;
    span(q, TDXQ_ATTESTATION_KEY, sd + SD_ATT_KEY_OFF, KEY_LEN);
    if (need("cert_data_type", sd + SD_CERT_TYPE_OFF, 2, sd_end, sdc, err) < 0)
        return -1;
    q->cert_data_type = rd16(buf + sd + SD_CERT_TYPE_OFF);
    if (q->cert_data_type != CERT_TYPE_QE_REPORT)
        return fail(err, "cert_data_type", sd + SD_CERT_TYPE_OFF,
                    "unsupported certification data type %u (expected 6, QE report certification data)",
                    q->cert_data_type);
    if (need("cert_data_size", sd + SD_CERT_SIZE_OFF, 4, sd_end, sdc, err) < 0)
        return -1;
    q->cert_data_size = rd32(buf + sd + SD_CERT_SIZE_OFF);
    cd = sd + SD_CERT_DATA_OFF;
    if (q->cert_data_size > sd_end - cd)
        return fail(err, "cert_data_size", sd + SD_CERT_SIZE_OFF,
                    "claims %lu bytes but only %zu remain in the signature data",
                    (unsigned long)q->cert_data_size, sd_end - cd);
    cd_end = cd + q->cert_data_size;

    if (need("qe_report", cd, QE_REPORT_LEN, cd_end, cdc, err) < 0)
        return -1;
    span(q, TDXQ_QE_REPORT, cd, QE_REPORT_LEN);
    qe_report_spans(q, buf, cd);
    pos = cd + QE_REPORT_LEN;
    if (need("qe_report_signature", pos, SIG_LEN, cd_end, cdc, err) < 0)
        return -1;
    span(q, TDXQ_QE_REPORT_SIGNATURE, pos, SIG_LEN);
    pos += SIG_LEN;
    if (need("qe_auth_data_size", pos, 2, cd_end, cdc, err) < 0)
        return -1;
    n = rd16(buf + pos);
    if (n > cd_end - (pos + 2))
        return fail(err, "qe_auth_data_size", pos,
                    "claims %zu bytes but only %zu remain in the certification data", n, cd_end - (pos + 2));
    span(q, TDXQ_QE_AUTH_DATA, pos + 2, n);
    pos += 2 + n;
    if (need("pck_cert_chain_type", pos, 2, cd_end, cdc, err) < 0)
        return -1;
    q->pck_cert_chain_type = rd16(buf + pos);
    if (q->pck_cert_chain_type < 1 || q->pck_cert_chain_type > CERT_TYPE_PCK_CHAIN)
        return fail(err, "pck_cert_chain_type", pos,
                    "unsupported nested certification data type %u (expected 1..5)", q->pck_cert_chain_type);
    pos += 2;
    if (need("pck_cert_chain_size", pos, 4, cd_end, cdc, err) < 0)
        return -1;
    q->pck_cert_chain_size = rd32(buf + pos);
    if (q->pck_cert_chain_size > cd_end - (pos + 4))
        return fail(err, "pck_cert_chain_size", pos,
                    "claims %lu bytes but only %zu remain in the certification data",
                    (unsigned long)q->pck_cert_chain_size, cd_end - (pos + 4));
    pos += 4;
    n = q->pck_cert_chain_size;
    /* PEM chains usually end with one NUL terminator; it is not part of the PEM text. */
    if (q->pck_cert_chain_type == CERT_TYPE_PCK_CHAIN && n > 0 && buf[pos + n - 1] == 0)
        n--;
    span(q, TDXQ_PCK_CERT_CHAIN, pos, n);
    return 0;
}

/* Header fields (v4 and v5), then the body type/size and the required body size per type. */
static int
parse_header(const uint8_t *buf, size_t len, struct tdxq_quote *q, struct tdxq_error *err)
{
    if (len < 2)
        return fail(err, "version", HDR_VERSION_OFF, "truncated: needs 2 bytes but the buffer has %zu", len);
    if ((buf[0] == 0xd8 && buf[1] == 0x3d) || (buf[0] == 0xd2 && buf[1] == 0x84))
        return fail(err, "version", HDR_VERSION_OFF,
                    "starts with %02x %02x: a CBOR/COSE-framed (DICE) TDX quote, which is not supported",
                    buf[0], buf[1]);
    if (need("header", 0, HEADER_LEN, len, "buffer", err) < 0)
        return -1;
    q->version = rd16(buf + HDR_VERSION_OFF);
    q->att_key_type = rd16(buf + HDR_ATT_KEY_TYPE_OFF);
    q->tee_type = rd32(buf + HDR_TEE_TYPE_OFF);
    q->qe_svn = rd16(buf + HDR_QE_SVN_OFF);
    q->pce_svn = rd16(buf + HDR_PCE_SVN_OFF);
    span(q, TDXQ_QE_VENDOR_ID, HDR_QE_VENDOR_ID_OFF, 16);
    span(q, TDXQ_USER_DATA, HDR_USER_DATA_OFF, 20);
    if (q->version != 4 && q->version != 5)
        return fail(err, "version", HDR_VERSION_OFF, "unsupported quote version %u (expected 4 or 5)", q->version);
    if (q->att_key_type != ATT_KEY_ECDSA_P256)
        return fail(err, "att_key_type", HDR_ATT_KEY_TYPE_OFF,
                    "unsupported attestation key type %u (expected 2, ECDSA-256-with-P-256)", q->att_key_type);
    if (q->tee_type != TDX_TEE_TYPE)
        return fail(err, "tee_type", HDR_TEE_TYPE_OFF, "not a TDX quote: TEE type 0x%08lx (expected 0x00000081)",
                    (unsigned long)q->tee_type);
    return 0;
}

/* The body descriptor: implicit for v4 (TDX 1.0), explicit (type, size) after the header for v5. */
static int
parse_body_descriptor(const uint8_t *buf, size_t len, struct tdxq_quote *q, size_t *body, struct tdxq_error *err)
{
    uint32_t want;

    if (q->version == 4) {
        *body = HEADER_LEN;
        q->body_type = 2;
        q->body_size = BODY_TD10;
        return 0;
    }
    if (need("body_type", V5_DESC_TYPE_OFF, 2, len, "buffer", err) < 0 ||
        need("body_size", V5_DESC_SIZE_OFF, 4, len, "buffer", err) < 0)
        return -1;
    q->body_type = rd16(buf + V5_DESC_TYPE_OFF);
    q->body_size = rd32(buf + V5_DESC_SIZE_OFF);
    switch (q->body_type) {
    case 2: want = BODY_TD10; break;
    case 3: want = BODY_TD15; break;
    case 4: want = BODY_TD15EX; break;
    case 1:
        return fail(err, "body_type", V5_DESC_TYPE_OFF, "body type 1 is an SGX enclave report, not a TD report");
    default:
        return fail(err, "body_type", V5_DESC_TYPE_OFF, "unsupported body type %u (expected 2, 3 or 4)",
                    q->body_type);
    }
    if (q->body_size != want)
        return fail(err, "body_size", V5_DESC_SIZE_OFF, "body type %u requires size %lu, got %lu", q->body_type,
                    (unsigned long)want, (unsigned long)q->body_size);
    *body = HEADER_LEN + V5_DESC_LEN;
    return 0;
}

int
tdxq_parse(const uint8_t *buf, size_t len, struct tdxq_quote *q, struct tdxq_error *err)
{
    size_t body = 0, sig_len_off, sd;

    memset(q, 0, sizeof(*q));
    if (parse_header(buf, len, q, err) < 0 || parse_body_descriptor(buf, len, q, &body, err) < 0)
        return -1;
    if (need("td_report_body", body, q->body_size, len, "buffer", err) < 0)
        return -1;
    body_spans(q, body);
    if (q->body_type == 4)
        q->vmid = buf[body + BODY_VMID_OFF];

    sig_len_off = body + q->body_size;
    if (need("sig_data_len", sig_len_off, 4, len, "buffer", err) < 0)
        return -1;
    q->signed_end = sig_len_off;
    q->sig_data_len = rd32(buf + sig_len_off);
    sd = sig_len_off + 4;
    if (q->sig_data_len > len - sd)
        return fail(err, "sig_data_len", sig_len_off, "claims %lu bytes but only %zu remain in the buffer",
                    (unsigned long)q->sig_data_len, len - sd);
    if (parse_sig_data(buf, q, sd, sd + q->sig_data_len, err) < 0)
        return -1;
    q->quote_len = sd + q->sig_data_len;
    q->trailing_len = len - q->quote_len;
    return 0;
}
