/*
 * SEV-SNP ATTESTATION_REPORT parser; see snpreport_core.h. The length is checked first and is
 * exact, so every later read is at a constant offset below SNPR_REPORT_LEN.
 */
#include "snpreport_core.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#define OFF_VERSION 0x000u
#define OFF_POLICY 0x008u
#define OFF_SIGNATURE_ALGO 0x034u
#define OFF_KEY_INFO 0x048u
#define SIG_ALGO_ECDSA_P384_SHA384 1u

#define BYTES_DESC(id, name, off, len, ver, doc) [SNPR_B_##id] = {off, len, ver},
const struct snpr_bytes_desc snpr_bytes_desc[SNPR_BYTES_COUNT] = {SNPR_BYTES_FIELDS(BYTES_DESC)};
#undef BYTES_DESC

#define INT_DESC(id, name, off, width, ver, doc) [SNPR_I_##id] = {off, width, ver},
const struct snpr_int_desc snpr_int_desc[SNPR_INT_COUNT] = {SNPR_INT_FIELDS(INT_DESC)};
#undef INT_DESC

/* Must-be-zero ranges, [start, end) with the versions they apply to (section 0.1 / 1.2). */
static const struct {
    const char *field;
    size_t start, end;
    uint32_t min_version, max_version;
} mbz[] = {
    {"reserved_04c", 0x04C, 0x050, 2, 5},
    {"reserved_188", 0x188, 0x1A0, 2, 2},      /* v2: no CPUID bytes */
    {"reserved_18b", 0x18B, 0x1A0, 3, 5},
    {"reserved_1eb", 0x1EB, 0x1EC, 2, 5},
    {"reserved_1ef", 0x1EF, 0x1F0, 2, 5},
    {"reserved_1f8", 0x1F8, 0x2A0, 2, 4},      /* before v5: no mitigation vectors */
    {"reserved_208", 0x208, 0x2A0, 5, 5},
    {"signature_reserved", 0x330, 0x4A0, 2, 5},
};

static uint64_t
rd_le(const uint8_t *p, size_t width)
{
    uint64_t v = 0;
    size_t i;

    for (i = width; i > 0; i--)
        v = (v << 8) | p[i - 1];
    return v;
}

static uint32_t
rd32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t
rd64(const uint8_t *p)
{
    return (uint64_t)rd32(p) | ((uint64_t)rd32(p + 4) << 32);
}

/* The one error helper: records the field and its offset, formats "field 'f' at offset 0xNNN: <reason>". */
static int __attribute__((format(printf, 4, 5)))
fail(struct snpr_error *err, const char *field, size_t offset, const char *fmt, ...)
{
    char reason[180];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(reason, sizeof(reason), fmt, ap);
    va_end(ap);
    err->field = field;
    err->offset = offset;
    snprintf(err->msg, sizeof(err->msg), "field '%s' at offset 0x%03zx: %s", field, offset, reason);
    return -1;
}

/* Offset of the first non-zero byte in [start, end), or end when all are zero; 8 bytes at a time. */
static size_t
first_nonzero(const uint8_t *buf, size_t start, size_t end)
{
    size_t i = start;
    uint64_t w;

    while (i < end && (i & 7u) != 0) {
        if (buf[i] != 0)
            return i;
        i++;
    }
    for (; end - i >= 8; i += 8) {
        memcpy(&w, buf + i, 8);
        if (w != 0)
            break;
    }
    for (; i < end; i++) {
        if (buf[i] != 0)
            return i;
    }
    return end;
}

enum snpr_product
snpr_product_from_cpuid(unsigned family, unsigned model)
{
    if (family == 0x19) {
        if (model <= 0x0F)
            return SNPR_PRODUCT_MILAN;
        if (model <= 0x1F || (model >= 0xA0 && model <= 0xAF))
            return SNPR_PRODUCT_GENOA;   /* Genoa, and Bergamo/Siena on Genoa's keys */
        return SNPR_PRODUCT_UNKNOWN;
    }
    if (family == 0x1A && model <= 0x11)
        return SNPR_PRODUCT_TURIN;
    return SNPR_PRODUCT_UNKNOWN;
}

