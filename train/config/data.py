"""The `data` part: the dump and the one stream of batches every SAE of a sweep shares."""
from __future__ import annotations

from dataclasses import dataclass

from shared.settings import NON_NEGATIVE, POSITIVE, setting

NORMALIZE = ("none", "expected_norm")


@dataclass
class DataPart:
    shards: str | None = setting(None)
    """Dump folder written by `harvest` (e.g. data/gelu2l_l0)."""
    target_shards: str | None = setting(None)
    """Dump to write instead of the input: another hook of the same harvest pass, such as the MLP's
    output (--shards its input) for a transcoder. None: the input itself (an SAE)."""
    d_in: int | None = setting(None, POSITIVE)
    """Activation width; checked against the dump when given."""
    train_batch_size: int = setting(4096, POSITIVE)
    """Rows (tokens) per optimizer step."""
    total_training_tokens: int | None = setting(None, POSITIVE, default_text="one pass over the dump")
    """Rows (tokens) to train on; more than the dump holds means further epochs."""
    normalize_activations: str = setting("none", choices=NORMALIZE)
    """none, or expected_norm: scale inputs so E||x|| = sqrt(d_in) (from the manifest; folded back
    into the saved weights, so checkpoints work on raw activations)."""
    shuffle_buffer_rows: int | None = setting(None, POSITIVE, default_text="about 1 GiB")
    """Rows shuffled together in RAM."""
    shuffle_block_rows: int = setting(16, POSITIVE)
    """Contiguous rows read together (smaller mixes better, reads slower)."""
    eval_holdout_contexts: int | None = setting(None, NON_NEGATIVE, default_text="1% of contexts, at most 512")
    """The dump's last contexts kept out of training for `evaluate` (0: none)."""
    seed: int = setting(42, NON_NEGATIVE)
    """Seed of the data order, resampling and (unless init_seed is given) the SAE init."""
    device: str | None = setting(None, default_text="cuda if available, else cpu")
    """Device to train on."""

    # How the Python API harvests a missing dump (`train.api`); `train` refuses them (see `harvest`).
    model_name: str = setting("gelu-2l", harvest_flag="--model")
    """Model the dump comes from (the Python API harvests a missing dump with it)."""
    hook_point: str = setting("blocks.0.hook_mlp_out", harvest_flag="--hook")
    """Hook point (the Python API harvests a missing dump with it)."""
    hook_point_layer: int | None = setting(None, NON_NEGATIVE, harvest_flag="")
    """Layer of the hook point (informational; harvest takes it from the hook, training from the dump)."""
    dataset_path: str = setting("NeelNanda/c4-tokenized-2b", harvest_flag="--dataset")
    """Dataset the Python API harvests a missing dump from."""
    context_size: int = setting(128, POSITIVE, harvest_flag="--context-size")
    """Tokens per context when the Python API harvests."""
    store_batch_size: int = setting(32, POSITIVE, harvest_flag="--batch-size")
    """Contexts per forward pass when the Python API harvests."""

    # The seed's names, accepted from the Python API and ignored.
    is_dataset_tokenized: bool = setting(True, ignored=True)
    """Ignored (the seed's name): harvest detects whether the dataset is tokenized."""
    n_batches_in_buffer: int | None = setting(None, POSITIVE, ignored=True)
    """Ignored (the seed's name): the shuffle buffer is shuffle_buffer_rows now."""
