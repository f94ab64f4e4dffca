#!/bin/sh
# Build the libFuzzer harness over the C SEV-SNP report parser (ASan + UBSan) and run it, seeded with
# the real sample reports. Usage: scripts/fuzz-snp.sh [seconds]   (default 600; one core)
set -eu
SECONDS_TO_RUN="${1:-600}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SAMPLES="$ROOT/tests/data/sev-snp"
OUT="$ROOT/build/fuzz-snp"
mkdir -p "$OUT/corpus" "$OUT/artifacts"

clang -g -O1 -std=c11 -Wall -Wextra -Wconversion -Werror \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -o "$OUT/fuzz_snpreport" "$ROOT/native/fuzz/fuzz_snpreport.c" "$ROOT/native/snpreport_core.c"

# Seeds: every real report.
for f in "$SAMPLES"/*.bin; do
    cp -f "$f" "$OUT/corpus/"
done

# With -jobs, libFuzzer writes its log to ./fuzz-0.log: keep it under build/fuzz-snp.
cd "$OUT"
export ASAN_OPTIONS="abort_on_error=1:detect_leaks=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
"$OUT/fuzz_snpreport" -max_total_time="$SECONDS_TO_RUN" -workers=1 -jobs=1 -max_len=1400 \
    -dict="$ROOT/native/fuzz/snpreport.dict" -artifact_prefix="$OUT/artifacts/" -print_final_stats=1 \
    "$OUT/corpus" || { cat fuzz-0.log; exit 1; }
tail -n 8 fuzz-0.log
