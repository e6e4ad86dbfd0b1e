"""Lead names: canonical order, aliases, and derivation of the limb leads from I and II."""

import re

import numpy as np

from services.errors import EcgInputError

STANDARD_LEADS: tuple[str, ...] = (
    "I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6",
)  # fmt: skip

_ALIASES: dict[str, str] = {
    "i": "I",
    "ii": "II",
    "iii": "III",
    "avr": "aVR",
    "avl": "aVL",
    "avf": "aVF",
    "lead i": "I",
    "lead ii": "II",
    "lead iii": "III",
    "mlii": "II",
    "dii": "II",
    "di": "I",
    "diii": "III",
}
_INVERTED = {"-avr": "aVR"}  # Cabrera display stores -aVR: negate it back  # fmt: skip
for _n in range(1, 7):
    _ALIASES[f"v{_n}"] = f"V{_n}"
    _ALIASES[f"lead v{_n}"] = f"V{_n}"


def canonical_lead_name(name: str) -> str | None:
    """Canonical name of a lead (case-insensitive, common aliases), or None for a non-standard channel."""
    key = name.strip().lower()
    return _ALIASES.get(key) or _INVERTED.get(key)


_LABEL_PREFIX = re.compile(r"^(?:ecg|ekg)[\s_:\-]*(?:lead[\s_:\-]*)?", re.IGNORECASE)


def lead_label(raw: str) -> str:
    """A channel label as a lead name: 'ECG I', 'EKG-V1', 'ECG lead aVR' become I, V1, aVR; others kept."""
    name = raw.strip()
    if canonical_lead_name(name):
        return name
    stripped = _LABEL_PREFIX.sub("", name).strip()
    return stripped if canonical_lead_name(stripped) else name


def select_leads(signal: np.ndarray, names: list[str], wanted: tuple[str, ...]) -> np.ndarray:
    """Return ``signal`` rows in the order of ``wanted`` (canonical names), deriving limb leads when needed.

    signal: (channels, samples) in mV; names: one name per channel as found in the file.
    Extra channels (e.g. Frank leads vx, vy, vz) are ignored. III, aVR, aVL and aVF are derived from
    I and II (Einthoven and Goldberger) when they are absent.
    """
    by_name: dict[str, np.ndarray] = {}
    for row, name in zip(signal, names, strict=True):
        canon = canonical_lead_name(name)
        if canon is not None and canon not in by_name:
            by_name[canon] = -row if name.strip().lower() in _INVERTED else row
    if "I" in by_name and "II" in by_name:
        lead_i, lead_ii = by_name["I"], by_name["II"]
        by_name.setdefault("III", lead_ii - lead_i)
        by_name.setdefault("aVR", -(lead_i + lead_ii) / 2)
        by_name.setdefault("aVL", lead_i - lead_ii / 2)
        by_name.setdefault("aVF", lead_ii - lead_i / 2)
    missing = [lead for lead in wanted if lead not in by_name]
    if missing:
        raise EcgInputError(
            f"missing lead(s) {', '.join(missing)}: the model needs {', '.join(wanted)}; "
            f"the record has channels {', '.join(names)} (III, aVR, aVL, aVF can be derived from I and II)"
        )
    return np.stack([by_name[lead] for lead in wanted]).astype(np.float32)
