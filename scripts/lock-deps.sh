#!/bin/sh
# Regenerate the hash-pinned lock files from pyproject.toml (one line each; rerun after any dependency change):
#   requirements/runtime.txt  what the agent needs at run time (+ the journald extra), every artifact hashed
#   requirements/build.txt    what building the agent's own wheel needs (setuptools, wheel), hashed too
# Tool: uv (`pip install uv`); `pip-compile --generate-hashes` from pip-tools produces the same format.
set -eu
cd "$(dirname "$0")/.."
UV="${UV:-uv}"
common="--quiet --generate-hashes --python-version 3.11 --python-platform x86_64-unknown-linux-gnu"
# shellcheck disable=SC2086
"$UV" pip compile $common --extra journald --custom-compile-command scripts/lock-deps.sh \
    -o requirements/runtime.txt pyproject.toml
printf 'setuptools>=77\nwheel\n' | "$UV" pip compile $common --custom-compile-command scripts/lock-deps.sh -o requirements/build.txt -
