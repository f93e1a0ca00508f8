"""Every feature's statistics in one streaming pass over the dump: what a dashboard shows.

The dump stores each row's token id, context and position, so a feature's top-activating contexts
come from the dump alone, without running the language model again. One pass, chunk by chunk
(each chunk whole contexts, so a token's context window lies inside its chunk), keeps per feature:

- how often it fires, its summed and maximal activation (density, mean when firing, max);
- its top-k activations, each with the window of tokens around it and the feature's activation
  on every token of that window (for shading);
- a uniform sample without replacement of the rows it fires on (a reservoir: the rows with the
  smallest random keys), with the same windows, for examples from every activation range;
- a histogram of its non-zero activations over [0, top), top a power of two that doubles when
  a larger activation arrives (merging bin pairs, which is exact), so no second pass is needed.

Memory is bounded by the chunk ([chunk, d_sae] activations) plus O(d_sae x (k + samples) x window)
of state, whatever the dump's length. Selection works on the chunk's non-zero entries only (a few
per row for a sparse SAE), not on the dense [chunk, d_sae] block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from shared.errors import DumpError, UserError
from shared.reader import Dump
from shared.saes import SAE
from train.evaluation.rows import float_rows


@dataclass
class FeatureStatsConfig:
    """How much to keep per feature."""

    top_k: int = 12
    """Top-activating examples kept per feature."""
    samples: int = 40
    """Firing rows sampled uniformly per feature (examples from every activation range)."""
    window_before: int = 15
    """Tokens of context shown before the firing token."""
    window_after: int = 4
    """Tokens shown after it."""
    hist_bins: int = 64
    """Histogram bins over [0, top); a power of two, so merging bins on a doubling is exact."""
    chunk_rows: int = 8192
    """Rows per chunk (rounded down to whole contexts, at least one context)."""
    seed: int = 0
    """Seed of the reservoir's random keys."""

    def __post_init__(self) -> None:
        for name in ("top_k", "samples", "hist_bins", "chunk_rows"):
            if getattr(self, name) < 1:
                raise UserError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.window_before < 0 or self.window_after < 0:
            raise UserError("context windows must be >= 0 tokens")
        if self.hist_bins & (self.hist_bins - 1):
            raise UserError(f"histogram bins must be a power of two, got {self.hist_bins}")

    @property
    def window(self) -> int:
        return self.window_before + 1 + self.window_after