const char *
snpr_product_name(enum snpr_product p)
{
    switch (p) {
    case SNPR_PRODUCT_MILAN:
        return "Milan";
    case SNPR_PRODUCT_GENOA:
        return "Genoa";
    case SNPR_PRODUCT_TURIN:
        return "Turin";
    case SNPR_PRODUCT_UNKNOWN:
        break;
    }
    return NULL;
}

int
snpr_parse(const uint8_t *buf, size_t len, struct snpr_report *r, struct snpr_error *err)
{
    uint32_t version, algo, key_info;
    uint64_t policy;
    unsigned signing_key;
    size_t i;

    if (len != SNPR_REPORT_LEN)
        return fail(err, "report", 0, "length %zu bytes, an SEV-SNP report is exactly %u bytes", len,
                    SNPR_REPORT_LEN);
    version = rd32(buf + OFF_VERSION);
    if (version < SNPR_MIN_VERSION || version > SNPR_MAX_VERSION)
        return fail(err, "version", OFF_VERSION, "unsupported report version %u (expected %u to %u)", version,
                    SNPR_MIN_VERSION, SNPR_MAX_VERSION);
    algo = rd32(buf + OFF_SIGNATURE_ALGO);
    if (algo != SIG_ALGO_ECDSA_P384_SHA384)
        return fail(err, "signature_algo", OFF_SIGNATURE_ALGO,
                    "signature algorithm %u, expected 1 (ECDSA P-384 with SHA-384)", algo);
    key_info = rd32(buf + OFF_KEY_INFO);
    if (key_info & SNPR_KEY_INFO_MBZ_MASK)
        return fail(err, "key_info", OFF_KEY_INFO, "KEY_INFO 0x%08x has reserved bits 31:5 set (0x%08x)", key_info,
                    key_info & SNPR_KEY_INFO_MBZ_MASK);
    signing_key = SNPR_SIGNING_KEY(key_info);
    if (signing_key == 7)
        return fail(err, "key_info", OFF_KEY_INFO, "SIGNING_KEY 7: the report is unsigned (KEY_INFO 0x%08x)",
                    key_info);
    if (signing_key > 1)
        return fail(err, "key_info", OFF_KEY_INFO,
                    "SIGNING_KEY %u is reserved (expected 0 VCEK or 1 VLEK; KEY_INFO 0x%08x)", signing_key, key_info);
    policy = rd64(buf + OFF_POLICY);
    if (!(policy & SNPR_POLICY_RESERVED_ONE))
        return fail(err, "policy", OFF_POLICY, "POLICY 0x%016llx has reserved bit 17 clear (it must be 1)",
                    (unsigned long long)policy);
    if (policy & SNPR_POLICY_MBZ_MASK)
        return fail(err, "policy", OFF_POLICY, "POLICY 0x%016llx has reserved bits 63:26 set (0x%016llx)",
                    (unsigned long long)policy, (unsigned long long)(policy & SNPR_POLICY_MBZ_MASK));
    for (i = 0; i < sizeof(mbz) / sizeof(mbz[0]); i++) {
        size_t at;

        if (version < mbz[i].min_version || version > mbz[i].max_version)
            continue;
        at = first_nonzero(buf, mbz[i].start, mbz[i].end);
        if (at != mbz[i].end)
            return fail(err, mbz[i].field, at, "reserved bytes 0x%03zx-0x%03zx must be zero (byte 0x%02x at 0x%03zx)",
                        mbz[i].start, mbz[i].end - 1, buf[at], at);
    }
    for (i = 0; i < SNPR_INT_COUNT; i++)
        r->v[i] = version >= snpr_int_desc[i].first_version
                      ? rd_le(buf + snpr_int_desc[i].off, snpr_int_desc[i].width) : 0;
    r->version = version;
    r->signing_key = signing_key;
    r->debug = (policy & SNPR_POLICY_DEBUG) != 0;
    r->platform_unknown_bits = r->v[SNPR_I_PLATFORM_INFO] & ~SNPR_PLATFORM_KNOWN_MASK;
    r->product = version >= 3 ? snpr_product_from_cpuid((unsigned)r->v[SNPR_I_CPUID_FAM_ID],
                                                        (unsigned)r->v[SNPR_I_CPUID_MOD_ID])
                              : SNPR_PRODUCT_UNKNOWN;
    return 0;
}
