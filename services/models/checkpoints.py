"""Load published encoder checkpoints, strictly, into the service's model classes.

One loader per checkpoint format (``LOADERS``; ``load_encoder(fmt, path)`` dispatches), each returning the
encoder ((B, C, L) -> (B, D), ready for ``services.export.onnx.export_encoder``) and a ``CheckpointInfo``
that says what the encoder consumes. Files are read with ``torch.load(weights_only=True)``: a pickle that
holds code or objects other than tensors and plain containers is refused, never executed.

``st_mem``: the two files of the official ST-MEM release (``bakqui/ST-MEM``), a dict whose ``model`` entry
holds either the encoder (``encoder.pth``, 166 tensors for ViT-B/75: ``pos_embedding``,
``sep_embedding``, ``to_patch_embedding.*``, ``lead_embeddings.*``, ``block{i}.*``, ``norm.*``) or the
whole masked autoencoder (228 tensors: the encoder under ``encoder.``, the shared patch embedding once
more at the top level, and the decoder). A bare state dict of either layout is accepted too. The model
size is recognised from the width (tiny 64, small 384, base 768); the depth, heads and decoder come from
that size, the input geometry (patch size, window length, number of leads) from the tensor shapes. The
file must then hold exactly the names and shapes of that layout: any missing or unexpected key or
mismatched shape is refused with a message that lists them.

``ecg_jepa``: the official ECG-JEPA release (``sehunfromdaegu/ECG_JEPA``), a dict whose ``encoder`` entry
(or ``model`` entry) holds the context encoder's state dict (137 tensors for ViT-B: ``pos_embed``,
``encoder_blocks.blocks.{i}.*``, ``norm.*``, ``W_P.*``), or that state dict bare. The size is recognised
from the width (tiny 64, base 768), the patch size from ``W_P.weight``, the number of patches from
``pos_embed`` (8 leads); then the file must hold exactly the names and shapes of that layout. The encoder
consumes the 8 leads I, II, V1-V6.
"""

import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from services.ecg.leads import STANDARD_LEADS
from services.errors import ClientError
from services.models import ecg_jepa
from services.models.catalog import FORMATS as FORMATS  # the formats load_encoder reads (torch-free there)
from services.models.catalog import ImportFormat as ImportFormat
from services.models.ecg_jepa import EcgJepaConfig, EcgJepaEncoder
from services.models.families import family, family_of
from services.models.st_mem import SIZES, StMemConfig, StMemEncoder, StMemMae

_SHOW = 5  # keys listed per kind of mismatch in an error message


class CheckpointError(ClientError):
    """A checkpoint file cannot be loaded: not a torch file, refused pickle, or another layout (422)."""


@dataclass(frozen=True)
class CheckpointInfo:
    """What was loaded, and what the encoder consumes (``leads`` None: not the service's 12 leads)."""

    format: str
    layout: str  # which of the format's layouts the file has, e.g. "encoder" or "full"
    size: str  # named model size, e.g. "base"
    tensors: int  # tensors in the file's state dict
    parameters: int  # elements of the encoder's state dict
    embedding_dim: int
    samples: int  # window length the encoder takes
    fs: float  # sampling rate the encoder was trained at
    leads: tuple[str, ...] | None  # in the encoder's order (ST-MEM: None when not the 12 standard leads)
    num_leads: int
    config: dict

    def metrics(self) -> dict:
        """The parts worth storing with a registered model version."""
        return {
            "layout": self.layout,
            "model_size": self.size,
            "checkpoint_tensors": self.tensors,
            "parameters": self.parameters,
        }


# --------------------------------------------------------------------------------------------------
# generic: reading the file, finding the state dict, comparing layouts


