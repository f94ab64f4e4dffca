# Sourced by the other scripts: create/refresh .venv with the project (C extension compiled) and extras.
# shellcheck shell=sh
VENV="${CHUTES_ATTEST_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
stamp="$VENV/.installed-$(cat pyproject.toml setup.py native/*.c native/*.h 2>/dev/null | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    python -m pip install -q --upgrade pip setuptools wheel
    python -m pip install -q -e ".[test,journald,tpm,sim]"
    rm -f "$VENV"/.installed-* && touch "$stamp"
fi
