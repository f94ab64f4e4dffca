#!/bin/sh
# Set up everything (apt packages, a virtualenv with the project and its test extras) and run all tests.
# Usage: ./scripts/test.sh [extra pytest args]
set -eu
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
. ./scripts/venv.sh
ruff check agent tests bench initramfs scripts
mypy  # [tool.mypy] in pyproject.toml: all of agent/, strict on quote/ evidence/ validator/
python -m pytest "$@"
