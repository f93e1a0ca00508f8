#!/usr/bin/env bash
# The one prepared script for a lent GPU machine (see ../.library/device): the GPU-marked tests,
# then every benchmark on the card, with the card's name printed beside the figures.
#
# The device image has torch, transformers, safetensors, numpy, click, tqdm, matplotlib, pytest,
# but nothing can be installed there: carry the rest as wheels. Once, here, in the repo root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl transformer-lens==4.3.0 datasets==5.2.0 zarr==3.1.6 numcodecs donfig dill multiprocess \
#     fancy-einsum beartype typeguard
# then run:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The smollm2 benchmark is skipped there: its wheel (93 MB) exceeds what a call can carry.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -m gpu -p no:cacheprovider
python3 benchmarks/harvest_throughput.py --device cuda --tokens 1048576
python3 benchmarks/train_throughput.py --device cuda --d-sae 16384 --steps 200
python3 benchmarks/train_throughput.py --device cuda --d-sae 16384 --steps 200 --autocast
python3 benchmarks/sweep_vs_separate.py --device cuda --n 8 --d-sae 8192 --steps 200
