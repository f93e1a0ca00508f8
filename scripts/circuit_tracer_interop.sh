#!/usr/bin/env bash
# Check that transcoder and CLT folders written by shared/saes/circuit_tracer_form.py load
# unchanged in circuit-tracer and give the same encode/decode as our formulas:
#
#     bash scripts/circuit_tracer_interop.sh [--rtol R] [--atol A] [--no-graph] FOLDER [FOLDER ...]
#
# Each FOLDER holds circuit-tracer's form (config.yaml + layer_{l}.safetensors, or config.yaml +
# W_enc_{i}/W_dec_{i}.safetensors) and interop_expected.safetensors (x, feature_acts, out from our
# side; scripts/circuit_tracer_interop/make_tiny.py and train_tiny.py write such folders).
# circuit-tracer 0.5 pins transformers<=4.57.3 and transformer-lens 3 while this project needs
# transformer-lens 4, so the check runs in its own venv, built from
# scripts/circuit_tracer_interop/requirements.txt (torch first, pinned: a CPU build here). With
# CT_VENV=DIR the venv lives there and is reused while requirements.txt is unchanged and an
# earlier build finished; without it, a temporary venv is built from scratch and removed
# afterwards (about 1-2 minutes). PYTHON picks the interpreter (default python3, >= 3.11). All
# arguments go to scripts/circuit_tracer_interop/check.py.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REQ="$HERE/circuit_tracer_interop/requirements.txt"
CHECK="$HERE/circuit_tracer_interop/check.py"
PYTHON="${PYTHON:-python3}"

if [ "$#" -eq 0 ]; then
    echo "usage: bash scripts/circuit_tracer_interop.sh [--rtol R] [--atol A] [--no-graph] FOLDER [FOLDER ...]" >&2
    exit 2
fi

if [ -n "${CT_VENV:-}" ]; then
    VENV="$CT_VENV"
else
    VENV="$(mktemp -d)/ct-venv"
    trap 'rm -rf "$(dirname "$VENV")"' EXIT
fi
MARKER="$VENV/.circuit-tracer-interop-complete"

# The marker holds the hash of the requirements the venv was built from; it is written only
# after the install and an import check succeed, so a half-built venv is never reused.
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    :
else
    echo "circuit_tracer_interop: building $VENV from $REQ (a minute or two)..." >&2
    start=$SECONDS
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    log="$VENV/pip-install.log"
    pip=("$VENV/bin/python" -m pip install --disable-pip-version-check)
    # torch first, pinned: 2.13.0 is a CPU build here; unpinned, pip would pull a multi-GB CUDA build.
    if ! { "${pip[@]}" "$(grep -m1 '^torch==' "$REQ")" && "${pip[@]}" -r "$REQ"; } > "$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "circuit_tracer_interop: pip install failed; full log in $log" >&2
        exit 1
    fi
    "$VENV/bin/python" -c "import torch; from circuit_tracer.utils.caching import load_transcoders_from_cache" >&2
    echo "$want" > "$MARKER"
    echo "circuit_tracer_interop: venv ready in $((SECONDS - start)) s" >&2
fi

start=$SECONDS
status=0
HF_HUB_OFFLINE=1 "$VENV/bin/python" "$CHECK" "$@" || status=$?
echo "circuit_tracer_interop: check took $((SECONDS - start)) s" >&2
exit "$status"
