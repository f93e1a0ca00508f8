"""Architecture name (cfg.json's `architecture`) -> class. Adding an architecture is one new file
in this package and one line here."""
from __future__ import annotations

from shared.errors import UserError
from shared.saes.base import SAE
from shared.saes.batchtopk import BatchTopKSAE
from shared.saes.gated import GatedSAE
from shared.saes.jumprelu import JumpReLUSAE
from shared.saes.matryoshka import MatryoshkaBatchTopKSAE
from shared.saes.standard import StandardSAE
from shared.saes.topk import TopKSAE

ARCHITECTURES: dict[str, type[SAE]] = {
    "standard": StandardSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "matryoshka_batchtopk": MatryoshkaBatchTopKSAE,
}


def architecture_class(name: str) -> type[SAE]:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise UserError(f"unknown SAE architecture '{name}'; known: {', '.join(ARCHITECTURES)}") from None
