"""Python client and ``ecgssl`` command line of the ECG SSL service (HTTP only)."""

from ecgssl_client.client import ApiError, Client, EmbedResult, Failure, PredictResult
from ecgssl_client.records import Record, RecordError, find_records

__all__ = [
    "ApiError",
    "Client",
    "EmbedResult",
    "Failure",
    "PredictResult",
    "Record",
    "RecordError",
    "find_records",
]
