"""SAEs of several hooks a side (crosscoders, cross-layer transcoders): their dumps, opened and
checked, and read as training read them.

A side (the input, or a transcoder's target) of an SAE with `n_hooks` > 1 is the concatenation of
its hooks' dumps in order: row i is the K dumps' row i side by side. cfg.json records the first
dump of each side (`shards` / `hook_name` / `d_in_dump` / `data_digest` for the input, `target`
for the target) and the others in `more_inputs` / `more_targets`; a crosscoder has no target side
(it reconstructs its input). `StackedDump` reads such a side where code reads one `Dump`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from shared.errors import UserError
from shared.reader import Dump
from shared.run_paths import dump_list, dump_path_for
from shared.storage import location
from train.data_digest import check_same_data
from train.same_pass import check_same_pass


class StackedDump:
    """Several dumps of one harvest pass read as one: activations concatenated in order
    ([rows, sum of widths]); rows, token columns and the manifest's stream fields are the first
    dump's (the same in every dump of one pass, which `open_side` checks)."""

    def __init__(self, dumps: Sequence[Dump]) -> None:
        if len(dumps) < 2:
            raise ValueError("a StackedDump concatenates at least two dumps")
        self.dumps = list(dumps)
        self.first = self.dumps[0]

    # What code reading one Dump asks of it.
    @property
    def path(self) -> Any:
        return self.first.path

    @property
    def manifest(self) -> Any:
        return self.first.manifest

    @property
    def n_rows(self) -> int:
        return self.first.n_rows

    @property
    def n_shards(self) -> int:
        return self.first.n_shards

    def shard_range(self, i: int) -> tuple[int, int]:
        return self.first.shard_range(i)

    @property
    def d_in(self) -> int:
        return sum(d.d_in for d in self.dumps)

    def column(self, name: str, start: int, stop: int) -> np.ndarray:
        return self.first.column(name, start, stop)

    def activations(self, start: int, stop: int) -> torch.Tensor:
        return torch.cat([d.activations(start, stop) for d in self.dumps], dim=-1)

    # Its own.
    @property
    def hooks(self) -> list[str]:
        return [d.manifest.hook for d in self.dumps]

    @property
    def paths(self) -> list[str]:
        return [str(d.path) for d in self.dumps]

    @property
    def widths(self) -> list[int]:
        return [d.d_in for d in self.dumps]


def several_hooks(sae_cfg: dict[str, Any]) -> bool:
    """Whether cfg.json describes an SAE reading (or writing) several hooks concatenated."""
    return sae_cfg.get("n_hooks", 1) != 1 or bool(sae_cfg.get("more_inputs")) or bool(sae_cfg.get("more_targets"))


def has_target_side(sae_cfg: dict[str, Any]) -> bool:
    """Whether it writes other hooks than it reads: a target record (a cross-layer transcoder,
    a transcoder over several hooks); a crosscoder's target is its input."""
    return isinstance(sae_cfg.get("target"), dict)