def read_checkpoint(path: Path) -> object:
    """``torch.load`` with weights only; every failure becomes a ``CheckpointError`` naming the file."""
    name = Path(path).name
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        refused = re.search(r"GLOBAL ([\w.]+)", text)
        if refused:
            raise CheckpointError(
                f"checkpoint '{name}' was refused: it pickles Python objects other than tensors and plain "
                f"containers ({refused.group(1)}), which could run code when loaded; save only the state "
                "dict, e.g. torch.save({'model': model.state_dict()}, path)"
            ) from None
        raise CheckpointError(f"'{name}' is not a PyTorch checkpoint (torch.save file)") from None
    except Exception as exc:  # EOFError, KeyError, RuntimeError (bad zip), ...: not a torch file
        raise CheckpointError(
            f"'{name}' is not a PyTorch checkpoint (torch.save file): {type(exc).__name__}"
        ) from None


def _looks_like_ecg_jepa(keys: list[str]) -> bool:
    return any(k.startswith(("encoder_blocks.", "W_P.")) for k in keys)


def state_dict_from(obj: object, name: str, entry: str = "model") -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in a loaded checkpoint: ``obj[entry]`` or ``obj`` itself; and where it was found."""
    if isinstance(obj, Mapping) and isinstance(obj.get(entry), Mapping):
        state, where = obj[entry], f"['{entry}']"
    elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        state, where = obj, "the top level"
    else:
        if isinstance(obj, Mapping):
            keys = [str(k) for k in obj]
            nested = [v for v in obj.values() if isinstance(v, Mapping)]
            hint = ""
            if any(_looks_like_ecg_jepa([str(k) for k in v]) for v in nested):
                hint = " It looks like an ECG-JEPA checkpoint, which format 'st_mem' cannot load."
            raise CheckpointError(
                f"checkpoint '{name}' has no '{entry}' entry holding a state dict (its entries: "
                f"{', '.join(keys[:10]) or 'none'}); expected a dict whose '{entry}' is the state dict, "
                f"as in the official files, or a bare state dict.{hint}"
            )
        raise CheckpointError(
            f"checkpoint '{name}' holds a {type(obj).__name__}, not a dict with a '{entry}' state dict"
        )
    not_tensors = [str(k) for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(
            f"checkpoint '{name}': {where} is not a state dict; entries that are not tensors: "
            f"{_listing(not_tensors)}"
        )
    if not state:
        raise CheckpointError(f"checkpoint '{name}': the state dict in {where} is empty")
    return {str(k): v for k, v in state.items()}, where


def _listing(items: list[str]) -> str:
    shown = ", ".join(items[:_SHOW])
    return shown + (f" and {len(items) - _SHOW} more" if len(items) > _SHOW else "")


def _shape(shape: tuple[int, ...] | torch.Size) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def layout_problems(state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size]) -> list[str]:
    """What differs between a state dict and an expected {name: shape} layout (empty: identical)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} is {_shape(state[k].shape)} in the file, expected {_shape(expected[k])}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k])
    ]
    not_float = [
        f"{k} has dtype {str(state[k].dtype).removeprefix('torch.')}"
        for k in expected
        if k in state and not state[k].is_floating_point()
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} shape mismatch(es): {_listing(wrong_shape)}")
    if not_float:
        problems.append(f"{len(not_float)} tensor(s) not floating point: {_listing(not_float)}")
    return problems


def check_layout(
    state: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Size], name: str, layout: str
) -> None:
    problems = layout_problems(state, expected)
    if problems:
        raise CheckpointError(
            f"checkpoint '{name}' does not match the {layout} ({len(expected)} tensors; the file has "
            f"{len(state)}): " + "; ".join(problems)
        )


def check_finite(state: Mapping[str, torch.Tensor], name: str) -> None:
    # a NaN or inf makes the sum non-finite, so a finite sum clears a tensor without a full-size mask
    bad = [
        k
        for k, v in state.items()
        if v.is_floating_point() and not torch.isfinite(v.sum()) and not torch.isfinite(v).all()
    ]
    if bad:
        raise CheckpointError(f"checkpoint '{name}': {len(bad)} tensor(s) hold NaN or inf: {_listing(bad)}")


