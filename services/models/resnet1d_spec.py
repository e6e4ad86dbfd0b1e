"""The 1-D ResNet family's spec without torch: its config and sizes, input and recipes
(``services.models.resnet1d`` holds the model and SimCLR, and builds its ``FAMILY`` on this ``SPEC``)."""

from dataclasses import dataclass, replace

from services.ecg.preprocess import InputSpec
from services.models.family import FamilySpec, FinetuneRecipe, PretrainRecipe

INPUT_SPEC = InputSpec(fs=100.0, samples=250)  # 12 standard leads, 2.5-s windows at 100 Hz


@dataclass(frozen=True)
class Resnet1dConfig:
    num_leads: int = 12
    channels: int = 128
    stem_kernel: int = 7
    kernels: tuple[int, int] = (5, 3)  # the two convolutions of a basic block
    strides: tuple[int, ...] = (1, 2, 2)  # one basic block per stage
    seq_len: int = INPUT_SPEC.samples

    @property
    def width(self) -> int:
        """Embedding size: concat pooling of max and mean."""
        return 2 * self.channels


SIZES: dict[str, Resnet1dConfig] = {
    "tiny": Resnet1dConfig(channels=64),
    "base": Resnet1dConfig(channels=128),  # resnet1d_wang
}

_BENCHMARK = "reports/benchmark.py (validation folds of the 10-fold cross-validation)"
# from a pretrained encoder, LP-FT (the probe first): of the recipes tried on SimCLR tiny (plain, LP-FT, layer
# decay 0.7, both), the highest validation mean over two seeds (0.895 against 0.893 plain, 0.894 decay 0.7);
# a network trained from scratch runs without it (FinetuneParams.recipe) and keeps the weights' moving
# average at decay 0.97: cross-fit +0.013 on the base network (supervised-ema0.97), +0.010 on the tiny one,
# +0.005 on three tiny ones over three seeds (0.9 read lower); from a pretrained SimCLR tiny encoder it moved
# nothing (+0.001), so it stays off there
_FINETUNE = FinetuneRecipe(
    1e-2, 64, 30, 1e-2, 9, 1.0, False, _BENCHMARK, probe_first=True, scratch_ema_decay=0.97
)
# tiny, from a pretrained encoder at lr 1e-3: the highest cross-fit validation mean (epoch chosen and read on
# different halves of the validation fold) of LP-FT at 1e-2, 3e-3 and 1e-3, plain and layer decay 0.7 at 1e-2
# (0.867 against 0.857, 0.862, 0.857, 0.856; reports/benchmark.md); from scratch it trains at 1e-2, batch
# 64, 30 epochs, weight decay 1e-2, without augmentation: each of 60 epochs, weight decay 0.1, lr 3e-3 or
# 3e-2, batch 32 and RandAugment moved the cross-fit mean by -0.008 to +0.003 (supervised-tiny-*, -aug lines)
_FINETUNE_TINY = replace(_FINETUNE, learning_rate=1e-3, scratch_learning_rate=1e-2)

SPEC = FamilySpec(
    name="resnet1d",
    method="simclr",
    description="1-D ResNet (resnet1d_wang), SimCLR with ECG augmentations (12 leads, 100 Hz, 2.5 s)",
    sizes=SIZES,
    config_class=Resnet1dConfig,
    input_spec=lambda cfg: INPUT_SPEC,
    pretrain_recipes={
        # 150 epochs (7 min on 2 cores) over 50: validation probe 0.861 against 0.856, fine-tune 0.894 / 0.892
        # (400 epochs: 0.859 / 0.891 against 0.866 / 0.898 for 150 with a seeded probe head, so 150 stays)
        "tiny": PretrainRecipe(1e-3, 128, 150, 1e-2, 5, _BENCHMARK),
        "base": PretrainRecipe(1e-3, 128, 100, 1e-2, 5, _BENCHMARK),
    },
    finetune_recipes={"tiny": _FINETUNE_TINY, "base": _FINETUNE},
    encoder_parameters={"tiny": 113_024, "base": 439_040},
)
