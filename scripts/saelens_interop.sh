#!/usr/bin/env bash
# Check that SAE folders written by our `train` load unchanged in SAELens and give the same
# encode/decode as our code:
#
#     bash scripts/saelens_interop.sh [--rtol R] [--atol A] FOLDER [FOLDER ...]
#
# Each FOLDER holds cfg.json, sae_weights.safetensors and interop_expected.safetensors
# (x, feature_acts, sae_out from our code). sae-lens pins transformer-lens<4 while this project
# needs transformer-lens 4, so the check runs in its own venv, .saelens-venv at the repo root
# (override with SAELENS_VENV=...), built from scripts/saelens_interop/requirements.txt on the
# first run (a few minutes) and reused afterwards. The venv is rebuilt when requirements.txt
# changes or an earlier build did not finish. PYTHON picks the interpreter (default python3,
# >= 3.11). All arguments go to scripts/saelens_interop/check.py.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
REQ="$HERE/saelens_interop/requirements.txt"
CHECK="$HERE/saelens_interop/check.py"
VENV="${SAELENS_VENV:-$ROOT/.saelens-venv}"
PYTHON="${PYTHON:-python3}"
MARKER="$VENV/.saelens-interop-complete"

if [ "$#" -eq 0 ]; then
    echo "usage: bash scripts/saelens_interop.sh [--rtol R] [--atol A] FOLDER [FOLDER ...]" >&2
    exit 2
fi

# The marker holds the hash of the requirements the venv was built from; it is written only
# after the install and an import check succeed, so a half-built venv is never reused.
want="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [ -f "$MARKER" ] && [ "$(cat "$MARKER")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
    :
else
    echo "saelens_interop: building $VENV from $REQ (takes a few minutes the first time)..." >&2
    start=$SECONDS
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    log="$VENV/pip-install.log"
    if ! "$VENV/bin/python" -m pip install --disable-pip-version-check -r "$REQ" > "$log" 2>&1; then
        tail -n 40 "$log" >&2
        echo "saelens_interop: pip install failed; full log in $log" >&2
        exit 1
    fi
    "$VENV/bin/python" -c "import sae_lens, torch; from sae_lens import SAE" >&2
    echo "$want" > "$MARKER"
    echo "saelens_interop: venv ready in $((SECONDS - start)) s" >&2
fi

exec "$VENV/bin/python" "$CHECK" "$@"
