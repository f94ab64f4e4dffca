/*
 * AMD SEV-SNP ATTESTATION_REPORT parser (versions 2 to 5), free of Python so the fuzz harness can
 * link it alone.
 *
 * The report is one fixed 1184-byte little-endian structure, so there are no length fields to
 * trust: snpr_parse() requires the exact length, checks the version, signature algorithm, KEY_INFO,
 * POLICY and every must-be-zero range of that version, and decodes the integer fields. Byte fields
 * are fixed (offset, length) pairs from the table below. Layout reference:
 * docs/reference/sev-snp.md section 1 (1.2 fields, 1.4 policy, 1.6 key info, 1.8 CPUID, 1.10 checks).
 */
#ifndef SNPREPORT_CORE_H
#define SNPREPORT_CORE_H

#include <stddef.h>
#include <stdint.h>

#define SNPR_REPORT_LEN 1184u      /* 0x4A0 */
#define SNPR_SIGNED_LEN 0x2A0u     /* the ECDSA P-384/SHA-384 signature covers [0, 0x2A0) */
#define SNPR_MIN_VERSION 2u
#define SNPR_MAX_VERSION 5u

/*
 * The byte-string fields, defined once: X(ID, "python_name", offset, length, first version, "doc").
 * A field is present (else None) from the given report version on. The table expands into the enum
 * below, the Python getters of snpreport.c and the module's BYTES_FIELDS tuple; its order is the
 * output order of SnpReport.to_dict().
 */
#define SNPR_BYTES_FIELDS(X) \
    X(FAMILY_ID, "family_id", 0x010, 16, 2, "ID block family ID (16 bytes)") \
    X(IMAGE_ID, "image_id", 0x020, 16, 2, "ID block image ID (16 bytes)") \
    X(CURRENT_TCB, "current_tcb", 0x038, 8, 2, "TCB_VERSION now (8 raw bytes; decode_tcb)") \
    X(REPORT_DATA, "report_data", 0x050, 64, 2, "guest-supplied REPORT_DATA (64 bytes)") \
    X(MEASUREMENT, "measurement", 0x090, 48, 2, "launch digest (48 bytes)") \
    X(HOST_DATA, "host_data", 0x0C0, 32, 2, "hypervisor-supplied data (32 bytes, not measured)") \
    X(ID_KEY_DIGEST, "id_key_digest", 0x0E0, 48, 2, "SHA-384 of the ID-block key (48 bytes)") \
    X(AUTHOR_KEY_DIGEST, "author_key_digest", 0x110, 48, 2, "SHA-384 of the author key (48 bytes)") \
    X(REPORT_ID, "report_id", 0x140, 32, 2, "per-guest report ID (32 bytes)") \
    X(REPORT_ID_MA, "report_id_ma", 0x160, 32, 2, "migration agent report ID (32 bytes)") \
    X(REPORTED_TCB, "reported_tcb", 0x180, 8, 2, "TCB the VEK was derived for (8 raw bytes)") \
    X(CHIP_ID, "chip_id", 0x1A0, 64, 2, "CHIP_ID (64 bytes; zero when masked; Turin uses 8)") \
    X(COMMITTED_TCB, "committed_tcb", 0x1E0, 8, 2, "committed TCB_VERSION (8 raw bytes)") \
    X(LAUNCH_TCB, "launch_tcb", 0x1F0, 8, 2, "CURRENT_TCB at launch (8 raw bytes)") \
    X(SIGNATURE_R, "signature_r", 0x2A0, 72, 2, "ECDSA r, 72 bytes little-endian") \
    X(SIGNATURE_S, "signature_s", 0x2E8, 72, 2, "ECDSA s, 72 bytes little-endian")

#define SNPR_BYTES_ENUM(id, name, off, len, ver, doc) SNPR_B_##id,
enum snpr_bytes_field { SNPR_BYTES_FIELDS(SNPR_BYTES_ENUM) SNPR_BYTES_COUNT };
#undef SNPR_BYTES_ENUM

/*
 * The integer fields, defined once: X(ID, "python_name", offset, width in bytes, first version,
 * "doc"). Little-endian, unsigned; None before the first version. Order = to_dict() order.
 */
