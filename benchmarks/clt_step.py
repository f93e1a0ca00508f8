"""Benchmark: a cross-layer transcoder's training step at a small model's full depth against the
per-layer transcoders of the same features per layer.

    python benchmarks/clt_step.py                        # SmolLM2-135M's shape: 30 layers, d_model 576
    python benchmarks/clt_step.py --features 256 --batch 1024 --steps 3

Prints, in one run, for each features-per-layer F and each activation (JumpReLU, TopK):
  * `jumprelu_clt` / `topk_clt` over all L layers (L * F features; layer l's decoders write into
    layers l..L-1, so L (L + 1) / 2 decoder blocks),
  * L separate `jumprelu` / `topk` transcoders d_model -> F -> d_model, one per layer (the same
    L * F features in all; each decodes into its own layer only), all stepped on every batch,
the step time (`train_step_`: forward, backward, fused Adam, metrics; for the per-layer ones the
sum of their L steps; the fastest and the median of the timed steps after --warmup: on a shared
machine another tenant's burst stalls a step several-fold, short steps the most; rows/s is from
the fastest), rows/s, the peak RSS growth over the step (the model, Adam's moments, the
step's activations and gradients), and the architecture class's `training_bytes` estimate (what
training checks against the machine's memory up front; it also counts a checkpoint copy of the
weights, which this benchmark never makes). Each configuration runs in its own process, so that
one's peak is not another's. Random rows: the step's cost does not depend on the data.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {"jumprelu": {}, "topk": {"k": 32}}


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (the peak) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(kind: str, act: str, L: int, d: int, F: int, batch: int, k: int, warmup: int, steps: int) -> dict:
    """One configuration, in this process: seconds per step, RSS growth, training_bytes."""
    import torch

    from shared.saes import SAEConfig, architecture_class
    from train.batch import Batch
    from train.step import make_optimizer, train_step_

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, L * d, generator=g), torch.randn(batch, L * d, generator=g)
    settings = {"k": k} if act == "topk" else {}
    torch.manual_seed(0)
    if kind == "clt":
        parts = [(x, y)]
    else:
        parts = [(x[:, i * d:(i + 1) * d].contiguous(), y[:, i * d:(i + 1) * d].contiguous()) for i in range(L)]
    del x, y
    base = rss_bytes("VmRSS")
    if kind == "clt":
        cls = architecture_class(f"{act}_clt")
        saes = [cls(SAEConfig(L * d, L * F, L * d, n_hooks=L, apply_b_dec_to_input=False), cls.Settings(**settings))]
        estimate = cls.training_bytes(L * d, L * d, L * F, L, batch)
    else:
        cls = architecture_class(act)
        saes = [cls(SAEConfig(d, F, d, apply_b_dec_to_input=False), cls.Settings(**settings)) for _ in range(L)]
        estimate = L * cls.training_bytes(d, d, F, 1, batch)
    opts = [make_optimizer(sae, 1e-4) for sae in saes]
    n_params = sum(p.numel() for sae in saes for p in sae.parameters())

    def step() -> None:
        for sae, opt, (xi, yi) in zip(saes, opts, parts):
            train_step_(sae, opt, None, Batch(xi, yi))

    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "median": statistics.median(times), "rss_growth": rss_bytes("VmHWM") - base,
            "estimate": estimate, "params": n_params, "threads": torch.get_num_threads(), "torch": torch.__version__}


def in_child(args: argparse.Namespace, kind: str, act: str, F: int) -> dict:
    steps = args.steps if kind == "clt" else args.per_layer_steps
    cmd = [sys.executable, __file__, "--one", kind, act, str(F), "--layers", str(args.layers), "--d-model",
           str(args.d_model), "--batch", str(args.batch), "--k", str(args.k), "--warmup", str(args.warmup),
           "--steps", str(steps)]
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = repo + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"{kind} {act} F={F} failed: {last}")
    return json.loads(out.stdout.splitlines()[-1])


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--features", default="256,512", help="features per layer, comma-separated")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--k", type=int, default=32, help="TopK's k (per layer, for the CLT)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="timed CLT steps")
    p.add_argument("--per-layer-steps", type=int, default=10, help="timed steps of the per-layer transcoders")
    p.add_argument("--one", nargs=3, metavar=("KIND", "ACT", "F"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        kind, act, F = a.one
        print(json.dumps(measure(kind, act, a.layers, a.d_model, int(F), a.batch, a.k, a.warmup, a.steps)))
        return
    L, d = a.layers, a.d_model
    head = None
    for F in (int(f) for f in a.features.split(",")):
        for act in SETTINGS:
            clt, plt = in_child(a, "clt", act, F), in_child(a, "per_layer", act, F)
            if head is None:
                head = (f"torch {clt['torch']}, {clt['threads']} threads; {L} layers, d_model {d}, batch {a.batch} "
                        f"rows, k {a.k} (TopK); {a.steps} timed CLT steps and {a.per_layer_steps} "
                        f"per-layer ones after {a.warmup}; step = fastest / median")
                print(head)
            print(f"{L} x {F} = {L * F:,} features, {act}:")
            for name, r in ((f"{act}_clt", clt), (f"{L} x {act} transcoders", plt)):
                print(f"  {name:<24} {r['params'] / 1e6:7.1f}M params  "
                      f"step {r['seconds']:6.3f} / {r['median']:6.3f} s  "
                      f"{a.batch / r['seconds']:>9,.0f} rows/s  peak RSS +{gib(r['rss_growth'])}  "
                      f"training_bytes {gib(r['estimate'])}")
            print(f"  CLT / per-layer: step x{clt['seconds'] / plt['seconds']:.1f}, "
                  f"memory x{clt['rss_growth'] / plt['rss_growth']:.1f}, params x{clt['params'] / plt['params']:.1f}")


if __name__ == "__main__":
    main()
