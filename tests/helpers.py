"""Shared test helpers: run the harvest CLI in-process and compare dumps."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from harvest.cli import main as harvest_main
from shared.reader import Dump


def run_harvest(*args: str, expect_ok: bool = True):
    result = CliRunner().invoke(harvest_main, ["--quiet", *args], catch_exceptions=False)
    if expect_ok:
        assert result.exit_code == 0, result.output
    return result


def dump_files(folder: Path) -> dict[str, bytes]:
    """Every file of a dump by name, for byte-for-byte comparison.

    The manifest's creation time and pass identifier are blanked: they are the fields two separate
    runs cannot share (a resume keeps the pass's; tests compare it with `pass_id`).
    """
    files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
    manifest = json.loads(files["manifest.json"])
    assert manifest.get("pass_id"), f"{folder}: the manifest names no pass"
    manifest["created"] = None
    manifest["pass_id"] = None
    files["manifest.json"] = json.dumps(manifest).encode()
    return files


def pass_id(folder: Path) -> str | None:
    """The pass identifier in the dump's manifest (None when the manifest lacks one)."""
    return json.loads((folder / "manifest.json").read_text()).get("pass_id")


def set_pass_id(folders, pass_id: str | None) -> None:
    """Set the `pass_id` of the manifests in `folders` (local dump folders, or s3:// dumps); None
    removes it, as in dumps written before harvest recorded its pass."""
    from shared.manifest import MANIFEST_NAME
    from shared.storage import location

    for folder in folders:
        path = location(folder) / MANIFEST_NAME
        raw = json.loads(path.get_bytes())
        raw["pass_id"] = pass_id
        path.put_bytes(json.dumps(raw, indent=1).encode())


NARROW, WIDE = "blocks.0.hook_mlp_out", "blocks.0.mlp.hook_post"  # d_model 32, d_mlp 128
SAME_WIDTH = "blocks.0.hook_resid_post"  # d_model 32, like NARROW


def harvest_pass(model: Path, ds: Path, out: Path | str, hooks=(NARROW, WIDE), tokens: int = 8000,
                 pass_ids: bool = True, fmt: str | None = None) -> list:
    """One harvest pass writing every hook in `hooks` into `out` (a folder or an s3:// prefix);
    the dumps' locations. `pass_ids=False` removes the pass_id harvest wrote, as in dumps written
    before it existed. BOS rows are skipped: they are all alike, and `row_index` finds rows by
    their activations."""
    args = ["--model", str(model), "--dataset", str(ds), "--out", str(out), "--context-size", "32",
            "--batch-size", "5", "--tokens", str(tokens), "--shard-rows", "2480", "--skip-bos"]
    args += ["--format", fmt] if fmt else []
    for hook in hooks:
        args += ["--hook", hook]
    run_harvest(*args)
    folders = [f"{out}/{hook}" for hook in hooks] if len(hooks) > 1 else [str(out)]
    folders = folders if str(out).startswith("s3://") else [Path(f) for f in folders]
    if not pass_ids:
        set_pass_id(folders, None)
    return folders


def row_index(dumps: list[Dump]) -> dict[bytes, list[int]]:
    """Each row's activations in every dump (as bytes, side by side) -> the rows holding them
    (more than one only where the model saw the same tokens: position 1 after the same token)."""
    acts = [d.activations(0, d.n_rows).float().numpy() for d in dumps]
    index: dict[bytes, list[int]] = {}
    for i in range(dumps[0].n_rows):
        index.setdefault(b"".join(a[i].tobytes() for a in acts), []).append(i)
    assert len(index) > 0.9 * dumps[0].n_rows  # nearly every row is its own
    return index


def assert_aligned(dumps: list[Dump], batches: list[tuple[torch.Tensor, ...]]) -> int:
    """Every batch row holds, in each of its parts, the same dump row of each dump (looked up by
    all its parts together, so a row of one dump paired with another row of the other is not
    found), and that row's token, context and position are the same in every dump. Returns the
    rows checked."""
    index = row_index(dumps)
    columns = {name: [d.column(name, 0, d.n_rows) for d in dumps] for name in ("tokens", "context", "position")}
    checked = 0
    for batch in batches:
        assert len(batch) == len(dumps)
        for part, dump in zip(batch, dumps):
            assert part.shape == (len(batch[0]), dump.d_in) and part.dtype == torch.float32
        for j in range(len(batch[0])):
            rows = index[b"".join(part[j].numpy().tobytes() for part in batch)]
            for name, per_dump in columns.items():
                assert all(np.array_equal(per_dump[0][rows], other[rows]) for other in per_dump[1:]), name
            checked += 1
    return checked


# ---- planted features: transcoders, CLTs, crosscoders ---------------------------------------------
def unit_rows(n: int, d: int, g: torch.Generator) -> torch.Tensor:
    """[n, d] random unit rows."""
    v = torch.randn(n, d, generator=g)
    return v / v.norm(dim=1, keepdim=True)


def sparse_codes(rows: int, n: int, g: torch.Generator, active: int = 3) -> torch.Tensor:
    """[rows, n]: `active` features on per row, each with a coefficient in [0.5, 1.5)."""
    which = torch.rand(rows, n, generator=g).argsort(dim=1)[:, :active]
    return torch.zeros(rows, n).scatter_(1, which, 0.5 + torch.rand(rows, active, generator=g))


def train_planted(sae, batches, steps: int, lr: float = 1e-2):
    """Train on `batches()` -> Batch with AuxK's dead mask and a 100-step sparsity warm-up, as the
    trainer gives them; the last step's measurements."""
    from shared.saes.base import StepContext
    from train.step import make_optimizer, train_step_

    opt = make_optimizer(sae, lr)
    since = torch.zeros(sae.cfg.d_sae, dtype=torch.long)
    for i in range(steps):
        res = train_step_(sae, opt, None, batches(),
                          StepContext(sparsity_scale=min(1.0, (i + 1) / 100), dead_mask=since >= 50))
        since = torch.where(res.feature_acts_fired > 0, 0, since + 1)
    return res


def best_cos(planted: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
    """For each planted row, the best cosine similarity with a learned row: [n_planted]."""
    planted = planted / planted.norm(dim=1, keepdim=True)
    learned = learned / learned.norm(dim=1, keepdim=True)
    return (planted @ learned.T).amax(dim=1)


def hooked_ce(hf_model, tokens: torch.Tensor, handles: list) -> tuple[float, torch.Tensor]:
    """Next-token CE (float64) and log-probs [batch, ctx - 1, vocab] of a Hugging Face model on
    `tokens` with the forward hooks `handles` in place; the hooks are removed afterwards."""
    try:
        with torch.no_grad():
            logits = hf_model(tokens).logits.double()
    finally:
        for h in handles:
            h.remove()
    logp = torch.log_softmax(logits[:, :-1], -1)
    ce = torch.nn.functional.nll_loss(logp.reshape(-1, logp.shape[-1]), tokens[:, 1:].reshape(-1))
    return float(ce), logp
