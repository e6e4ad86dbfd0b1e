"""The one registration table of encoder families (with their nn.Modules); everything that trains, exports
or loads an encoder finds its family here.

Adding a family: write its spec module (``<family>_spec``: config, sizes, input, recipes, ending with
``SPEC``; listed in ``services.models.catalog``) and its module (encoder, objective, ending with
``FAMILY = Family.of(SPEC, ...)``), and add it below.
"""

from torch import nn

from services.errors import ClientError
from services.models import ecg_jepa, resnet1d, st_mem
from services.models.catalog import SPECS
from services.models.family import Family

FAMILIES: dict[str, Family] = {f.name: f for f in (st_mem.FAMILY, ecg_jepa.FAMILY, resnet1d.FAMILY)}
BY_METHOD: dict[str, Family] = {f.method: f for f in FAMILIES.values()}
if {name: f.spec for name, f in FAMILIES.items()} != SPECS:
    raise RuntimeError("services.models.catalog.SPECS and FAMILIES list different families")


def family(name: str) -> Family:
    """The family called ``name`` (or whose pretraining method is ``name``)."""
    found = FAMILIES.get(name) or BY_METHOD.get(name)
    if found is None:
        raise ClientError(f"unknown model family '{name}': one of {', '.join(FAMILIES)}")
    return found


def family_of(encoder: nn.Module) -> Family:
    """The family whose encoder class ``encoder`` is."""
    for f in FAMILIES.values():
        if isinstance(encoder, f.encoder_class):
            return f
    raise ValueError(f"{type(encoder).__name__} is no registered family's encoder")


def size_of(f: Family, cfg: object) -> str:
    """The named size whose config has ``cfg``'s width (the sizes differ in width)."""
    for name, sized in f.sizes.items():
        if sized.width == cfg.width:
            return name
    return "custom"
