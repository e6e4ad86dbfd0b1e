"""What ``GET /methods`` shows: every registered family with its sizes, input, encoder size and recipes,
read from the torch-free catalogue (``services.models.catalog.SPECS``; the gateway never loads torch)."""

from dataclasses import asdict

from services.models.catalog import SPECS


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
                    "encoder_parameters": f.encoder_parameters[size],
                    "pretrain_recipe": asdict(f.pretrain_recipes[size]),
                    "finetune_recipe": asdict(f.finetune_recipes[size])
                    if size in f.finetune_recipes
                    else None,
                }
                for size, cfg in f.sizes.items()
                for spec in (f.input_spec(cfg),)
            ],
        }
        for f in SPECS.values()
    ]
