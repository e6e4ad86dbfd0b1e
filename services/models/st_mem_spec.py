"""ST-MEM's spec without torch: its config and sizes, input and recipes (``services.models.st_mem`` holds
the model and objective, and builds its ``FAMILY`` on this ``SPEC``)."""

from dataclasses import dataclass

from services.ecg.preprocess import InputSpec
from services.models.family import FamilySpec, FinetuneRecipe, PretrainRecipe


@dataclass(frozen=True)
class StMemConfig:
    seq_len: int = 2250
    patch_size: int = 75
    num_leads: int = 12
    width: int = 768
    depth: int = 12
    heads: int = 12
    dim_head: int = 64
    mlp_dim: int = 3072
    qkv_bias: bool = True
    decoder_width: int = 256
    decoder_depth: int = 4
    decoder_heads: int = 4
    norm_pix_loss: bool = True

    @property
    def num_patches(self) -> int:
        return self.seq_len // self.patch_size


SIZES: dict[str, StMemConfig] = {
    # tiny: for tests and CPU demos; small = ViT-S/75; base = ViT-B/75 (the published encoder)
    "tiny": StMemConfig(width=64, depth=2, heads=2, dim_head=32, mlp_dim=256, decoder_width=64,
                        decoder_depth=1, decoder_heads=2),
    "small": StMemConfig(width=384, depth=12, heads=6, dim_head=64, mlp_dim=1536),
    "base": StMemConfig(width=768, depth=12, heads=12, dim_head=64, mlp_dim=3072),
}  # fmt: skip

_SEARCHED = "out-of-fold probes over folds 1-9 (reports/learning_check_st_mem.md); reports/benchmark.py"
_PAPER = "the paper's recipe (Na et al. 2024), not measured here"
_FINETUNE = FinetuneRecipe(1e-3, 32, 30, 0.05, 3, 0.75, False, "reports/benchmark.py (validation folds)")

SPEC = FamilySpec(
    name="st_mem",
    method="st_mem",
    description="ST-MEM: ViT over per-lead patches, masked autoencoding (12 leads, 250 Hz, 9 s)",
    sizes=SIZES,
    config_class=StMemConfig,
    input_spec=lambda cfg: InputSpec(samples=cfg.seq_len),
    pretrain_recipes={
        # 480 epochs (16-90 min on 2-core machines, 2-11.5 s an epoch; 24.5 min on an Intel Xeon in bf16):
        # 10-fold validation probe 0.826, against 0.810 at 240 epochs (the same seeded probe head), 0.807 at
        # 120 and 0.787 at 30 (reports/benchmark.py)
        "tiny": PretrainRecipe(3e-3, 32, 480, 0.01, 3, _SEARCHED),
        "small": PretrainRecipe(1.5e-4 * 32 / 256, 32, 100, 0.05, 5, _PAPER),
        "base": PretrainRecipe(1.5e-4 * 32 / 256, 32, 100, 0.05, 5, _PAPER),
    },
    finetune_recipes={"tiny": _FINETUNE, "small": _FINETUNE, "base": _FINETUNE},
    encoder_parameters={"tiny": 108_118, "small": 21_341_718, "base": 85_150_614},
)
