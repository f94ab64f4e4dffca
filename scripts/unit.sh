#!/bin/sh
# The fast local loop: any user, any Linux with Python 3.11+ and a C compiler; no root, no system packages.
# Creates .venv-unit with the project and the pure test tools, then runs the unit tier.
# Usage: ./scripts/unit.sh [extra pytest args]
set -eu
cd "$(dirname "$0")/.."
VENV="${CHUTES_ATTEST_UNIT_VENV:-.venv-unit}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
stamp="$VENV/.installed-$(cat pyproject.toml setup.py native/*.c native/*.h 2>/dev/null | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    python -m pip install -q --upgrade pip setuptools wheel
    python -m pip install -q -e ".[unit]"
    rm -f "$VENV"/.installed-* && touch "$stamp"
fi
mypy  # the type check is part of the loop ([tool.mypy] in pyproject.toml)
python -m pytest -m unit -q "$@"
