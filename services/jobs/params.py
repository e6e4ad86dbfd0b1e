"""What each job kind takes: the parameters of pretraining, fine-tuning and evaluation jobs, validated by
the API and again by the worker (torch-free: the gateway imports them).

``TrainingParams`` holds the settings every training job shares (recipe, registry name, seed,
checkpoints); options that mirror a model's config (``JepaMasking``, ``VqvaeOptions``) are derived from
that config (``derived_options``): its fields, types and defaults, with the API's bounds added.
"""

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from services.datasets import DataPath
from services.models.catalog import BY_METHOD, SPECS
from services.models.ecg_jepa_spec import MaskConfig
from services.models.vqvae_spec import VqConfig


class Params(BaseModel):
    """Base of every job's parameters: a float field refuses NaN and +-Infinity (422 naming the field)."""

    model_config = ConfigDict(allow_inf_nan=False)


MAX_SEED = 2**32 - 1  # what every random generator of a job takes (numpy's legacy seeds, scikit-learn)
SEED = Field(0, ge=0, le=MAX_SEED, description=f"random seed, 0 to {MAX_SEED}")
MODEL_NAME = r"^[A-Za-z0-9_.\-]{1,100}$"


def derived_options(config: type, fields: dict[str, Any]) -> type[Params]:
    """A parameter model with the fields of the dataclass ``config`` named in ``fields``, in the config's
    order, of its types and with its defaults; ``fields`` gives each one's bounds and description (a
    ``Field`` without a default). Subclass it to name the schema and add checks."""
    declared = {f.name: f for f in dataclasses.fields(config)}
    unknown = sorted(set(fields) - set(declared))
    if unknown:
        raise TypeError(f"{config.__name__} has no field {', '.join(unknown)}")
    chosen = {
        name: (Annotated[f.type, fields[name]], f.default) for name, f in declared.items() if name in fields
    }
    return create_model(f"{config.__name__}Options", __base__=Params, **chosen)  # type: ignore[call-overload]


class TrainingParams(Params):
    """The settings every training job takes (pretraining, fine-tuning); those left out come from the
    recipe of the method or family for the size (``GET /methods``)."""

    model_name: str | None = Field(
        None,
        pattern=MODEL_NAME,
        description="registry name; default '<method>-<size>' (pretraining), '<base name>-<method>' "
        "(fine-tuning)",
    )
    epochs: int | None = Field(
        None,
        ge=1,
        le=10_000,
        description="default: the recipe's (GET /methods; fine-tuning methods other than finetune: 10)",
    )
    batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="records per step (triplet: P x K instead); default: the recipe's (fine-tuning methods "
        "other than finetune: 32)",
    )
    learning_rate: float | None = Field(
        None,
        gt=0,
        le=1.0,
        description="peak lr; default: the recipe's, scaled linearly with batch_size (fine-tuning methods "
        "other than finetune: linear_probe 1e-2, triplet and vqvae 1e-3)",
    )
    weight_decay: float | None = Field(
        None,
        ge=0,
        le=1.0,
        description="AdamW weight decay; default: the recipe's (fine-tuning methods other than finetune: "
        "0.01)",
    )
    warmup_epochs: float | None = Field(
        None,
        ge=0,
        le=10_000,
        description="default: the recipe's (fine-tuning methods other than finetune: 1)",
    )
    seed: int = SEED
    checkpoint_every: int = Field(5, ge=1, description="epochs between checkpoints")


