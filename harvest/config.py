"""The harvest configuration: one typed dataclass, validated on construction."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

from harvest.mlp_pairs import DEFAULT_INPUT, layers_for, pair_hooks, parse_layers
from shared.errors import UserError
from shared.manifest import FORMATS, STORAGE_DTYPES
from shared.storage import location

SHARD_BYTES = 1 << 30  # default shard size: about 1 GiB of activations
DEFAULT_HOOK = "blocks.0.hook_mlp_out"


@dataclass
class HarvestConfig:
    hooks: list[str] | None = None
    """Hook points to record; all come from one model pass, each into its own dump. None ->
    blocks.0.hook_mlp_out, or none besides the pairs when `mlp_pairs` is set."""
    mlp_pairs: str | None = None
    """Layers whose MLP input and output to record too (harvest.mlp_pairs): '3', '0..5', '0,2,4'
    or 'all'; expanded to hooks once the model (and so its number of layers) is known."""
    mlp_pairs_input: str = DEFAULT_INPUT
    """Where a pair's input is read: 'mlp-in' (blocks.{l}.mlp.hook_in, what the MLP reads, after
    ln2) or 'resid-mid' (blocks.{l}.hook_resid_mid, the residual stream before ln2)."""
    model: str = "gelu-2l"
    """TransformerLens alias, Hugging Face name, local HF folder, or a packaged alias (smollm2-135m)."""
    dataset: str = "NeelNanda/c4-tokenized-2b"
    """Hub dataset, a `save_to_disk` folder, local text/jsonl/parquet files, or an alias (shakespeare)."""
    split: str = "train"
    text_column: str = "text"
    """Column of raw text, used when the dataset has no `tokens`/`input_ids` column."""
    context_size: int = 128
    """Tokens per context, BOS included."""
    batch_size: int = 32
    """Contexts per forward pass."""
    tokens: int = 10_000_000
    """Tokens to harvest; rounded up to whole contexts."""
    prepend_bos: bool = True
    skip_bos: bool = False
    """Leave BOS positions out of the dump (their activations are outliers that hurt SAEs)."""
    dtype: str = "float32"
    """Storage dtype of activations."""
    model_dtype: str = "float32"
    """Dtype of the forward pass."""
    format: str | None = "safetensors"
    """safetensors or zarr; None picks the default of where `out` is: zarr in object storage
    (s3://..., the only format there), else safetensors."""
    compression: str | None = None
    """zarr only: None or 'zstd'."""
    shard_rows: int | None = None
    """Rows per shard; None picks about 1 GiB in the storage dtype."""
    out: str | None = None
    """Output folder or object-storage prefix (s3://bucket/prefix); None -> data/{model}_l{layer}
    (one hook) or data/{model} (several)."""
    device: str | None = None
    """None -> cuda if available, else cpu."""
    seed: int = 42
    shuffle_documents: bool = False
    shuffle_buffer_docs: int = 10_000
    """Documents in the seeded shuffle buffer used by shuffle_documents."""
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.hooks is None:
            self.hooks = [] if self.mlp_pairs is not None else [DEFAULT_HOOK]
        self.hooks = list(dict.fromkeys(self.hooks))  # keep order, drop repeats
        if self.mlp_pairs is not None:
            parse_layers(self.mlp_pairs)  # a bad spec fails here, before the model loads
            pair_hooks([], self.mlp_pairs_input)  # and so does a bad input choice
        elif not self.hooks:
            raise UserError("give at least one --hook, e.g. --hook blocks.0.hook_mlp_out "
                            "(or --mlp-pairs LAYERS)")
        for name in ("context_size", "batch_size", "tokens", "shuffle_buffer_docs"):
            if getattr(self, name) <= 0:
                raise UserError(f"{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.shard_rows is not None and self.shard_rows <= 0:
            raise UserError(f"shard-rows must be positive, got {self.shard_rows}")
        if self.skip_bos and not self.prepend_bos:
            raise UserError("--skip-bos needs --prepend-bos (there is no BOS position to skip)")
        if self.prepend_bos and self.context_size < 2:
            # BOS alone would fill every context, leaving no room for the dataset's tokens.
            raise UserError(f"--context-size {self.context_size} leaves no room for tokens after BOS; "
                            "use --context-size 2 or more, or --no-prepend-bos")
        out = location(self.out if self.out is not None else ".")  # the default folders are local
        formats = out.capabilities.formats
        if self.format is None:
            self.format = formats[0]
        if self.format in FORMATS and self.format not in formats:
            raise UserError(f"--out {self.out}: dumps in {out.kind} are written as {' or '.join(formats)}; "
                            f"pass --format {formats[0]} (or leave --format out)")
        for name, allowed in (("dtype", STORAGE_DTYPES), ("model_dtype", STORAGE_DTYPES), ("format", FORMATS)):
            if getattr(self, name) not in allowed:
                raise UserError(f"{name.replace('_', '-')} must be one of {', '.join(allowed)}, "
                                f"got '{getattr(self, name)}'")
        if self.compression not in (None, "zstd"):
            raise UserError(f"compression must be zstd or none, got '{self.compression}'")
        if self.compression and self.format != "zarr":
            raise UserError("--compression applies to --format zarr only")
        if self.resume and self.overwrite:
            raise UserError("--resume and --overwrite contradict each other; pick one")

    def with_pairs(self, n_layers: int) -> "HarvestConfig":
        """This config with `mlp_pairs` expanded into hooks (the pairs first, layer by layer, then
        the other hooks) for a model of `n_layers` blocks; itself when there are no pairs."""
        if self.mlp_pairs is None:
            return self
        assert self.hooks is not None
        pairs = pair_hooks(layers_for(self.mlp_pairs, n_layers), self.mlp_pairs_input)
        return replace(self, hooks=pairs + self.hooks, mlp_pairs=None)

    @property
    def rows_per_context(self) -> int:
        return self.context_size - 1 if self.skip_bos else self.context_size

    @property
    def n_contexts(self) -> int:
        """Whole contexts: stop at the first one at or past `tokens`."""
        return -(-self.tokens // self.context_size)

    def data_fields(self, hook: str, device_type: str) -> dict[str, Any]:
        """What determines the bytes of one hook's dump: its fingerprint, checked on resume."""
        d = asdict(self)
        # Not the pair fields: a dump's bytes are the same whether its hook came by --hook or
        # --mlp-pairs, and fingerprints stay those of dumps written before the fields existed.
        for k in ("hooks", "mlp_pairs", "mlp_pairs_input", "out", "device", "resume", "overwrite"):
            d.pop(k)
        d["hook"] = hook
        d["device_type"] = device_type
        return d
