/*
 * libFuzzer harness for the SEV-SNP report parser core (snpreport_core.c).
 *
 * Built with -fsanitize=fuzzer,address,undefined by scripts/fuzz-snp.sh. Besides letting the
 * sanitizers catch any out-of-bounds read, it checks the parser's own promises against the rules
 * restated here: a report is accepted only when it is exactly 1184 bytes, version 2..5,
 * SIGNATURE_ALGO 1, KEY_INFO clean with SIGNING_KEY 0/1, POLICY bit 17 set and bits 63:26 clear,
 * and every must-be-zero byte of its version zero; every field it describes lies inside the
 * report; errors always name a field at an offset inside the buffer.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "../snpreport_core.h"

static volatile uint8_t sink;

static uint64_t
le(const uint8_t *p, size_t n)
{
    uint64_t v = 0;

    while (n-- > 0)
        v = (v << 8) | p[n];
    return v;
}

static int
zero(const uint8_t *p, size_t a, size_t b)
{
    for (; a < b; a++)
        if (p[a] != 0)
            return 0;
    return 1;
}

/* The acceptance rules, restated independently of snpreport_core.c (sev-snp.md section 1.10). */
static int
model_valid(const uint8_t *d, size_t size)
{
    uint64_t version, policy, key_info;

    if (size != SNPR_REPORT_LEN)
        return 0;
    version = le(d, 4);
    policy = le(d + 8, 8);
    key_info = le(d + 0x48, 4);
    if (version < 2 || version > 5 || le(d + 0x34, 4) != 1)
        return 0;
    if ((key_info >> 5) != 0 || ((key_info >> 2) & 7) > 1)
        return 0;
    if (((policy >> 17) & 1) == 0 || (policy >> 26) != 0)
        return 0;
    if (!zero(d, 0x4C, 0x50) || !zero(d, version == 2 ? 0x188 : 0x18B, 0x1A0) || !zero(d, 0x1EB, 0x1EC) ||
        !zero(d, 0x1EF, 0x1F0) || !zero(d, version == 5 ? 0x208 : 0x1F8, 0x2A0) || !zero(d, 0x330, 0x4A0))
        return 0;
    return 1;
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct snpr_report r;
    struct snpr_error err;
    uint8_t acc = 0;
    size_t i, j;
    int valid = model_valid(data, size);

    memset(&err, 0, sizeof(err));
    if (snpr_parse(data, size, &r, &err) < 0) {
        if (valid || err.field == NULL || err.msg[0] == '\0' || (size > 0 && err.offset >= size) ||
            (size == 0 && err.offset != 0))
            __builtin_trap();
        return 0;
    }
    if (!valid || r.version < 2 || r.version > 5 || r.signing_key > 1)
        __builtin_trap();
    if (r.debug != (int)((le(data + 8, 8) >> 19) & 1) || r.platform_unknown_bits != (le(data + 0x40, 8) & ~0xBFull))
        __builtin_trap();
    for (i = 0; i < SNPR_BYTES_COUNT; i++) {
        const struct snpr_bytes_desc *b = &snpr_bytes_desc[i];

        if (b->off > size || b->len > size - b->off)
            __builtin_trap();
        for (j = 0; j < b->len; j++)    /* ASan flags any byte outside the input */
            acc ^= data[b->off + j];
    }
    for (i = 0; i < SNPR_INT_COUNT; i++) {
        const struct snpr_int_desc *d = &snpr_int_desc[i];
        uint64_t want = r.version >= d->first_version ? le(data + d->off, d->width) : 0;

        if (d->off + d->width > SNPR_SIGNED_LEN || r.v[i] != want)
            __builtin_trap();
    }
    if (snpr_product_name(r.product) == NULL && r.product != SNPR_PRODUCT_UNKNOWN)
        __builtin_trap();
    sink = acc;
    return 0;
}
