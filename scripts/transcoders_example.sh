#!/usr/bin/env bash
# The README's transcoder path on SmolLM2-135M, offline: one harvest of the MLP inputs and outputs
# of layers 0-3, a sweep of transcoders and skip transcoders at layer 3, a small cross-layer
# transcoder over layers 0-3, their evaluation (FVE, CE loss recovered, KL with the model spliced),
# a dashboard, and circuit-tracer's form of the CLT. Run after scripts/quickstart.sh (its .venv).
# About 20 minutes on 2 CPU cores (BENCHMARKS.md); TOKENS=... harvests more.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
D=data/smollm2_mlp
TOKENS="${TOKENS:-200000}"
if ! grep -q '"complete": true' "$D/blocks.3.hook_mlp_out/manifest.json" 2>/dev/null; then
    harvest --model smollm2-135m --dataset shakespeare --mlp-pairs 0..3 --tokens "$TOKENS" --out "$D"
fi
COMMON=(--lr 1e-3 --train-batch-size 1024 --normalize-activations expected_norm)
train --shards "$D/blocks.3.mlp.hook_in" --target-shards "$D/blocks.3.hook_mlp_out" "${COMMON[@]}" \
      --expansion-factor 4 --sweep architecture=topk,jumprelu --sweep skip_connection=false,true \
      --k 32 --l0-coefficient 4 --checkpoint-path data/runs/tc_l3 --overwrite
evaluate data/runs/tc_l3 --max-eval-contexts 32 --batch-contexts 8
IN=$D/blocks.0.mlp.hook_in,$D/blocks.1.mlp.hook_in,$D/blocks.2.mlp.hook_in,$D/blocks.3.mlp.hook_in
OUT=$D/blocks.0.hook_mlp_out,$D/blocks.1.hook_mlp_out,$D/blocks.2.hook_mlp_out,$D/blocks.3.hook_mlp_out
train --shards "$IN" --target-shards "$OUT" "${COMMON[@]}" --expansion-factor 2 \
      --sweep architecture=topk_clt,jumprelu_clt --k 16 --l0-coefficient 1 \
      --checkpoint-path data/runs/clt_l0_3 --overwrite
evaluate data/runs/clt_l0_3 --max-eval-contexts 32 --batch-contexts 8
evaluate data/runs/tc_l3/architecture_topk__skip_connection_True --dashboard --no-metrics \
      --max-eval-contexts 32 --batch-contexts 8
export-to circuit-tracer data/runs/clt_l0_3/architecture_jumprelu_clt/final --out data/circuit_tracer/smollm2_clt_l0_3