class JepaMasking(
    derived_options(
        MaskConfig,
        {
            "kind": Field(description="block: union of several runs of patches; random: patches at random"),
            "scale": Field(
                description="ratio range (low, high): per block for 'block' (default 0.175-0.225), of all "
                "patches for 'random' (default 0.6-0.7)"
            ),
            "blocks": Field(ge=1, le=16, description="runs per mask ('block' only)"),
            "original_block_starts": Field(
                description="the original sampler's block starts, which never mask the last patch"
            ),
        },
    )
):
    """ECG-JEPA's time masking (the same patches masked in every lead)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("scale")
    @classmethod
    def _scale_is_a_range(cls, scale: tuple[float, float] | None) -> tuple[float, float] | None:
        if scale is not None and not 0 < scale[0] <= scale[1] < 1:
            raise ValueError("scale must be (low, high) with 0 < low <= high < 1")
        return scale


METHOD_SIZES = {f.method: tuple(f.sizes) for f in SPECS.values()}
PretrainMethod = Literal[tuple(BY_METHOD)]  # type: ignore[valid-type]
FamilyName = Literal[tuple(SPECS)]  # type: ignore[valid-type]


class DatasetEntry(Params):
    """One dataset of a pretraining job on several: its records are selected like a single dataset's."""

    model_config = ConfigDict(extra="forbid")

    dataset: DataPath = Field(..., description="a registered dataset's name, or a path under the data root")
    folds: list[int] | None = Field(None, description="PTB-XL strat_fold values to use; default all")
    record_limit: int | None = Field(None, ge=2, description="use at most this many of its records")

    @field_validator("folds")
    @classmethod
    def _folds_in_range(cls, folds: list[int] | None) -> list[int] | None:
        return check_folds(folds)


def check_folds(folds: list[int] | None) -> list[int] | None:
    if folds is not None and (not folds or any(f < 1 or f > 10 for f in folds)):
        raise ValueError("folds must be a non-empty list of PTB-XL strat_fold values 1-10")
    return folds


# one dataset (as before lists were taken), or a list; validated as the one or the other, so that the
# errors of a list are its own (no 'should be a valid string' beside them)
DatasetRef = Annotated[
    Annotated[DataPath, Tag("one")] | Annotated[list[DatasetEntry], Tag("list")],
    Discriminator(lambda v: "list" if isinstance(v, list) else "one"),
]


class PretrainParams(TrainingParams):
    """What a pretraining job needs; validated by the API and again by the worker."""

    dataset: DatasetRef = Field(
        ...,
        description="a registered dataset's name (POST /datasets), or a path under the data root "
        "(a PTB-XL folder, a WFDB folder, a .npz), registered on first use; or a list of them to pretrain "
        "on all together, each a name / path or {dataset, folds, record_limit}",
        examples=["ptbxl-500"],
    )
    method: PretrainMethod = Field(
        "st_mem",
        description="st_mem: masked autoencoder (12 leads); ecg_jepa: JEPA with CroPA (8 leads); simclr: "
        "contrastive with ECG augmentations on the 1-D ResNet (12 leads, 100 Hz); GET /methods lists them",
    )
    model_size: Literal["tiny", "small", "base"] = Field(
        "tiny",
        validate_default=True,
        description="tiny (CPU demo), small (ST-MEM only), base (the published encoders); each method's "
        "sizes: GET /methods",
    )
    mask_ratio: float = Field(0.75, gt=0, lt=1, description="ST-MEM: share of each lead's patches masked")
    jepa_masking: JepaMasking = Field(default_factory=JepaMasking, description="ECG-JEPA: time masking")
    clinical_features: bool = Field(
        False,
        description="hybrid model: its embedding is the encoder's followed by the record's clinical "
        "measurements (NeuroKit2 at the record's own rate: HR, SDNN, RMSSD, PR, QRS, QT, QTc, ST in "
        "II/V2/V5, QRS axis), standardised with statistics of the job's training records, and one "
        "missing flag each",
    )
    record_limit: int | None = Field(None, ge=2, description="use at most this many records")
    folds: list[int] | None = Field(
        None, description="PTB-XL strat_fold values to use (e.g. 1-8 to keep 9/10 unseen); default all"
    )
    val_fraction: float = Field(0.1, ge=0, lt=0.5, description="records held out for the per-epoch val_loss")

    @field_validator("folds")
    @classmethod
    def _folds_in_range(cls, folds: list[int] | None) -> list[int] | None:
        return check_folds(folds)

    @field_validator("model_size")
    @classmethod
    def _size_exists(cls, size: str, info: ValidationInfo) -> str:
        """A size the method has (an error on 'model_size'); skipped when 'method' itself was refused."""
        method = info.data.get("method")
        if method is not None and size not in METHOD_SIZES[method]:
            raise ValueError(
                f"model_size '{size}' does not exist for {method} (family {BY_METHOD[method].name}): "
                f"one of {', '.join(METHOD_SIZES[method])} (GET /methods lists each method's sizes)"
            )
        return size

    @field_validator("dataset", mode="before")
    @classmethod
    def _entries(cls, dataset: object) -> object:
        """A list: plain names become entries; empty lists and repeated names are refused."""
        if not isinstance(dataset, list):
            return dataset
        if not dataset:
            raise ValueError("'dataset' is an empty list: give at least one dataset")
        entries = [{"dataset": e} if isinstance(e, str) else e for e in dataset]
        names = [e.get("dataset") if isinstance(e, dict) else None for e in entries]
        for i, name in enumerate(names):
            if name is not None and name in names[:i]:
                raise ValueError(
                    f"dataset[{i}] '{name}' repeats dataset[{names.index(name)}]: give each dataset once "
                    "(with the folds and record_limit it should contribute)"
                )
        return entries

    @model_validator(mode="after")
    def _selection_per_entry(self) -> "PretrainParams":
        if isinstance(self.dataset, list):
            given = [name for name in ("folds", "record_limit") if getattr(self, name) is not None]
            if given:
                raise ValueError(
                    f"with a list of datasets, give {' and '.join(repr(g) for g in given)} per entry "
                    '({"dataset": ..., "folds": [...], "record_limit": ...}), not for the whole job'
                )
        return self

    @model_validator(mode="after")
    def _recipe_filled_in(self) -> "PretrainParams":
        """Fill what was not given from the method's recipe for the size (so that the job row records the
        recipe it ran); the size exists (``_size_exists``)."""
        recipe = BY_METHOD[self.method].pretrain_recipes[self.model_size]
        self.batch_size = self.batch_size or recipe.batch_size
        self.epochs = self.epochs or recipe.epochs
        self.learning_rate = self.learning_rate or recipe.lr_for(self.batch_size)
        self.weight_decay = recipe.weight_decay if self.weight_decay is None else self.weight_decay
        self.warmup_epochs = recipe.warmup_epochs if self.warmup_epochs is None else self.warmup_epochs
        return self

    @property
    def entries(self) -> list[DatasetEntry]:
        """The datasets to train on, in order; a single dataset is one entry with the job's selection."""
        if isinstance(self.dataset, list):
            return list(self.dataset)
        return [DatasetEntry(dataset=self.dataset, folds=self.folds, record_limit=self.record_limit)]

    @property
    def registry_name(self) -> str:
        return self.model_name or f"{self.method}-{self.model_size}"


