/*
 * libFuzzer harness for the TDX quote parser core (tdxquote_core.c).
 *
 * Built with -fsanitize=fuzzer,address,undefined by scripts/fuzz-quote.sh. Besides letting the
 * sanitizers catch any out-of-bounds read, it checks the parser's own promises: every reported
 * field lies inside the quote, the quote plus the trailing bytes is the whole buffer, and errors
 * always name a field at an offset inside (or just past) the buffer.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "../tdxquote_core.h"

static volatile uint8_t sink;

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct tdxq_quote q;
    struct tdxq_error err;
    uint8_t acc = 0;
    size_t i, j;

    if (tdxq_parse(data, size, &q, &err) < 0) {
        if (err.field == NULL || err.msg[0] == '\0' || err.offset > size)
            __builtin_trap();
        return 0;
    }
    if (q.quote_len > size || q.quote_len + q.trailing_len != size || q.signed_end >= q.quote_len)
        __builtin_trap();
    if (q.version != 4 && q.version != 5)
        __builtin_trap();
    for (i = 0; i < TDXQ_FIELD_COUNT; i++) {
        if (!q.f[i].present)
            continue;
        if (q.f[i].off > q.quote_len || q.f[i].len > q.quote_len - q.f[i].off)
            __builtin_trap();
        for (j = 0; j < q.f[i].len; j++)    /* ASan flags any byte outside the input */
            acc ^= data[q.f[i].off + j];
    }
    if (!q.f[TDXQ_REPORT_DATA].present || !q.f[TDXQ_PCK_CERT_CHAIN].present)
        __builtin_trap();
    sink = acc;
    return 0;
}
