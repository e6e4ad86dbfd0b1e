"""The encoder families as the gateway knows them, without torch: each family's spec (names, sizes,
input, encoder sizes, recipes) and the checkpoint formats that can be imported.

Job parameters (``services.jobs.params``) and ``GET /methods`` (``services.models.methods``) read this table;
``services.models.families.FAMILIES`` builds each family on its spec here, with its nn.Modules. Adding a
family: its ``<family>_spec`` module (ending with ``SPEC``) goes below, its ``<family>`` module (ending with
``FAMILY = Family.of(SPEC, ...)``) in ``families.py``.
"""

from typing import Literal, get_args

from services.errors import ClientError
from services.models import ecg_jepa_spec, resnet1d_spec, st_mem_spec
from services.models.family import FamilySpec

SPECS: dict[str, FamilySpec] = {s.name: s for s in (st_mem_spec.SPEC, ecg_jepa_spec.SPEC, resnet1d_spec.SPEC)}
BY_METHOD: dict[str, FamilySpec] = {s.method: s for s in SPECS.values()}

ImportFormat = Literal["st_mem", "ecg_jepa"]  # published checkpoints POST /models/import reads
FORMATS: tuple[str, ...] = get_args(ImportFormat)


def spec(name: str) -> FamilySpec:
    """The spec of the family called ``name`` (or whose pretraining method is ``name``)."""
    found = SPECS.get(name) or BY_METHOD.get(name)
    if found is None:
        raise ClientError(f"unknown model family '{name}': one of {', '.join(SPECS)}")
    return found