# --------------------------------------------------------------------------------------------------
# downstream jobs: fine-tuning (4 methods) and evaluation of a registered model version

FinetuneMethod = Literal["linear_probe", "finetune", "triplet", "vqvae"]
Protocol = Literal["knn", "linear_probe", "clustering"]
MODEL_REF = Field(
    ...,
    min_length=1,
    description="the base model version, as /embed takes it: 'name@version', 'name@alias' or 'name'",
    examples=["st_mem-tiny@1"],
)
DATASET_REF = Field(
    ...,
    description="a registered labelled dataset's name, or a path under the data root (registered on first "
    "use); split into train / val / test by its folds (PTB-XL 1-8 / 9 / 10) or 80/10/10 by patient",
    examples=["ptbxl-500"],
)


class TripletOptions(Params):
    """Triplet-loss metric head (services.models.triplet): P x K class-balanced batches."""

    model_config = ConfigDict(extra="forbid")

    embedding_dim: int = Field(128, ge=2, le=4096, description="size of the unit-norm embedding")
    hidden_dim: int = Field(256, ge=2, le=8192, description="hidden layer of the projection MLP")
    margin: float = Field(0.2, gt=0, le=2.0, description="hinge margin on unit vectors (distances 0..2)")
    mining: Literal["batch_hard", "semi_hard", "batch_all"] = Field(
        "batch_all",
        description="which triplets of each P x K batch count; batch_all raised the kNN AUROC most in our "
        "measurement (services.models.triplet)",
    )
    p: int = Field(5, ge=2, le=100, description="classes per batch")
    k: int = Field(8, ge=2, le=1000, description="records per class in a batch")
    unfreeze_blocks: int = Field(0, ge=0, le=48, description="train the encoder's last N blocks too")


