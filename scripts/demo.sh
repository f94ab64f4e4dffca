#!/bin/sh
# Set up and run the main job: a full simulated boot (VM generation 1.4.0 by default; --protocol 1.3|1.2)
# + service on this machine (no TDX, no GPU needed). Arguments go to `chutes-attest demo` (--once, --fail ...).
set -eu
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
. ./scripts/venv.sh
exec chutes-attest demo "$@"
