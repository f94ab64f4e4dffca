#!/bin/sh
# Set up and run the main job: a full simulated boot + service on this machine (no TDX, no GPU needed).
set -eu
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
. ./scripts/venv.sh
exec chutes-attest demo "$@"
