#!/bin/sh
# Build the chutes-attest Debian package from this checkout as it is now (tracked files plus untracked,
# not-ignored ones), in a scratch copy so the working tree gets no build debris; then run lintian.
#   scripts/build-deb.sh [OUTDIR]        default OUTDIR: .cache/deb
# Prints the path of the .deb on the last line. Needs: debhelper, python3.11-dev/-venv, python3-pip,
# libsystemd-dev, pkg-config, lintian (scripts/install-deps.sh), and network access to PyPI (or
# CHUTES_ATTEST_PIP_INDEX) for the hash-pinned wheels in requirements/runtime.txt.
# LINTIAN=no skips lintian.
set -eu
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${1:-$REPO/.cache/deb}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d /tmp/chutes-attest-deb.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
VERSION="$(dpkg-parsechangelog -l "$REPO/debian/changelog" -S Version)"
SRC="$WORK/chutes-attest-$VERSION"
mkdir "$SRC"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard | xargs -0 sh -c '
    for f; do [ -e "$f" ] || [ -L "$f" ] && printf "%s\0" "$f"; done' sh) \
    | (cd "$REPO" && tar --null -T - -cf -) | tar -C "$SRC" -xf -
# SOURCE_DATE_EPOCH for the package (man page date, mtimes): the changelog's date unless given
(cd "$SRC" && dpkg-buildpackage -us -uc -b >"$WORK/build.log" 2>&1) || {
    tail -n 60 "$WORK/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed (log above)" >&2
    exit 1
}
DEB="$(ls "$WORK"/chutes-attest_"$VERSION"_*.deb)"
cp "$DEB" "$WORK"/*.changes "$WORK"/*.buildinfo "$OUT"/
DEB="$OUT/$(basename "$DEB")"
if [ "${LINTIAN:-yes}" != no ]; then
    # errors and warnings fail the build; each remaining warning is explained in debian/*lintian-overrides
    lintian --fail-on error,warning --display-info "$OUT/$(basename "$DEB" .deb | sed 's/_[^_]*$//')"_*.changes
fi
echo "$DEB"