class VqvaeOptions(
    derived_options(
        VqConfig,
        {
            "num_codes": Field(ge=2, le=65_536, description="codebook size"),
            "code_dim": Field(ge=2, le=1024, description="dimension of the (unit-norm) codes"),
            "commitment": Field(ge=0, le=10, description="beta of the commitment term"),
            "decay": Field(gt=0, lt=1, description="EMA decay of the codebook"),
            "dead_threshold": Field(ge=0, description="EMA assignments per step below which a code restarts"),
            "decoder_hidden": Field(ge=2, le=8192),
        },
    )
):
    """Token-level VQ-VAE head (services.models.vqvae) on the frozen encoder's patch tokens."""

    model_config = ConfigDict(extra="forbid")


class DownstreamCommon(Params):
    dataset: DataPath = DATASET_REF
    seed: int = SEED
    record_limit: int | None = Field(
        None, ge=3, description="use only the dataset's first N records (in its order), then split them"
    )
    test_fold: int | None = Field(
        None,
        ge=1,
        le=10,
        description="cross-validation: fold k tests, fold k + 1 (10 -> 1) validates, the other eight train; "
        "default: folds 1-8 train, 9 validates, 10 tests",
    )
    knn_k: int = Field(20, ge=1, le=1000, description="neighbours of the kNN protocol / predictor")
    knn_metric: Literal["cosine", "euclidean"] = Field("cosine", description="kNN distance")


# options of method finetune alone, and the value that means the same for another method
FINETUNE_ONLY = {"ensemble": 1, "ema_decay": 0, "wise_ft": 1}

# A linear head on frozen features: the linear_probe job's recipe, and a probe_first fine-tune's first stage.
PROBE_RECIPE = {
    "epochs": 10,
    "batch_size": 32,
    "learning_rate": 1e-2,
    "weight_decay": 0.01,
    "warmup_epochs": 1.0,
}


