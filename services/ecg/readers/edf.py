"""EDF, EDF+ and BDF(+) files, read with pyedflib (an optional dependency: 501 without it)."""

import re
from collections import Counter
from pathlib import Path

import numpy as np

from services.ecg.leads import canonical_lead_name, lead_label
from services.ecg.readers.units import VOLTAGE_TO_MV
from services.ecg.recording import ReadLimits, Recording, check_fs
from services.errors import EcgInputError, UnsupportedError

_ANNOTATION_LABELS = {"edf annotations", "bdf annotations"}


_ECG_WORD = re.compile(r"\b(?:ecg|ekg)", re.IGNORECASE)


class EdfSupportMissingError(EcgInputError, UnsupportedError):
    """EDF/BDF support (pyedflib) is not installed (501)."""


def read_edf(path: Path, source: str, limits: ReadLimits | None = None) -> Recording:
    """EDF, EDF+ or BDF(+) via pyedflib: the ECG channels at their most common sampling rate, in mV.

    ECG channels: those labelled like a lead or as ECG/EKG ('I', 'ECG V1', 'EKG') with a voltage unit (uV,
    mV, V) or none (taken as mV); when no channel is labelled so, every channel with a voltage unit. Of
    these, the channels at the most common rate are read (ties: the higher rate); annotation channels,
    other signals (respiration, SpO2, EEG beside labelled ECG, ...) and ECG channels at other rates are
    ignored and listed in ``comments``. Labels such as 'ECG II' become II. ``limits``: the record is
    admitted from the EDF header (samples of the chosen channels) before any of them is read.
    """
    try:
        import pyedflib
    except ImportError:  # a deployment without the optional reader: say so instead of a bare 500
        raise EdfSupportMissingError(
            f"{source}: this server cannot read EDF files (the pyedflib package is not installed)"
        ) from None
    try:
        reader = pyedflib.EdfReader(str(path))
    except Exception as exc:  # OSError for anything not EDF-compliant, with edflib's reason
        reason = str(exc).replace(str(path), path.name)
        raise EcgInputError(f"{source}: not a readable EDF/EDF+/BDF file ({reason})") from None
    try:
        n = reader.signals_in_file
        labels = [str(label).strip() for label in reader.getSignalLabels()]
        rates = [float(r) for r in reader.getSampleFrequencies()]
        units = [str(reader.getPhysicalDimension(i)).strip() for i in range(n)]

        def describe(i: int) -> str:
            return f"{labels[i] or '(no label)'} ({units[i] or 'no unit'}, {rates[i]:g} Hz)"

        named, voltage, others = [], [], []
        for i in range(n):
            if labels[i].lower() in _ANNOTATION_LABELS:
                continue
            factor = VOLTAGE_TO_MV.get(units[i].lower())
            is_ecg = bool(canonical_lead_name(lead_label(labels[i])) or _ECG_WORD.search(labels[i]))
            if factor is None and not units[i] and is_ecg:
                factor = 1.0  # an ECG channel without unit: taken as mV
            if factor is None:
                others.append(describe(i))
            else:
                (named if is_ecg else voltage).append((i, factor))
        ecg = named or voltage
        if not ecg:
            raise EcgInputError(
                f"{source}: no ECG channel (one labelled like a lead or ECG, e.g. 'ECG II', or in uV/mV/V); "
                f"found: {', '.join(others) or 'no signal channel at all'}"
            )
        if named:
            others += [describe(i) for i, _ in voltage]
        counts = Counter(rates[i] for i, _ in ecg)
        best = max(counts, key=lambda r: (counts[r], r))
        chosen = [(i, f) for i, f in ecg if rates[i] == best]
        dropped = [f"{labels[i]} ({rates[i]:g} Hz)" for i, _ in ecg if rates[i] != best]
        if limits is not None:
            counts_per_channel = reader.getNSamples()
            limits.admit(source, int(max(counts_per_channel[i] for i, _ in chosen)), best)
        signals = [reader.readSignal(i) * factor for i, factor in chosen]
    finally:
        reader.close()
    length = min(len(s) for s in signals)
    if length == 0:
        raise EcgInputError(f"{source}: the EDF file holds no samples")
    comments = [f"ECG channels at other rates ignored: {', '.join(dropped)}"] if dropped else []
    if others:
        comments.append(f"other channels ignored: {', '.join(others)}")
    return Recording(
        signal=np.stack([s[:length] for s in signals]).astype(np.float32),
        fs=check_fs(best, source),
        lead_names=[lead_label(labels[i]) for i, _ in chosen],
        source=source,
        comments=comments,
    )
