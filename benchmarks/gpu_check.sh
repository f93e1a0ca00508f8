#!/usr/bin/env bash
# The GPU checks in one script: the GPU-marked tests, then every benchmark on the card, with the
# card's name printed beside the figures. Run it from the repo root of an install on a CUDA machine:
#   bash benchmarks/gpu_check.sh
# If the machine cannot install packages, put wheels of the missing ones (transformer-lens,
# datasets, zarr and their pure-Python dependencies) in a folder `.whl/` at the repo root first;
# the script installs them into /tmp/site without touching the system.
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
python3 benchmarks/topk_sparse.py --device cuda
