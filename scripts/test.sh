#!/usr/bin/env bash
# Set up a virtual environment (CPU torch, test extras, the optional backends that install on a CPU machine),
# check style and types (ruff, mypy), and run the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[test,quant,diffusers,deepspeed,plot]"
# Style and types first (seconds), then the tests.
.venv/bin/ruff check src tests benchmarks
.venv/bin/ruff format --check src tests benchmarks
.venv/bin/mypy src
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
