"""Errors that a client can cause, by kind. Services raise them with a message saying what is wrong and
what was expected; the API maps each kind to its HTTP status (``api.responses.status_of``)."""


class ClientError(Exception):
    """A request cannot be served because of what the client sent (HTTP 422 unless a kind below says)."""


class EcgInputError(ClientError):
    """An uploaded or stored ECG cannot be read or does not fit the model."""


class DatasetError(ClientError):
    """A dataset path or layout is not usable."""


class NotFoundError(ClientError):
    """What the request names does not exist (404)."""


class ConflictError(ClientError):
    """The request conflicts with the current state (409)."""


class TooLargeError(ClientError):
    """The request is over one of the service's limits (413): the message names the limit and its setting."""


class UnsupportedError(ClientError):
    """This installation cannot do what is asked: an optional dependency is missing (501)."""


class UnavailableError(ClientError):
    """A part the request needs is unavailable: a deployment problem, not the request's (503)."""
