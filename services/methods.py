"""What ``GET /methods`` shows: every registered family with its sizes, input, encoder size and recipes,
read from the one registration table (``services.models.families.FAMILIES``)."""

from dataclasses import asdict
from functools import cache

import torch

from services.models.families import FAMILIES


@cache
def encoder_parameters(family: str, size: str) -> int:
    """Parameters of a family's encoder of a named size, counted on an encoder built on the meta device
    (shapes only: no memory, no initialisation); once per process."""
    f = FAMILIES[family]
    with torch.device("meta"):
        encoder = f.encoder_class(f.sizes[size])
    return sum(p.numel() for p in encoder.parameters())


def catalogue() -> list[dict]:
    """One entry per family, in registration order; its sizes in their declared order."""
    return [
        {
            "name": f.name,
            "method": f.method,
            "description": f.description,
            "sizes": [
                {
                    "name": size,
                    "input": {
                        "leads": list(spec.leads),
                        "fs": spec.fs,
                        "samples": spec.samples,
                    },
                    "embedding_dim": cfg.width,
                    "encoder_parameters": encoder_parameters(f.name, size),
                    "pretrain_recipe": asdict(f.pretrain_recipes[size]),
                    "finetune_recipe": asdict(f.finetune_recipes[size])
                    if size in f.finetune_recipes
                    else None,
                }
                for size, cfg in f.sizes.items()
                for spec in (f.input_spec(cfg),)
            ],
        }
        for f in FAMILIES.values()
    ]