def strict_load(model: nn.Module, state: Mapping[str, torch.Tensor], name: str) -> None:
    """``load_state_dict(strict=True)``, its errors as ``CheckpointError``."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint '{name}' does not load strictly: {exc}") from None


def shapes_of(module: nn.Module) -> dict[str, torch.Size]:
    return {k: v.shape for k, v in module.state_dict().items()}


# --------------------------------------------------------------------------------------------------
# ST-MEM

ST_MEM_FS = 250.0  # ST-MEM's input: 12 leads at 250 Hz, 2250-sample (9 s) windows
_ST_MEM_REQUIRED = ("pos_embedding", "to_patch_embedding.2.weight")
_SIZE_BY_WIDTH = {cfg.width: name for name, cfg in SIZES.items()}


def _st_mem_layout_text(size: str, cfg: StMemConfig, full: bool) -> str:
    encoder = (
        f"pos_embedding, sep_embedding, to_patch_embedding.*, lead_embeddings.0-{cfg.num_leads - 1}, "
        f"block0-{cfg.depth - 1}.*, norm.*"
    )
    if not full:
        return f"ST-MEM {size} encoder layout ({encoder})"
    return (
        f"ST-MEM {size} full (masked autoencoder) layout (encoder.{{{encoder}}}, to_patch_embedding.*, "
        f"to_decoder_embedding.*, mask_embedding, decoder_pos_embed, decoder_blocks.0-"
        f"{cfg.decoder_depth - 1}.*, decoder_norm.*, decoder_head.*)"
    )


def _st_mem_config(
    encoder_state: Mapping[str, torch.Tensor], name: str, full: bool
) -> tuple[str, StMemConfig]:
    """The named size (by width) and its config, with patch size, window and leads from the shapes."""
    prefix = "encoder." if full else ""
    missing = [prefix + k for k in _ST_MEM_REQUIRED if k not in encoder_state]
    if missing:
        found = list(encoder_state)[:_SHOW]
        raise CheckpointError(
            f"checkpoint '{name}' is not an ST-MEM {'full' if full else 'encoder'} state dict: "
            f"missing {', '.join(missing)} (expected keys like {prefix}pos_embedding, "
            f"{prefix}block0.attn.fn.to_qkv.weight; the file has e.g. {', '.join(found) or 'nothing'})"
        )
    patch = encoder_state["to_patch_embedding.2.weight"]
    pos = encoder_state["pos_embedding"]
    if patch.ndim != 2 or pos.ndim != 3 or pos.shape[1] < 3:
        raise CheckpointError(
            f"checkpoint '{name}': {prefix}to_patch_embedding.2.weight {_shape(patch.shape)} and "
            f"{prefix}pos_embedding {_shape(pos.shape)} are not an ST-MEM patch embedding (width, patch) "
            "and position table (1, patches + 2, width)"
        )
    width, patch_size = int(patch.shape[0]), int(patch.shape[1])
    size = _SIZE_BY_WIDTH.get(width)
    if size is None:
        known = ", ".join(f"{n} {c.width}" for n, c in SIZES.items())
        raise CheckpointError(
            f"checkpoint '{name}': width {width} ({prefix}to_patch_embedding.2.weight) is no known ST-MEM "
            f"size ({known})"
        )
    # as many leads as lead embeddings (a gap in their numbering shows up in the layout check)
    num_leads = sum(1 for k in encoder_state if re.fullmatch(r"lead_embeddings\.\d+", k)) or 12
    num_patches = int(pos.shape[1]) - 2
    cfg = replace(SIZES[size], patch_size=patch_size, seq_len=num_patches * patch_size, num_leads=num_leads)
    return size, cfg


def load_st_mem_encoder(path: Path) -> tuple[StMemEncoder, CheckpointInfo]:
    """An official ST-MEM checkpoint (encoder or full file) loaded strictly into a ``StMemEncoder``."""
    name = Path(path).name
    state, _ = state_dict_from(read_checkpoint(path), name)
    keys = list(state)
    if _looks_like_ecg_jepa(keys):
        raise CheckpointError(
            f"checkpoint '{name}' looks like an ECG-JEPA encoder (keys {_listing(keys)}), not ST-MEM: "
            "format 'st_mem' expects pos_embedding, to_patch_embedding.*, block{i}.* (encoder file) or "
            "encoder.* plus decoder keys (full file)"
        )
    full = any(k.startswith("encoder.") for k in keys)
    encoder_state = (
        {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
        if full
        else state
    )
    size, cfg = _st_mem_config(encoder_state, name, full)

    with torch.device("meta"):  # names and shapes only, no memory
        expected = shapes_of(StMemMae(cfg)) if full else shapes_of(StMemEncoder(cfg))
    check_layout(state, expected, name, _st_mem_layout_text(size, cfg, full))
    if full:  # the MAE's patch embedding is the encoder's (one shared module saved under both names)
        differ = [
            k
            for k in state
            if k.startswith("to_patch_embedding.") and not torch.equal(state[k], state[f"encoder.{k}"])
        ]
        if differ:
            raise CheckpointError(
                f"checkpoint '{name}': {_listing(differ)} differ(s) from encoder.{differ[0]}; in an ST-MEM "
                "full file they are one shared module saved under both names"
            )
    check_finite(encoder_state, name)

    encoder = StMemEncoder(cfg)
    strict_load(encoder, encoder_state, name)
    encoder.eval()
    info = CheckpointInfo(
        format="st_mem",
        layout="full" if full else "encoder",
        size=size,
        tensors=len(state),
        parameters=sum(v.numel() for v in encoder_state.values()),
        embedding_dim=cfg.width,
        samples=cfg.seq_len,
        fs=ST_MEM_FS,
        leads=STANDARD_LEADS if cfg.num_leads == len(STANDARD_LEADS) else None,
        num_leads=cfg.num_leads,
        config=asdict(cfg),
    )
    return encoder, info


# --------------------------------------------------------------------------------------------------
# ECG-JEPA

_JEPA_SIZE_BY_WIDTH = {cfg.width: name for name, cfg in ecg_jepa.SIZES.items()}


def _ecg_jepa_config(state: Mapping[str, torch.Tensor], name: str) -> tuple[str, EcgJepaConfig]:
    """The named size (by width) and its config, with patch size and window from the shapes."""
    missing = [k for k in ("pos_embed", "W_P.weight") if k not in state]
    if missing:
        raise CheckpointError(
            f"checkpoint '{name}' is not an ECG-JEPA encoder state dict: missing {', '.join(missing)} "
            "(expected keys like pos_embed, W_P.weight, encoder_blocks.blocks.0.attn.qkv.weight; the file "
            f"has e.g. {', '.join(list(state)[:_SHOW]) or 'nothing'})"
        )
    patch, pos = state["W_P.weight"], state["pos_embed"]
    num_leads = len(ecg_jepa.LEADS)
    if patch.ndim != 2 or pos.ndim != 2 or pos.shape[0] % num_leads or pos.shape[1] != patch.shape[0]:
        raise CheckpointError(
            f"checkpoint '{name}': W_P.weight {_shape(patch.shape)} and pos_embed {_shape(pos.shape)} are "
            f"not an ECG-JEPA patch projection (width, patch) and position table ({num_leads} x patches, "
            "width)"
        )
    width, patch_size = int(patch.shape[0]), int(patch.shape[1])
    size = _JEPA_SIZE_BY_WIDTH.get(width)
    if size is None:
        known = ", ".join(f"{n} {c.width}" for n, c in ecg_jepa.SIZES.items())
        raise CheckpointError(
            f"checkpoint '{name}': width {width} (W_P.weight) is no known ECG-JEPA size ({known})"
        )
    num_patches = int(pos.shape[0]) // num_leads
    cfg = replace(ecg_jepa.SIZES[size], patch_size=patch_size, seq_len=num_patches * patch_size)
    return size, cfg


def load_ecg_jepa_encoder(path: Path) -> tuple[EcgJepaEncoder, CheckpointInfo]:
    """An official ECG-JEPA checkpoint (``{'encoder': state_dict}`` or bare) loaded strictly into an
    ``EcgJepaEncoder``."""
    name = Path(path).name
    obj = read_checkpoint(path)
    entry = "encoder"
    if isinstance(obj, Mapping) and entry not in obj and isinstance(obj.get("model"), Mapping):
        entry = "model"  # the service's own convention (and ST-MEM's, refused below with a hint)
    state, _ = state_dict_from(obj, name, entry=entry)
    keys = list(state)
    if any(k.startswith(("pos_embedding", "block0.", "encoder.pos_embedding")) for k in keys):
        raise CheckpointError(
            f"checkpoint '{name}' looks like an ST-MEM checkpoint (keys {_listing(keys)}), not ECG-JEPA: "
            "format 'ecg_jepa' expects pos_embed, W_P.*, encoder_blocks.blocks.{i}.*, norm.*"
        )
    size, cfg = _ecg_jepa_config(state, name)
    with torch.device("meta"):  # names and shapes only, no memory
        expected = shapes_of(EcgJepaEncoder(cfg))
    layout = f"pos_embed, encoder_blocks.blocks.0-{cfg.depth - 1}.*, norm.*, W_P.*"
    check_layout(state, expected, name, f"ECG-JEPA {size} encoder layout ({layout})")
    check_finite(state, name)

    encoder = EcgJepaEncoder(cfg)
    strict_load(encoder, state, name)
    encoder.eval()
    info = CheckpointInfo(
        format="ecg_jepa",
        layout="encoder",
        size=size,
        tensors=len(state),
        parameters=sum(v.numel() for v in state.values()),
        embedding_dim=cfg.width,
        samples=cfg.seq_len,
        fs=ecg_jepa.INPUT_SPEC.fs,
        leads=ecg_jepa.LEADS,
        num_leads=cfg.num_leads,
        config=asdict(cfg),
    )
    return encoder, info


# --------------------------------------------------------------------------------------------------
# dispatch

LOADERS: dict[str, Callable[[Path], tuple[nn.Module, CheckpointInfo]]] = {
    "st_mem": load_st_mem_encoder,
    "ecg_jepa": load_ecg_jepa_encoder,
}


def load_encoder(fmt: str, path: Path) -> tuple[nn.Module, CheckpointInfo]:
    """The encoder in the checkpoint at ``path`` of format ``fmt`` (one of ``FORMATS``)."""
    loader = LOADERS.get(fmt)
    if loader is None:
        raise ClientError(f"unknown checkpoint format '{fmt}': one of {', '.join(LOADERS)}")
    return loader(Path(path))


# --------------------------------------------------------------------------------------------------
# the service's own encoder files: ``encoder.pt`` beside every registered version's ONNX file

ENCODER_FILE = "encoder.pt"


def save_encoder(encoder: nn.Module, path: Path) -> None:
    """Write a model version's PyTorch encoder (what fine-tuning starts from): family, config, weights."""
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    torch.save({"method": family_of(encoder).name, "config": asdict(encoder.cfg), "state_dict": state}, path)


def load_saved_encoder(path: Path) -> tuple[nn.Module, str]:
    """(encoder in eval mode, family name) from a file written by ``save_encoder``."""
    if not Path(path).is_file():
        raise ClientError(
            f"the PyTorch weights of this model version are missing ({Path(path).name}); versions "
            "registered before weights were kept cannot be fine-tuned"
        )
    saved = torch.load(path, map_location="cpu", weights_only=True)
    f = family(saved["method"])
    encoder = f.encoder_class(f.config_from_dict(saved["config"]))
    encoder.load_state_dict(saved["state_dict"], strict=True)
    return encoder.eval(), f.name