@dataclass
class Examples:
    """Per feature, up to m examples: [d_sae, m] (rows -1 where there are fewer)."""

    score: torch.Tensor  # [d_sae, m] float32; what selection ranks by (-inf where empty)
    acts: torch.Tensor  # [d_sae, m] float32; the feature's activation on the example's row
    rows: torch.Tensor  # [d_sae, m] int64; dump row, -1 where empty
    window_acts: torch.Tensor  # [d_sae, m, W] float32; activation on each token of the window
    window_tokens: torch.Tensor  # [d_sae, m, W] int64; token ids, -1 outside the context

    @classmethod
    def empty(cls, d_sae: int, m: int, w: int) -> "Examples":
        return cls(score=torch.full((d_sae, m), -torch.inf), acts=torch.zeros(d_sae, m),
                   rows=torch.full((d_sae, m), -1, dtype=torch.int64),
                   window_acts=torch.zeros(d_sae, m, w),
                   window_tokens=torch.full((d_sae, m, w), -1, dtype=torch.int64))

    def merged(self, other: "Examples") -> "Examples":
        """The m highest-scoring of both, per feature, highest first."""
        m = self.score.shape[1]
        score, pick = torch.cat([self.score, other.score], 1).topk(m, dim=1)  # [d_sae, m]

        def take(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            both = torch.cat([a, b], 1)
            index = pick if both.ndim == 2 else pick.unsqueeze(-1).expand(-1, -1, both.shape[2])
            return both.gather(1, index)

        return Examples(score, take(self.acts, other.acts), take(self.rows, other.rows),
                        take(self.window_acts, other.window_acts), take(self.window_tokens, other.window_tokens))


@dataclass
class FeatureStats:
    """The result of one pass (all tensors on the CPU)."""

    n_rows: int
    fired: torch.Tensor  # [d_sae] int64: rows each feature fired on
    act_sum: torch.Tensor  # [d_sae] float64: summed activation where it fired
    act_max: torch.Tensor  # [d_sae] float32 (0 where it never fired)
    top: Examples  # top-k by activation
    sample: Examples  # uniform sample of firing rows (score = -random key)
    hist_counts: torch.Tensor  # [d_sae, bins] int64
    hist_top: torch.Tensor  # [d_sae] float32: bins split [0, hist_top) evenly (0: never fired)
    config: FeatureStatsConfig = field(default_factory=FeatureStatsConfig)

    @property
    def density(self) -> torch.Tensor:
        return self.fired.double() / self.n_rows

    @property
    def mean_when_firing(self) -> torch.Tensor:
        return torch.where(self.fired > 0, self.act_sum / self.fired.clamp(min=1), 0.0)

    def bin_edges(self, feature: int) -> np.ndarray:
        return np.linspace(0.0, float(self.hist_top[feature]), self.config.hist_bins + 1)


@torch.inference_mode()
def feature_stats(sae: SAE, dump: Dump, cfg: FeatureStatsConfig | None = None,
                  rows: tuple[int, int] | None = None, device: str | torch.device = "cpu",
                  progress: Callable[[int], None] | None = None) -> FeatureStats:
    """One pass over dump rows [start, stop) (whole contexts; default: every row).

    `progress(n)` is called with the rows done after each chunk (for a progress bar).
    """
    cfg = cfg or FeatureStatsConfig()
    rpc = dump.manifest.rows_per_context
    start, stop = rows if rows is not None else (0, dump.n_rows)
    if not 0 <= start < stop <= dump.n_rows or start % rpc or stop % rpc:
        raise UserError(f"rows [{start}, {stop}) must be whole contexts of {rpc} rows inside the "
                        f"dump's {dump.n_rows} rows")
    if dump.d_in != sae.cfg.d_in:
        raise UserError(f"the SAE reads d_in={sae.cfg.d_in} but the dump {dump.path} has d_in={dump.d_in}")
    chunk = max(rpc, cfg.chunk_rows // rpc * rpc)
    state = _Running(sae.cfg.d_sae, cfg, torch.device(device))
    for a in range(start, stop, chunk):
        b = min(a + chunk, stop)
        _check_context_order(dump, a, b)
        x = float_rows(dump, a, b, device)  # [c, d_in]
        tokens = torch.from_numpy(dump.column("tokens", a, b).astype(np.int64)).to(device)  # [c]
        state.add_(a, sae.encode(x), tokens, rpc)
        if progress is not None:
            progress(b - a)
    return state.result(stop - start)


def _check_context_order(dump: Dump, a: int, b: int) -> None:
    """Windows assume rows stored context by context, in position order; say so if not."""
    m = dump.manifest
    first_pos = 1 if m.skip_bos else 0
    position = dump.column("position", a, b)
    want = np.tile(np.arange(first_pos, first_pos + m.rows_per_context), (b - a) // m.rows_per_context)
    if not np.array_equal(position, want):
        raise DumpError(f"{dump.path}: rows [{a}, {b}) are not stored context by context; re-harvest the dump")


class _Running:
    """The running state of the pass (on the SAE's device)."""

    def __init__(self, d_sae: int, cfg: FeatureStatsConfig, device: torch.device) -> None:
        self.cfg, self.d_sae, self.device = cfg, d_sae, device
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.act_max = torch.zeros(d_sae, device=device)
        self.top = Examples.empty(d_sae, cfg.top_k, cfg.window)
        self.sample = Examples.empty(d_sae, cfg.samples, cfg.window)
        self.hist_counts = torch.zeros(d_sae, cfg.hist_bins, dtype=torch.int64, device=device)
        self.hist_top = torch.zeros(d_sae, device=device)
        if device.type != "cpu":
            self.top, self.sample = _to(self.top, device), _to(self.sample, device)

    def add_(self, first_row: int, acts: torch.Tensor, tokens: torch.Tensor, rpc: int) -> None:
        """acts: [c, d_sae] for rows first_row.. of whole contexts; tokens: [c]."""
        r, f = (acts > 0).nonzero(as_tuple=True)  # the firing entries, row-major
        v = acts[r, f]
        self.fired += torch.bincount(f, minlength=self.d_sae)
        self.act_sum.index_add_(0, f, v.double())
        chunk_max = torch.zeros(self.d_sae, device=acts.device).scatter_reduce_(0, f, v, "amax")
        self.act_max = torch.maximum(self.act_max, chunk_max)
        self._histogram_add_(f, v, chunk_max)
        window = _Windows(acts, tokens, rpc, self.cfg)
        self.top = self._offer(self.top, window, first_row, r, f, v, v)
        keys = torch.rand(v.shape, generator=self.generator, device=v.device)
        self.sample = self._offer(self.sample, window, first_row, r, f, v, -keys)

    def _offer(self, kept: Examples, window: "_Windows", first_row: int, r: torch.Tensor, f: torch.Tensor,
               v: torch.Tensor, score: torch.Tensor) -> Examples:
        """Merge the chunk's entries into `kept`. Only entries scoring above their feature's lowest
        kept score can get in: filtering on that first leaves few to sort after the first chunks."""
        m = kept.score.shape[1]
        new = score > kept.score[:, -1][f]
        if not bool(new.any()):
            return kept
        return kept.merged(window.examples(first_row, r[new], f[new], v[new], score[new], m, self.d_sae))

    def _histogram_add_(self, f: torch.Tensor, v: torch.Tensor, chunk_max: torch.Tensor) -> None:
        bins = self.cfg.hist_bins
        _, exponent = torch.frexp(torch.maximum(self.act_max, chunk_max))  # 2^(e-1) <= max < 2^e
        new_top = torch.where(self.act_max > 0, torch.ldexp(torch.ones_like(self.act_max), exponent),
                              torch.zeros_like(self.act_max))
        grown = (self.hist_top > 0) & (new_top > self.hist_top)
        if bool(grown.any()):
            shift = torch.zeros(self.d_sae, dtype=torch.int64, device=f.device)
            shift[grown] = torch.log2(new_top[grown] / self.hist_top[grown]).round().long()
            target = torch.arange(bins, device=f.device).unsqueeze(0) >> shift.clamp(max=62).unsqueeze(1)
            self.hist_counts = torch.zeros_like(self.hist_counts).scatter_add_(1, target, self.hist_counts)
        self.hist_top = new_top
        # Exact: top is a power of two, so v * bins / top only shifts v's exponent.
        b = (v * bins / self.hist_top[f]).floor().long().clamp(max=bins - 1)
        flat = torch.bincount(f * bins + b, minlength=self.d_sae * bins)
        self.hist_counts += flat.view(self.d_sae, bins)

    def result(self, n_rows: int) -> FeatureStats:
        cpu = torch.device("cpu")
        return FeatureStats(n_rows=n_rows, fired=self.fired.to(cpu), act_sum=self.act_sum.to(cpu),
                            act_max=self.act_max.to(cpu), top=_to(self.top, cpu), sample=_to(self.sample, cpu),
                            hist_counts=self.hist_counts.to(cpu), hist_top=self.hist_top.to(cpu), config=self.cfg)


class _Windows:
    """Context windows around firing entries of one chunk (whole contexts, so windows stay inside)."""

    def __init__(self, acts: torch.Tensor, tokens: torch.Tensor, rpc: int, cfg: FeatureStatsConfig) -> None:
        self.acts, self.tokens, self.rpc = acts, tokens, rpc
        self.offsets = torch.arange(-cfg.window_before, cfg.window_after + 1, device=acts.device)  # [W]

    def examples(self, first_row: int, r: torch.Tensor, f: torch.Tensor, v: torch.Tensor,
                 score: torch.Tensor, m: int, d_sae: int) -> Examples:
        """The chunk's m highest-scoring firing entries per feature, as dense [d_sae, m] Examples."""
        keep, rank = _top_per_group(f, score, m)
        r, f, v, score, rank = r[keep], f[keep], v[keep], score[keep], rank[keep]
        out = Examples.empty(d_sae, m, self.offsets.numel())
        out = _to(out, self.acts.device)
        out.score[f, rank] = score
        out.acts[f, rank] = v
        out.rows[f, rank] = r + first_row
        wa, wt = self._window(r, f)
        out.window_acts[f, rank] = wa
        out.window_tokens[f, rank] = wt
        return out

    def _window(self, r: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The feature's activation and the token id at each window position: [n, W] each."""
        around = r.unsqueeze(1) + self.offsets  # [n, W] chunk rows
        context_start = (r // self.rpc * self.rpc).unsqueeze(1)
        inside = (around >= context_start) & (around < context_start + self.rpc)
        around = torch.where(inside, around, r.unsqueeze(1))
        acts = self.acts[around, f.unsqueeze(1).expand_as(around)]
        return torch.where(inside, acts, 0.0), torch.where(inside, self.tokens[around], -1)


def _top_per_group(group: torch.Tensor, score: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For entries labelled by `group`: which are among their group's m highest scores, and their
    rank there. Two stable sorts (by score, then by group) order each group highest first."""
    order = torch.sort(score, descending=True, stable=True).indices
    order = order[torch.sort(group[order], stable=True).indices]
    g = group[order]
    counts = torch.bincount(g)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(g.numel(), device=g.device) - starts[g]
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank < m, rank


def _to(e: Examples, device: torch.device) -> Examples:
    return Examples(*(t.to(device) for t in (e.score, e.acts, e.rows, e.window_acts, e.window_tokens)))


def summary_row(stats: FeatureStats, feature: int) -> dict[str, Any]:
    """The index's numbers for one feature (JSON-able)."""
    fired = int(stats.fired[feature])
    return {"feature": feature, "fired": fired, "density": fired / stats.n_rows,
            "max": float(stats.act_max[feature]), "mean": float(stats.mean_when_firing[feature])}