def input_records(sae_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Each input dump's record, in order: (shards, hook_point, width, data_digest)."""
    first = {"shards": sae_cfg.get("shards"), "hook_point": sae_cfg.get("hook_point", sae_cfg.get("hook_name")),
             "width": sae_cfg.get("d_in_dump"), "data_digest": sae_cfg.get("data_digest")}
    more = [_record(e, "d_in_dump", "more_inputs") for e in _entries(sae_cfg.get("more_inputs"), "more_inputs")]
    return [first, *more]


def target_records(sae_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target dump's record, in order (empty for a crosscoder: its target is its input)."""
    if not has_target_side(sae_cfg):
        if sae_cfg.get("more_targets"):
            raise UserError("cfg.json records more_targets but no target (the first target dump): restore the "
                            "file, or save the folder again with its target record")
        return []
    first = _record(sae_cfg["target"], "d_out_dump", "target")
    more = [_record(e, "d_out_dump", "more_targets") for e in _entries(sae_cfg.get("more_targets"), "more_targets")]
    return [first, *more]


def _entries(value: Any, key: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
        raise UserError(f"cfg.json: {key} is {value!r}, not a list of dump records; restore the file")
    return value


def _record(entry: dict[str, Any], width_key: str, key: str) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise UserError(f"cfg.json: {key} is {entry!r}, not a dump record; restore the file")
    return {"shards": entry.get("shards"), "hook_point": entry.get("hook_point"), "width": entry.get(width_key),
            "data_digest": entry.get("data_digest")}


def side_paths(sae_folder: Path, records: list[dict[str, Any]], given: str | None, flag: str,
               what: str) -> list[Any]:
    """Where each dump of a side lies: the comma list `given` (the flag's value) in order, or else
    each record's path found as `dump_path_for` finds one; one line naming `flag` otherwise."""
    n = len(records)
    if given:
        paths = [location(p) for p in dump_list(given)]
        if len(paths) != n:
            raise UserError(f"{flag} names {len(paths)} dump(s) but {sae_folder} was trained on {n} ({what}s, "
                            f"in order): pass all {n}, comma-separated")
        return paths
    found = []
    for record in records:
        try:
            found.append(dump_path_for(Path(sae_folder), record, flag=flag, what=what))
        except UserError as e:
            raise UserError(f"{e} (all {n} {what}s of the side, comma-separated, in order)") from None
    return found


def check_side_fits(sae_folder: Path, records: list[dict[str, Any]], dumps: list[Dump], width: int,
                    flag: str, what: str) -> None:
    """A one-line error unless each dump holds the hook and width its record names and, where
    recorded, the very data trained on; and the side's widths add up to `width` (cfg.json's d_in
    or d_out)."""
    fix = f"pass the {len(records)} {what}s it was trained on ({flag} A,B,... in order)"
    for i, (record, dump) in enumerate(zip(records, dumps)):
        hook = record.get("hook_point")
        if hook is not None and hook != dump.manifest.hook:
            raise UserError(f"{what} {i} of {sae_folder} was hook '{hook}' but {dump.path} holds "
                            f"'{dump.manifest.hook}': {fix}")
        recorded = record.get("width")
        if recorded is not None and recorded != dump.d_in:
            raise UserError(f"{what} {i} of {sae_folder} was {recorded} wide but {dump.path} has width "
                            f"{dump.d_in}: {fix}")
        check_same_data(record, dump, f"the SAE in {sae_folder}", fix)
    total = sum(d.d_in for d in dumps)
    if total != width:
        raise UserError(f"the {what}s {', '.join(str(d.path) for d in dumps)} are {total} wide together but "
                        f"{sae_folder} has {width}: {fix}")


def open_sides(sae_folder: Path, sae_cfg: dict[str, Any], opener: Callable[[Any], Dump],
               shards: str | None = None, target_shards: str | None = None) -> tuple[StackedDump | Dump,
                                                                                     StackedDump | Dump]:
    """(input side, target side) of an SAE over several hooks, each a StackedDump (or the one
    Dump of a side with one hook); the target side is the input itself for a crosscoder. Every
    dump is checked against its record and all are checked to be of one harvest pass."""
    ins = input_records(sae_cfg)
    outs = target_records(sae_cfg)
    if target_shards and not outs:
        raise UserError(f"{sae_folder} reconstructs its input (a crosscoder): --target-shards is for transcoders only")
    in_dumps = [opener(p) for p in side_paths(sae_folder, ins, shards, "--shards", "input dump")]
    check_side_fits(sae_folder, ins, in_dumps, sae_cfg["d_in"], "--shards", "input dump")
    out_dumps: list[Dump] = []
    if outs:
        out_dumps = [opener(p) for p in side_paths(sae_folder, outs, target_shards, "--target-shards",
                                                   "target dump")]
        check_side_fits(sae_folder, outs, out_dumps, sae_cfg.get("d_out") or sae_cfg["d_in"], "--target-shards",
                        "target dump")
    check_same_pass([*in_dumps, *out_dumps])
    side = StackedDump(in_dumps) if len(in_dumps) > 1 else in_dumps[0]
    if not out_dumps:
        return side, side
    return side, StackedDump(out_dumps) if len(out_dumps) > 1 else out_dumps[0]


def side_hooks(side: StackedDump | Dump) -> list[str]:
    return side.hooks if isinstance(side, StackedDump) else [side.manifest.hook]


def side_paths_of(side: StackedDump | Dump) -> list[str]:
    return side.paths if isinstance(side, StackedDump) else [str(side.path)]


def side_widths(side: StackedDump | Dump) -> list[int]:
    return side.widths if isinstance(side, StackedDump) else [side.d_in]
