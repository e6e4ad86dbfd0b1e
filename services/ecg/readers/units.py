"""Voltage units of the EDF, CSV, JSON and .npz readers, and their factor to mV."""

from services.errors import EcgInputError

# Physical units of voltage and their factor to mV (EDF dimensions, JSON/CSV/.npz "units").
VOLTAGE_TO_MV = {"v": 1e3, "mv": 1.0, "uv": 1e-3, "µv": 1e-3, "μv": 1e-3, "nv": 1e-6}


def voltage_factor(unit: str, source: str, what: str) -> float:
    factor = VOLTAGE_TO_MV.get(unit.strip().lower())
    if factor is None:
        raise EcgInputError(f"{source}: unknown unit '{unit}' for {what}: expected one of uV, mV, V")
    return factor
