/*
 * TDX quote layout parser; see tdxquote_core.h. Every read goes through rd16/rd32 after a bounds
 * check against the enclosing container, and all offset arithmetic is done in size_t with the
 * "size <= end - pos" form so a hostile length cannot wrap.
 */
#include "tdxquote_core.h"

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

static int
fail(struct tdxq_error *err, const char *field, size_t offset, const char *reason)
{
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
    char reason[112];

    if (pos <= end && size <= end - pos)
        return 0;
    snprintf(reason, sizeof(reason), "truncated: needs %zu bytes but the %s ends at offset %zu",
             size, container, end);
    return fail(err, field, pos, reason);
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
    span(q, TDXQ_QE_CPU_SVN, r + 0, 16);
    q->qe_misc_select = rd32(buf + r + 16);
    span(q, TDXQ_QE_ATTRIBUTES, r + 48, 16);
    span(q, TDXQ_QE_MR_ENCLAVE, r + 64, 32);
    span(q, TDXQ_QE_MR_SIGNER, r + 128, 32);
    q->qe_isv_prod_id = rd16(buf + r + 256);
    q->qe_isv_svn = rd16(buf + r + 258);
    span(q, TDXQ_QE_REPORT_DATA, r + 320, 64);
}

/* Signature data: ECDSA sig, attestation key, certification data type 6 wrapping the QE report,
 * its signature, the QE auth data and the nested certification data (normally a PEM chain). */
static int
parse_sig_data(const uint8_t *buf, struct tdxq_quote *q, size_t sd, size_t sd_end,
               struct tdxq_error *err)
{
    const char *sdc = "signature data", *cdc = "certification data";
    char reason[112];
    size_t cd, cd_end, pos, n;

    if (need("signature", sd, SIG_LEN, sd_end, sdc, err) < 0)
        return -1;
    span(q, TDXQ_SIGNATURE, sd, SIG_LEN);
    if (need("attestation_key", sd + 64, KEY_LEN, sd_end, sdc, err) < 0)
        return -1;
    span(q, TDXQ_ATTESTATION_KEY, sd + 64, KEY_LEN);
    if (need("cert_data_type", sd + 128, 2, sd_end, sdc, err) < 0)
        return -1;
    q->cert_data_type = rd16(buf + sd + 128);
    if (q->cert_data_type != CERT_TYPE_QE_REPORT) {
        snprintf(reason, sizeof(reason),
                 "unsupported certification data type %u (expected 6, QE report certification data)",
                 q->cert_data_type);
        return fail(err, "cert_data_type", sd + 128, reason);
    }
    if (need("cert_data_size", sd + 130, 4, sd_end, sdc, err) < 0)
        return -1;
    q->cert_data_size = rd32(buf + sd + 130);
    cd = sd + 134;
    if (q->cert_data_size > sd_end - cd) {
        snprintf(reason, sizeof(reason), "claims %lu bytes but only %zu remain in the signature data",
                 (unsigned long)q->cert_data_size, sd_end - cd);
        return fail(err, "cert_data_size", sd + 130, reason);
    }
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
    if (n > cd_end - (pos + 2)) {
        snprintf(reason, sizeof(reason), "claims %zu bytes but only %zu remain in the certification data",
                 n, cd_end - (pos + 2));
        return fail(err, "qe_auth_data_size", pos, reason);
    }
    span(q, TDXQ_QE_AUTH_DATA, pos + 2, n);
    pos += 2 + n;
    if (need("pck_cert_chain_type", pos, 2, cd_end, cdc, err) < 0)
        return -1;
    q->pck_cert_chain_type = rd16(buf + pos);
    if (q->pck_cert_chain_type < 1 || q->pck_cert_chain_type > CERT_TYPE_PCK_CHAIN) {
        snprintf(reason, sizeof(reason), "unsupported nested certification data type %u (expected 1..5)",
                 q->pck_cert_chain_type);
        return fail(err, "pck_cert_chain_type", pos, reason);
    }
    pos += 2;
    if (need("pck_cert_chain_size", pos, 4, cd_end, cdc, err) < 0)
        return -1;
    q->pck_cert_chain_size = rd32(buf + pos);
    if (q->pck_cert_chain_size > cd_end - (pos + 4)) {
        snprintf(reason, sizeof(reason), "claims %lu bytes but only %zu remain in the certification data",
                 (unsigned long)q->pck_cert_chain_size, cd_end - (pos + 4));
        return fail(err, "pck_cert_chain_size", pos, reason);
    }
    pos += 4;
    n = q->pck_cert_chain_size;
    /* PEM chains usually end with one NUL terminator; it is not part of the PEM text. */
    if (q->pck_cert_chain_type == CERT_TYPE_PCK_CHAIN && n > 0 && buf[pos + n - 1] == 0)
        n--;
    span(q, TDXQ_PCK_CERT_CHAIN, pos, n);
    return 0;
}