#define SNPR_INT_FIELDS(X) \
    X(VERSION, "version", 0x000, 4, 2, "report version (2 to 5)") \
    X(GUEST_SVN, "guest_svn", 0x004, 4, 2, "guest SVN from the ID block") \
    X(POLICY, "policy", 0x008, 8, 2, "guest POLICY (bit 19 DEBUG)") \
    X(VMPL, "vmpl", 0x030, 4, 2, "VMPL the report was requested for") \
    X(SIGNATURE_ALGO, "signature_algo", 0x034, 4, 2, "1 = ECDSA P-384 with SHA-384") \
    X(PLATFORM_INFO, "platform_info", 0x040, 8, 2, "PLATFORM_INFO bits") \
    X(KEY_INFO, "key_info", 0x048, 4, 2, "KEY_INFO: bit 0 AUTHOR_KEY_EN, 1 MASK_CHIP_KEY, 4:2 SIGNING_KEY") \
    X(CPUID_FAM_ID, "cpuid_fam_id", 0x188, 1, 3, "CPUID family (v3+, else None)") \
    X(CPUID_MOD_ID, "cpuid_mod_id", 0x189, 1, 3, "CPUID model (v3+, else None)") \
    X(CPUID_STEP, "cpuid_step", 0x18A, 1, 3, "CPUID stepping (v3+, else None)") \
    X(CURRENT_BUILD, "current_build", 0x1E8, 1, 2, "firmware build now") \
    X(CURRENT_MINOR, "current_minor", 0x1E9, 1, 2, "firmware minor now") \
    X(CURRENT_MAJOR, "current_major", 0x1EA, 1, 2, "firmware major now") \
    X(COMMITTED_BUILD, "committed_build", 0x1EC, 1, 2, "committed firmware build") \
    X(COMMITTED_MINOR, "committed_minor", 0x1ED, 1, 2, "committed firmware minor") \
    X(COMMITTED_MAJOR, "committed_major", 0x1EE, 1, 2, "committed firmware major") \
    X(LAUNCH_MIT_VECTOR, "launch_mit_vector", 0x1F8, 8, 5, "mitigation vector at launch (v5+, else None)") \
    X(CURRENT_MIT_VECTOR, "current_mit_vector", 0x200, 8, 5, "mitigation vector now (v5+, else None)")

#define SNPR_INT_ENUM(id, name, off, width, ver, doc) SNPR_I_##id,
enum snpr_int_field { SNPR_INT_FIELDS(SNPR_INT_ENUM) SNPR_INT_COUNT };
#undef SNPR_INT_ENUM

/* Named bits (section 1.4 to 1.6). */
#define SNPR_POLICY_RESERVED_ONE (1ull << 17)
#define SNPR_POLICY_DEBUG (1ull << 19)
#define SNPR_POLICY_MBZ_MASK (~((1ull << 26) - 1))             /* bits 63:26 */
#define SNPR_PLATFORM_KNOWN_MASK 0xBFull                      /* bits 0-5 and 7; bit 6 is reserved */
#define SNPR_KEY_INFO_MBZ_MASK 0xFFFFFFE0u                    /* bits 31:5 */
#define SNPR_SIGNING_KEY(key_info) (((key_info) >> 2) & 7u)   /* 0 VCEK, 1 VLEK, 7 none */

/* Product line from CPUID family/model (section 1.8); Bergamo and Siena share Genoa's keys. */
enum snpr_product { SNPR_PRODUCT_UNKNOWN = 0, SNPR_PRODUCT_MILAN, SNPR_PRODUCT_GENOA, SNPR_PRODUCT_TURIN };

struct snpr_report {
    uint64_t v[SNPR_INT_COUNT];  /* decoded integer fields (0 where absent for the version) */
    uint32_t version;
    unsigned signing_key;        /* KEY_INFO bits 4:2: 0 VCEK or 1 VLEK */
    int debug;                   /* POLICY bit 19 */
    uint64_t platform_unknown_bits;
    enum snpr_product product;   /* SNPR_PRODUCT_UNKNOWN on v2 or an unknown CPU */
};

struct snpr_error {
    const char *field;           /* static string naming the offending field */
    size_t offset;               /* absolute offset: the field, or the first non-zero reserved byte */
    char msg[256];               /* full human-readable message */
};

struct snpr_bytes_desc { size_t off, len; uint32_t first_version; };
struct snpr_int_desc { size_t off, width; uint32_t first_version; };

extern const struct snpr_bytes_desc snpr_bytes_desc[SNPR_BYTES_COUNT];
extern const struct snpr_int_desc snpr_int_desc[SNPR_INT_COUNT];

/* Returns 0 and fills *r on success; returns -1 and fills *err on malformed input. */
int snpr_parse(const uint8_t *buf, size_t len, struct snpr_report *r, struct snpr_error *err);

/* "Milan", "Genoa", "Turin" or NULL. */
const char *snpr_product_name(enum snpr_product p);

/* The product line for a CPUID family/model pair (section 1.8). */
enum snpr_product snpr_product_from_cpuid(unsigned family, unsigned model);

#endif
