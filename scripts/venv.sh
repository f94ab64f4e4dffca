# Sourced by the other scripts: create/refresh a venv with the project (C extension compiled) and extras.
# CHUTES_ATTEST_VENV (default .venv) and CHUTES_ATTEST_EXTRAS (default test,journald,tpm,sim) pick which.
# shellcheck shell=sh
VENV="${CHUTES_ATTEST_VENV:-.venv}"
EXTRAS="${CHUTES_ATTEST_EXTRAS:-test,journald,tpm,sim}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
. "$VENV/bin/activate"
stamp="$VENV/.installed-$( (echo "$EXTRAS"; cat pyproject.toml setup.py native/*.c native/*.h) 2>/dev/null | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    python -m pip install -q --upgrade pip setuptools wheel
    python -m pip install -q -e ".[$EXTRAS]"
    rm -f "$VENV"/.installed-* && touch "$stamp"
fi
