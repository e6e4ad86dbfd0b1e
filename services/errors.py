"""Errors that a client can cause; the API turns them into 4xx responses with their message."""


class ClientError(Exception):
    """A request cannot be served because of what the client sent (HTTP 422 unless stated)."""

    status_code = 422


class EcgInputError(ClientError):
    """An uploaded or stored ECG cannot be read or does not fit the model."""


class DatasetError(ClientError):
    """A dataset path or layout is not usable."""


class NotFoundError(ClientError):
    status_code = 404


class ConflictError(ClientError):
    status_code = 409