class FinetuneParams(DownstreamCommon, TrainingParams):
    """Adapt a registered encoder (or a new one of a family, trained from scratch) to a labelled dataset;
    the result is registered as a new model version."""

    model: str | None = Field(
        None,
        min_length=1,
        description="the base model version, as /embed takes it: 'name@version', 'name@alias' or 'name'; "
        "omit it and give 'family' to start from a randomly initialised encoder",
        examples=["st_mem-tiny@1"],
    )
    family: FamilyName | None = Field(
        None,
        description="without 'model': the encoder family to train from scratch (resnet1d: the supervised "
        "1-D ResNet baseline; st_mem, ecg_jepa: a random-init transformer); GET /methods lists them",
    )
    model_size: str | None = Field(
        None,
        description="with 'family' only: its size (GET /methods lists each family's); default resnet1d "
        "base, else tiny",
    )
    method: FinetuneMethod = Field(
        ...,
        description="linear_probe: linear head on frozen features (computed once); finetune: encoder + head, "
        "all trained, the best validation epoch kept; triplet: triplet-loss metric head; vqvae: token "
        "VQ-VAE head",
    )
    layer_decay: float | None = Field(
        None,
        gt=0,
        le=1.0,
        description="finetune: layer-wise lr decay of a transformer's blocks; default: the recipe's",
    )
    augment: bool | None = Field(
        None, description="finetune: ST-MEM's RandAugment on the training windows; default: the recipe's"
    )
    probe_first: bool | None = Field(
        None,
        description="finetune: LP-FT, fit the linear head on the frozen encoder first (as a linear_probe "
        "job), then train encoder and head from there; default: the recipe's (off from scratch)",
    )
    ema_decay: float | None = Field(
        None,
        ge=0,
        lt=1,
        description="finetune: validate and keep an exponential moving average of the weights, updated every "
        "step with this decay (e.g. 0.97: about the last 33 steps), instead of the weights themselves; 0 "
        "off; default: the recipe's",
    )
    wise_ft: float | None = Field(
        None,
        gt=0,
        le=1,
        description="finetune from a pretrained model: WiSE-FT, validate and keep the weights (1 - a) * "
        "start + a * fine-tuned, where the start is LP-FT's first stage (the pretrained encoder with the "
        "probe's head; so it implies probe_first); 1 off; default: the recipe's",
    )
    ensemble: int | None = Field(
        None,
        ge=1,
        le=10,
        description="finetune: train this many members (seeds seed, seed + 1, ...) and serve the mean of "
        "their probabilities (the embedding: theirs side by side); default: the recipe's",
    )
    map_method: Literal["tsne", "pca"] = Field(
        "pca",
        description="2-D map of the test embeddings (t-SNE took over a minute of a 2-minute job on 2 cores)",
    )
    keep_best: bool = Field(
        True,
        description="finetune: keep the weights of the epoch with the best validation macro AUROC (else the "
        "last epoch's)",
    )
    triplet: TripletOptions = Field(default_factory=TripletOptions, description="method triplet only")
    vqvae: VqvaeOptions = Field(default_factory=VqvaeOptions, description="method vqvae only")

    # Checks of one field against the fields declared before it (info.data) report on that field; each is
    # skipped when the field it depends on was itself refused (that field's error says why).

    @field_validator("family")
    @classmethod
    def _family_or_model(cls, family: str | None, info: ValidationInfo) -> str | None:
        if family is not None and info.data.get("model") is not None:
            raise ValueError(
                f"give either 'model' or 'family', not both: 'model' ('{info.data['model']}') starts from a "
                f"registered version (of its own family), 'family' ('{family}') from a new encoder trained "
                "from scratch"
            )
        return family

    @field_validator("model_size")
    @classmethod
    def _size_of_the_family(cls, size: str | None, info: ValidationInfo) -> str | None:
        if size is None:
            return size
        if info.data.get("model") is not None:
            raise ValueError(
                f"'model_size' goes with 'family' only: model '{info.data['model']}' is a registered "
                "version of its own size; leave 'model_size' out"
            )
        family = info.data.get("family")
        if family is not None and size not in SPECS[family].sizes:
            raise ValueError(
                f"model_size '{size}' does not exist for {family}: one of "
                f"{', '.join(SPECS[family].sizes)} (GET /methods lists each family's sizes)"
            )
        return size

    @field_validator("ema_decay", "wise_ft", "ensemble")
    @classmethod
    def _options_of_a_finetune(cls, value: float | None, info: ValidationInfo) -> float | None:
        method, off = info.data.get("method"), FINETUNE_ONLY[info.field_name]
        if value not in (None, off) and method is not None and method != "finetune":
            raise ValueError(
                f"'{info.field_name}' goes with method 'finetune' only, not '{method}' ({value} asked): "
                f"leave it out or give {off}"
            )
        return value

    @model_validator(mode="after")
    def _options_match_the_method(self) -> "FinetuneParams":
        defaults = {"triplet": TripletOptions(), "vqvae": VqvaeOptions()}
        for option, default in defaults.items():  # (the stored params carry both, at their defaults)
            if self.method != option and getattr(self, option) != default:
                raise ValueError(f"'{option}' options were given but method is '{self.method}'")
        if self.model is None and self.family is None:
            raise ValueError(
                "give either 'model' (a registered version to start from, e.g. 'st_mem-tiny@1') or "
                f"'family' (a new encoder trained from scratch: one of {', '.join(SPECS)}): "
                "neither was given"
            )
        if self.wise_ft not in (None, 1):  # WiSE-FT starts from LP-FT's first stage
            if self.family is not None:
                raise ValueError(
                    f"'wise_ft' ({self.wise_ft}) interpolates between a pretrained encoder with the probe's "
                    "head and its fine-tuned weights: it needs 'model' (a pretrained version), and a "
                    f"{self.family} trained from scratch has no such start; leave it out or give 1"
                )
            if self.probe_first is False:
                raise ValueError(
                    f"'wise_ft' ({self.wise_ft}) starts from LP-FT's first stage (the probe's head on the "
                    "frozen encoder): leave 'probe_first' out or give true, or give wise_ft 1"
                )
            if self.ema_decay not in (None, 0):
                raise ValueError(
                    f"give 'wise_ft' ({self.wise_ft}) or 'ema_decay' ({self.ema_decay}), not both: each "
                    "decides which weights are validated and kept"
                )
        if self.family is not None:  # (its size was checked by _size_of_the_family)
            self.model_size = self.model_size or ("base" if self.family == "resnet1d" else "tiny")
        return self

    def recipe(self, family: str, size: str) -> dict:
        """The training settings the job runs with: what was given, the rest from the defaults (``finetune``:
        the family's recipe for the size)."""
        recipes = SPECS[family].finetune_recipes
        r = recipes.get(size) or next(iter(recipes.values()))  # a custom size: the first size's
        if self.method == "finetune":
            batch = self.batch_size or r.batch_size
            defaults = {
                "epochs": r.epochs,
                "learning_rate": r.lr_for(batch),
                "weight_decay": r.weight_decay,
                "warmup_epochs": r.warmup_epochs,
                "layer_decay": r.layer_decay,
                "augment": r.augment,
                "ensemble": r.ensemble,
                "probe_first": r.probe_first,
                "ema_decay": r.ema_decay,
                "wise_ft": r.wise_ft,
            }
            if self.model is None:  # from scratch: no pretrained features to keep or to probe first
                defaults.update(
                    layer_decay=1.0, probe_first=False, wise_ft=1.0, learning_rate=r.scratch_lr_for(batch)
                )
                if r.scratch_ema_decay is not None:
                    defaults["ema_decay"] = r.scratch_ema_decay
        else:
            batch = self.batch_size or PROBE_RECIPE["batch_size"]
            lr = PROBE_RECIPE["learning_rate"] if self.method == "linear_probe" else 1e-3
            defaults = {
                **PROBE_RECIPE,
                "epochs": r.linear_probe_epochs if self.method == "linear_probe" else PROBE_RECIPE["epochs"],
                "learning_rate": lr,
                "layer_decay": 1.0,
                "augment": False,
                "ensemble": 1,
                "probe_first": False,
                "ema_decay": 0.0,
                "wise_ft": 1.0,
            }
        given = {k: getattr(self, k) for k in defaults if getattr(self, k) is not None}
        recipe = {**defaults, **given, "batch_size": batch}
        if recipe["wise_ft"] < 1:  # WiSE-FT's start is LP-FT's first stage
            recipe["probe_first"] = True
        return recipe

    def registry_name(self, base_name: str) -> str:
        return self.model_name or f"{base_name}-{self.method}"[:100]


