"""Our BatchTopK against SAELens 6.54's `BatchTopKTrainingSAE` on the very same rows, in the same
order, compared at the same L0: both saved thresholds replaced by the one calibrated from the
same 4,096 training rows (`BatchTopKSAE.calibrate_inference_`'s rule), so EV differences are
training differences, not threshold ones.

    python benchmarks/batchtopk_vs_saelens.py --impl ours DUMP OUT.json [--lr 3e-4] [--b-dec zeros]
    /path/to/saelens-venv/bin/python benchmarks/batchtopk_vs_saelens.py --impl saelens DUMP OUT.json

DUMP is a one-shard dump folder (its shard_000000.safetensors is read whole); the last 8,192 rows
are held out. No AuxK in either: nothing is dead within the default windows (ours 500 steps,
SAELens 1,000) in the ~100 steps this is meant for. The SAELens path runs its own training
step (training_forward_pass, backward, clip_grad_norm_(1.0), Adam(0.9, 0.999)) as its trainer does.

Ablations, one difference at a time (either impl): --clip-grad-norm X clips before the update
(0: none; defaults are each impl's own, ours none, SAELens 1.0); --init-norm X sets
decoder_init_norm. Ours starts W_enc = X * the unit decoder rows; SAELens starts its W_dec rows
at norm X with W_enc = W_dec.T and multiplies the pre-activations by ||W_dec||
(rescale_acts_by_decoder_norm), so its effective encoder starts at X^2 (0.01 by default, ours
0.1): ours at --init-norm 0.01, or SAELens at 0.3162, starts with the other's effective encoder.
Ours only: --enc-lr-scale / --dec-lr-scale multiply W_enc's / W_dec's lr (SAELens' decoder rows
sit at norm n < 1, so an Adam step turns their directions ~1/n as far as ours at unit norm, and
its effective encoder W_enc n moves n as far). --threads (default 2) for a shared machine.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from safetensors import safe_open

HELD_OUT, SAMPLE = 8192, 4096


def threshold_from(h_relu_blocks, k: int, n: int) -> float:
    """Midway between the (k n)-th and (k n + 1)-th largest value (our calibration rule)."""
    top = torch.empty(0)
    for vals in h_relu_blocks:
        vals = torch.cat([top, vals.reshape(-1)])
        top = vals.topk(min(k * n + 1, vals.numel()), sorted=False).values
    below, at = top.topk(2, largest=False).values
    return float((below + at) / 2) if at > 0 else 0.0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=["ours", "saelens"], required=True)
    p.add_argument("dump")
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=45)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--b-dec", choices=["zeros", "geometric_median"], default="zeros")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--clip-grad-norm", type=float, default=None,
                   help="clip_grad_norm_ before the update; 0 = none (default: ours none, SAELens 1.0)")
    p.add_argument("--init-norm", type=float, default=None,
                   help="decoder_init_norm of either (default 0.1 both: ours' encoder columns; SAELens' "
                        "W_dec rows, W_enc = W_dec.T, so its effective encoder starts at 0.1 x 0.1)")
    p.add_argument("--enc-lr-scale", type=float, default=1.0, help="ours: W_enc's lr = lr x this")
    p.add_argument("--dec-lr-scale", type=float, default=1.0, help="ours: W_dec's lr = lr x this")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    with safe_open(f"{a.dump}/shard_000000.safetensors", "pt") as f:
        x = f.get_tensor("activations").float()
    train, held = x[:-HELD_OUT], x[-HELD_OUT:]
    rng = np.random.default_rng(a.seed)
    if a.steps * a.batch + SAMPLE > train.shape[0]:
        raise SystemExit(f"{a.steps} steps of {a.batch} rows + {SAMPLE} sample rows need more than the "
                         f"{train.shape[0]} training rows (one pass, no row twice)")
    order = torch.from_numpy(rng.permutation(train.shape[0])[: a.steps * a.batch + SAMPLE])
    sample = train[order[-SAMPLE:]]
    d_in = x.shape[1]
    d_sae = a.expansion * d_in
    torch.manual_seed(a.seed)
    if a.impl == "ours":
        from shared.saes.base import SAEConfig
        from shared.saes.batchtopk import BatchTopKSAE
        from train.geometric_median import geometric_median
        from train.step import make_optimizer, train_step_

        init = {} if a.init_norm is None else {"decoder_init_norm": a.init_norm}
        sae = BatchTopKSAE(SAEConfig(d_in, d_sae), BatchTopKSAE.Settings(k=a.k, **init))
        if a.clip_grad_norm:  # after the decoder-gradient projection, the last thing before the update
            project = sae.before_optimizer_step_

            def project_and_clip() -> None:
                project()
                torch.nn.utils.clip_grad_norm_(sae.parameters(), a.clip_grad_norm)
            sae.before_optimizer_step_ = project_and_clip  # type: ignore[method-assign]
        if a.b_dec == "geometric_median":
            with torch.no_grad():
                sae.b_dec.copy_(geometric_median(train[order[:16384]]))
        if a.enc_lr_scale == a.dec_lr_scale == 1.0:
            opt = make_optimizer(sae, a.lr)
        else:
            scaled = {"W_enc": a.enc_lr_scale, "W_dec": a.dec_lr_scale}
            groups = [{"params": [t], "lr": a.lr * scaled.get(n, 1.0)} for n, t in sae.named_parameters()]
            opt = torch.optim.Adam(groups, lr=a.lr, fused=True)
        step = lambda xb: train_step_(sae, opt, None, xb)  # noqa: E731
    else:
        from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
        from sae_lens.saes.sae import TrainStepInput

        init = {} if a.init_norm is None else {"decoder_init_norm": a.init_norm}
        sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=a.k, device="cpu",
                                                              dtype="float32", **init))
        clip = 1.0 if a.clip_grad_norm is None else a.clip_grad_norm
        if a.b_dec == "geometric_median":
            raise SystemExit("SAELens 6.54 starts b_dec at zeros")
        opt = torch.optim.Adam(sae.parameters(), lr=a.lr, betas=(0.9, 0.999))

        def step(xb):
            out = sae.training_forward_pass(TrainStepInput(sae_in=xb, coefficients={}, dead_neuron_mask=None,
                                                           n_training_steps=0, is_logging_step=False))
            out.loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), clip)
            opt.step()
            opt.zero_grad()
    started = time.perf_counter()
    for i in range(a.steps):
        step(train[order[i * a.batch:(i + 1) * a.batch]])
    seconds = time.perf_counter() - started
    with torch.no_grad():
        if a.impl == "ours":
            W_enc, b_enc, W_dec, b_dec = sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec
            running = float(sae.threshold)
        else:  # the inference form SAELens saves: decoder norms folded (rescale_acts_by_decoder_norm)
            norm = sae.W_dec.norm(dim=-1)
            W_enc, b_enc, W_dec, b_dec = sae.W_enc * norm, sae.b_enc * norm, sae.W_dec / norm[:, None], sae.b_dec
            running = float(sae.topk_threshold)
        pre = lambda r: (r - b_dec) @ W_enc + b_enc  # noqa: E731
        calibrated = threshold_from((torch.relu(pre(c)) for c in sample.split(512)), a.k, SAMPLE)
        result = {"impl": a.impl, "lr": a.lr, "b_dec": a.b_dec, "steps": a.steps, "batch": a.batch, "k": a.k,
                  "d_sae": d_sae, "seed": a.seed, "clip_grad_norm": a.clip_grad_norm, "init_norm": a.init_norm,
                  "enc_lr_scale": a.enc_lr_scale, "dec_lr_scale": a.dec_lr_scale, "train_seconds": round(seconds, 1),
                  "decoder_norm_mean": float(W_dec.norm(dim=-1).mean()) if a.impl == "ours" else float(norm.mean())}
        total = ((held - held.mean(0)) ** 2).sum()
        for name, theta in (("running", running), ("calibrated", calibrated)):
            h = pre(held)
            f = torch.relu(h) * (h > theta)
            err = ((held - (f @ W_dec + b_dec)) ** 2).sum()
            result[name] = {"threshold": theta, "l0": float((f > 0).sum(-1).float().mean()),
                            "explained_variance": float(1 - err / total)}
    print(json.dumps(result))
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
