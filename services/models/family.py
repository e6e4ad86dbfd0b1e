"""What a model family declares, in two parts: its spec (``FamilySpec``: names, sizes, input, recipes;
pure data, in the torch-free ``<family>_spec`` module) and the family itself (``Family``: the spec plus
its nn.Modules, in the ``<family>`` module's ``FAMILY``).

A family is an encoder architecture with its sizes, the input it consumes, its self-supervised objective,
its default recipes, and how its saved weights load. ``services.models.catalog.SPECS`` is the torch-free
table the gateway reads (job parameters, ``GET /methods``); ``services.models.families.FAMILIES`` is the
registration table that pretraining, fine-tuning, export and import read a family through. This module
imports no torch (the annotations name it only for type checkers).
"""

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

from services.ecg.preprocess import InputSpec

if TYPE_CHECKING:
    from torch import nn


class _LinearLrScaling:
    """A recipe's peak lr is given at its ``batch_size`` and scaled linearly with the batch."""

    learning_rate: float
    batch_size: int

    def lr_for(self, batch_size: int) -> float:
        return self.learning_rate * batch_size / self.batch_size


@dataclass(frozen=True)
class PretrainRecipe(_LinearLrScaling):
    """Pretraining defaults of one size: the peak lr is given at ``batch_size`` and scaled linearly."""

    learning_rate: float
    batch_size: int
    epochs: int
    weight_decay: float
    warmup_epochs: float
    evidence: str  # where it was shown to learn (a reports/ command or the paper)


@dataclass(frozen=True)
class FinetuneRecipe(_LinearLrScaling):
    """Fine-tuning defaults (encoder + linear head, all trained) of one size; lr scaled like pretraining.

    ``layer_decay``: layer-wise lr decay (block i of n trains at lr * decay ** (n - i); a CNN's blocks are its
    stem and stages). ``augment``: ST-MEM's RandAugment on the training windows. ``layer_decay`` and
    ``probe_first`` keep pretrained features: a job that trains a family from scratch runs without them, and
    at ``scratch_learning_rate`` and ``scratch_ema_decay`` where they are given.
    """

    learning_rate: float
    batch_size: int
    epochs: int
    weight_decay: float
    warmup_epochs: float
    layer_decay: float
    augment: bool
    evidence: str
    ensemble: int = 1  # members (seeds seed, seed + 1, ...) served as the mean of their probabilities
    probe_first: bool = False  # LP-FT: the head fitted on the frozen encoder first (pretrained encoders only)
    scratch_learning_rate: float | None = None  # peak lr at batch_size from scratch (None: learning_rate)
    # an exponential moving average of the weights, updated every step, is what each epoch validates and
    # what is kept (0: off, the trained weights themselves)
    ema_decay: float = 0.0
    scratch_ema_decay: float | None = None  # ema_decay from scratch (None: ema_decay)
    # WiSE-FT: the kept weights (1 - a) * LP-FT's start + a * the fine-tuned ones (1: off; needs probe_first)
    wise_ft: float = 1.0
    # the linear_probe job's head epochs on this size's frozen encoder (LP-FT's first stage keeps the
    # probe recipe's, services.jobs.params.PROBE_RECIPE)
    linear_probe_epochs: int = 10

    def scratch_lr_for(self, batch_size: int) -> float:
        """The peak lr of a network trained from scratch, scaled linearly with the batch like ``lr_for``."""
        return (self.scratch_learning_rate or self.learning_rate) * batch_size / self.batch_size


@dataclass(frozen=True)
class FamilySpec:
    """What is known of a family without torch: its names, sizes, input, encoder sizes and recipes."""

    name: str  # as stored with saved weights and model versions, e.g. "resnet1d"
    method: str  # its self-supervised pretraining method, as a pretraining job names it, e.g. "simclr"
    description: str
    sizes: dict[str, Any]  # size name -> config dataclass
    config_class: type
    input_spec: Callable[[Any], InputSpec]  # config -> what the encoder consumes
    pretrain_recipes: dict[str, PretrainRecipe]
    finetune_recipes: dict[str, FinetuneRecipe]
    # size name -> parameters of its encoder (without heads or decoders); declared, since counting them
    # needs the model (tests/test_methods.py counts them on the real encoders)
    encoder_parameters: dict[str, int]

    def config_from_dict(self, data: dict) -> Any:
        """A config saved with ``dataclasses.asdict`` (tuples come back as lists)."""
        return self.config_class(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclass(frozen=True)
class Family(FamilySpec):
    """One encoder family: its spec, and its architecture, objective and training hooks (torch)."""

    encoder_class: "type[nn.Module]"  # encoder(cfg): (B, C, L) -> (B, cfg.width)
    objective: "Callable[[Any, Any], nn.Module]"  # (config, pretraining params) -> model(batch) -> loss
    # its blocks from input to output (transformer blocks, a CNN's stem and stages), for layer-wise lr decay
    blocks: "Callable[[nn.Module], list[nn.Module]]" = field(default=lambda encoder: [])
    tokens: "Callable[[nn.Module], nn.Module] | None" = None  # per-lead patch tokens (B, C, N, D), for VQ-VAE
    cpu_autocast: bool = True  # bf16 autocast on CPUs with native bf16 (False where it measured slower)

    @classmethod
    def of(cls, spec: FamilySpec, **modules: Any) -> "Family":
        """The family of ``spec`` with its modules (``encoder_class``, ``objective``, ...)."""
        return cls(**{f.name: getattr(spec, f.name) for f in fields(FamilySpec)}, **modules)

    @property
    def spec(self) -> FamilySpec:
        """Its torch-free part (equal to ``services.models.catalog.SPECS[self.name]``)."""
        return FamilySpec(**{f.name: getattr(self, f.name) for f in fields(FamilySpec)})

    def amp(self, device_type: str) -> bool:
        """Whether training autocasts on this device (``TrainConfig.amp``)."""
        return device_type != "cpu" or self.cpu_autocast