class EvaluateParams(DownstreamCommon):
    """Evaluate a registered model version's embeddings (as served: its fp32 ONNX graph) on a labelled
    dataset: kNN, linear probe, clustering; optionally store the training embeddings as its kNN reference."""

    model: str = MODEL_REF

    protocols: list[Protocol] = Field(
        default_factory=lambda: ["knn", "linear_probe", "clustering"], min_length=1
    )
    probe_epochs: int = Field(100, ge=1, le=10_000, description="linear probe: epochs of the linear head")
    probe_learning_rate: float = Field(1e-2, gt=0, le=1.0)
    probe_weight_decay: float = Field(1e-2, ge=0, le=1.0)
    store_reference: bool = Field(
        True,
        description="with 'knn': keep the training-fold embeddings and labels as the version's reference "
        "set for POST /predict?method=knn (replacing an earlier one)",
    )
    map_method: Literal["tsne", "pca"] = Field("tsne", description="2-D map of the test embeddings")

    @field_validator("protocols")
    @classmethod
    def _unique(cls, protocols: list[str]) -> list[str]:
        return list(dict.fromkeys(protocols))


class EmbedDatasetParams(Params):
    """What an embedding export job needs; validated by the API and again by the worker."""

    model_config = ConfigDict(extra="forbid")

    dataset: DataPath = DATASET_REF
    model: str = Field(
        ...,
        min_length=1,
        description="the version to embed with, as /embed takes it: 'name@version', 'name@alias' or 'name' "
        "(its 'production' alias); the job's result names the version it used",
        examples=["ecg-diagnosis@1"],
    )
    folds: list[int] | None = Field(None, description="PTB-XL strat_fold values to embed; default all")
    record_limit: int | None = Field(
        None, ge=1, description="embed only the first N records of the selection (in the dataset's order)"
    )
    precision: Literal["auto", "fp32", "int8", "fp16"] = Field(
        "fp32",
        description="ONNX variant, as /embed's precision: fp32 (default: the exported graph), int8 / fp16 "
        "where the version's variant passed its check, auto as the gateway's setting would choose",
    )
    windowing: Literal["sliding", "center"] = Field(
        "sliding", description="as /embed: mean over sliding windows, or one centre crop"
    )
    pad: bool = Field(False, description="as /embed: zero-pad a record shorter than the model's window")
    interpolate_nan: bool = Field(False, description="as /embed: interpolate NaN samples instead of skipping")

    @field_validator("folds")
    @classmethod
    def _folds_in_range(cls, folds: list[int] | None) -> list[int] | None:
        return check_folds(folds)
