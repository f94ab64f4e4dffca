#!/bin/sh
# The fast local loop: any user, any Linux with Python 3.11+ and a C compiler; no root, no system packages.
# Creates .venv-unit with the project and the pure test tools only, then runs ruff, mypy and the unit tier.
# Usage: ./scripts/unit.sh [extra pytest args]
set -eu
cd "$(dirname "$0")/.."
CHUTES_ATTEST_VENV="${CHUTES_ATTEST_UNIT_VENV:-.venv-unit}" CHUTES_ATTEST_EXTRAS=unit . ./scripts/venv.sh
ruff check agent tests bench initramfs scripts
mypy
python -m pytest -m unit -q -n auto "$@"  # pytest-xdist: one worker per CPU