int
tdxq_parse(const uint8_t *buf, size_t len, struct tdxq_quote *q, struct tdxq_error *err)
{
    char reason[112];
    size_t body, sig_len_off, sd;
    uint32_t want;

    memset(q, 0, sizeof(*q));
    if (len < 2) {
        snprintf(reason, sizeof(reason), "truncated: needs 2 bytes but the buffer has %zu", len);
        return fail(err, "version", 0, reason);
    }
    if ((buf[0] == 0xd8 && buf[1] == 0x3d) || (buf[0] == 0xd2 && buf[1] == 0x84)) {
        snprintf(reason, sizeof(reason),
                 "starts with %02x %02x: a CBOR/COSE-framed (DICE) TDX quote, which is not supported",
                 buf[0], buf[1]);
        return fail(err, "version", 0, reason);
    }
    if (need("header", 0, HEADER_LEN, len, "buffer", err) < 0)
        return -1;
    q->version = rd16(buf);
    q->att_key_type = rd16(buf + 2);
    q->tee_type = rd32(buf + 4);
    q->qe_svn = rd16(buf + 8);
    q->pce_svn = rd16(buf + 10);
    span(q, TDXQ_QE_VENDOR_ID, 12, 16);
    span(q, TDXQ_USER_DATA, 28, 20);
    if (q->version != 4 && q->version != 5) {
        snprintf(reason, sizeof(reason), "unsupported quote version %u (expected 4 or 5)", q->version);
        return fail(err, "version", 0, reason);
    }
    if (q->att_key_type != ATT_KEY_ECDSA_P256) {
        snprintf(reason, sizeof(reason),
                 "unsupported attestation key type %u (expected 2, ECDSA-256-with-P-256)", q->att_key_type);
        return fail(err, "att_key_type", 2, reason);
    }
    if (q->tee_type != TDX_TEE_TYPE) {
        snprintf(reason, sizeof(reason), "not a TDX quote: TEE type 0x%08lx (expected 0x00000081)",
                 (unsigned long)q->tee_type);
        return fail(err, "tee_type", 4, reason);
    }

    if (q->version == 4) {
        body = HEADER_LEN;
        q->body_type = 2;
        q->body_size = BODY_TD10;
    } else {
        if (need("body_type", HEADER_LEN, 2, len, "buffer", err) < 0 ||
            need("body_size", HEADER_LEN + 2, 4, len, "buffer", err) < 0)
            return -1;
        q->body_type = rd16(buf + HEADER_LEN);
        q->body_size = rd32(buf + HEADER_LEN + 2);
        switch (q->body_type) {
        case 2: want = BODY_TD10; break;
        case 3: want = BODY_TD15; break;
        case 4: want = BODY_TD15EX; break;
        case 1:
            return fail(err, "body_type", HEADER_LEN,
                        "body type 1 is an SGX enclave report, not a TD report");
        default:
            snprintf(reason, sizeof(reason), "unsupported body type %u (expected 2, 3 or 4)", q->body_type);
            return fail(err, "body_type", HEADER_LEN, reason);
        }
        if (q->body_size != want) {
            snprintf(reason, sizeof(reason), "body type %u requires size %lu, got %lu", q->body_type,
                     (unsigned long)want, (unsigned long)q->body_size);
            return fail(err, "body_size", HEADER_LEN + 2, reason);
        }
        body = HEADER_LEN + V5_DESC_LEN;
    }
    if (need("td_report_body", body, q->body_size, len, "buffer", err) < 0)
        return -1;
    body_spans(q, body);
    if (q->body_type == 4)
        q->vmid = buf[body + 648];

    sig_len_off = body + q->body_size;
    if (need("sig_data_len", sig_len_off, 4, len, "buffer", err) < 0)
        return -1;
    q->signed_end = sig_len_off;
    q->sig_data_len = rd32(buf + sig_len_off);
    sd = sig_len_off + 4;
    if (q->sig_data_len > len - sd) {
        snprintf(reason, sizeof(reason), "claims %lu bytes but only %zu remain in the buffer",
                 (unsigned long)q->sig_data_len, len - sd);
        return fail(err, "sig_data_len", sig_len_off, reason);
    }
    if (parse_sig_data(buf, q, sd, sd + q->sig_data_len, err) < 0)
        return -1;
    q->quote_len = sd + q->sig_data_len;
    q->trailing_len = len - q->quote_len;
    return 0;
}
