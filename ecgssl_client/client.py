"""A Python client of the ECG SSL service's HTTP API (jobs, models, datasets, embeddings, predictions).

    from ecgssl_client import Client

    with Client("http://127.0.0.1:8000") as api:
        job = api.submit("pretrain", {"dataset": "ptbxl-500", "epochs": 5, "record_limit": 200})
        for state in api.follow(job["job_id"]):
            print(state["status"], state["progress"]["epoch"], state["progress"]["last_loss"])
        result = api.embed(["../shared/data/ptbxl-500/records500/00000"], model=state["model_version"])
        result.embeddings.shape  # (records, dimension)

Every method raises ``ApiError`` (status and the API's message) for an answer that is not a success.
"""

import os
import re
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import numpy as np

from ecgssl_client.records import Record, find_records, take_batch

DEFAULT_URL = "http://127.0.0.1:8000"
JobKind = Literal["pretrain", "finetune", "evaluate"]
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
# Batches of /embed/batch until the server says less (its defaults: 64 records, 50 MiB a request)
BATCH_RECORDS = 32
BATCH_BYTES = 16 * 1024 * 1024


class ApiError(Exception):
    """An answer of the API that is not a success: its HTTP status and the API's ``detail`` message."""

    def __init__(self, status_code: int, detail: str, method: str = "", path: str = "") -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail
        self.method = method
        self.path = path

    def __str__(self) -> str:
        return f"{self.detail} (HTTP {self.status_code} from {self.method} {self.path})"


def detail_text(detail: Any) -> str:
    """The API's ``detail`` as one line: a validation error list becomes 'where: message (got ...)'."""
    if isinstance(detail, list):
        parts = []
        for item in detail:
            if not isinstance(item, dict):
                parts.append(str(item))
                continue
            where = ".".join(str(p) for p in item.get("loc", []) if p not in ("body", "query", "path"))
            got = (
                f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""
            )
            parts.append(f"{where or 'request'}: {item.get('msg', item)}{got}")
        return "; ".join(parts)
    return " ".join(str(detail).split())


def _error(response: httpx.Response) -> ApiError:
    try:
        detail = detail_text(response.json().get("detail", response.text))
    except (ValueError, AttributeError):
        detail = " ".join(response.text.split())[:300] or response.reason_phrase
    return ApiError(response.status_code, detail, response.request.method, response.request.url.path)


@dataclass
class Failure:
    """A record the API could not embed or predict: its id, status and the API's reason."""

    id: str
    status_code: int
    error: str


@dataclass
class EmbedResult:
    """Embeddings of the records that were embedded (rows in input order), and the records that were not."""

    model: str  # 'name@version' that served
    ids: list[str]
    embeddings: np.ndarray  # (len(ids), dimension) float32
    failures: list[Failure] = field(default_factory=list)


@dataclass
class PredictResult:
    predictions: list[dict]  # the API's answer per record, with 'id' added
    failures: list[Failure] = field(default_factory=list)


class Client:
    """The service at ``url`` (default: ``ECGSSL_URL``, else http://127.0.0.1:8000), sending ``api_key``
    (default: ``ECGSSL_API_KEY``) as ``Authorization: Bearer``."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 300.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = (url or os.environ.get("ECGSSL_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("ECGSSL_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON of a successful answer (None for 204); ``ApiError`` otherwise."""
        response = self._http.request(method, path, **kwargs)
        if response.is_error:
            raise _error(response)
        return response.json() if response.content else None

    # service

    def health(self) -> dict:
        """Database, broker and workers; a degraded service (503) is returned, not raised."""
        response = self._http.get("/health")
        if response.status_code not in (200, 503):
            raise _error(response)
        return response.json()

    def methods(self) -> list[dict]:
        return self.request("GET", "/methods")["families"]

    # jobs

    def submit(self, kind: JobKind, params: dict) -> dict:
        """Queue a job (``POST /jobs/{kind}``): ``{job_id, status, url}``."""
        return self.request("POST", f"/jobs/{kind}", json=params)

    def pretrain(self, **params: Any) -> dict:
        return self.submit("pretrain", params)

    def finetune(self, **params: Any) -> dict:
        return self.submit("finetune", params)

    def evaluate(self, **params: Any) -> dict:
        return self.submit("evaluate", params)

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/jobs/{self.job_id(job_id)}")

    def jobs(self, status: str | None = None, kind: str | None = None, limit: int = 50) -> list[dict]:
        """Jobs, newest first, filtered by status and kind."""
        params: dict[str, Any] = {"limit": limit}
        if status:
            params["status"] = status
        if kind:
            params["kind"] = kind
        return self.request("GET", "/jobs", params=params)["jobs"]

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/jobs/{self.job_id(job_id)}/cancel")

    def follow(self, job_id: str, interval: float = 1.0) -> Iterator[dict]:
        """The job's state each time it changes, until it has finished (the last one yielded)."""
        job_id = self.job_id(job_id)
        last = None
        while True:
            state = self.request("GET", f"/jobs/{job_id}")
            seen = (state["status"], state["progress"], len(state["metrics"]))
            if seen != last:
                last = seen
                yield state
            if state["status"] in TERMINAL:
                return
            time.sleep(interval)

    def wait(self, job_id: str, interval: float = 1.0) -> dict:
        """The job once it has finished."""
        return deque(self.follow(job_id, interval), maxlen=1)[0]

    def job_id(self, text: str) -> str:
        """A job's full id from its id or a unique prefix of it among the newest 500 jobs (as ``git`` takes
        a short commit)."""
        try:
            return str(uuid.UUID(text))
        except ValueError:
            pass
        prefix = text.lower()
        if not re.fullmatch(r"[0-9a-f-]{4,36}", prefix):
            raise ApiError(
                404, f"'{text}' is not a job id: give the id `jobs` lists, or its first 4+ characters"
            )
        matches = [j["id"] for j in self.request("GET", "/jobs", params={"limit": 500})["jobs"]]
        matches = [i for i in matches if i.startswith(prefix)]
        if len(matches) != 1:
            what = "no job" if not matches else f"{len(matches)} jobs"
            raise ApiError(404, f"{what} among the newest 500 has an id starting with '{text}'")
        return matches[0]

    # models

    def models(self) -> list[dict]:
        return self.request("GET", "/models")["models"]

    def model(self, name: str) -> dict:
        return self.request("GET", f"/models/{name}")

    def versions(self, name: str) -> list[dict]:
        return self.model(name)["versions"]

    def version(self, name: str, version: int) -> dict:
        return self.request("GET", f"/models/{name}/versions/{version}")

    def promote(self, name: str, version: int, alias: str = "production") -> dict:
        """Point ``alias`` of model ``name`` at ``version``: ``{model, alias, version, previous_version}``."""
        return self.request("PUT", f"/models/{name}/aliases/{alias}", json={"version": version})

    # datasets

    def datasets(self) -> list[dict]:
        return self.request("GET", "/datasets")["datasets"]

    def add_dataset(self, name: str, kind: str, path: str | None = None, options: dict | None = None) -> dict:
        """Register a dataset (validated and summarised by the service)."""
        body = {"name": name, "kind": kind, "options": options or {}} | ({"path": path} if path else {})
        return self.request("POST", "/datasets", json=body)

    # inference

    def embed(
        self,
        paths: Iterable[str | Path] | list[Record],
        model: str | None = None,
        *,
        batch_records: int = BATCH_RECORDS,
        batch_bytes: int = BATCH_BYTES,
        progress: Callable[[int], None] | None = None,
        **options: Any,
    ) -> EmbedResult:
        """Embed every record in ``paths`` (files, folders, zips; see ``find_records``) through
        ``POST /embed/batch``, in batches of at most ``batch_records`` records and ``batch_bytes`` bytes,
        made smaller when the service answers 413 for a batch (to the cap its message names, else by half).
        ``options``: the API's query and form fields (``precision``, ``windowing``, ``pad``,
        ``interpolate_nan``, ``fs``, ``leads``). ``progress(n)`` is called as n more records are done."""
        records = _records(paths)
        query, form = _split_options(model, options)
        pending = deque(records)
        ids: list[str] = []
        rows: list[list[float]] = []
        failures: list[Failure] = []
        served = None
        alone = 0  # records to send one by one to POST /embed (their batch was refused as a whole)
        while pending:
            batch = [pending.popleft()] if alone else take_batch(pending, batch_records, batch_bytes)
            alone = max(0, alone - 1)
            if len(batch) == 1:  # POST /embed: a refusal names this record's reason alone
                (record,) = batch
                files = [("files", item) for item in record.read()]
                response = self._http.post("/embed", params=query, data=form, files=files)
                if response.is_error:
                    failures.append(self._record_failure(record, response))
                else:
                    body = response.json()
                    served = f"{body['model']}@{body['version']}"
                    ids.append(record.id)
                    rows.append(body["embedding"])
                if progress:
                    progress(1)
                continue
            files = [("files", item) for record in batch for item in record.read()]
            response = self._http.post("/embed/batch", params=query, data=form, files=files)
            if response.is_error and response.status_code in (413, 422):
                pending.extendleft(reversed(batch))
                if response.status_code == 413:
                    batch_records, batch_bytes = _smaller(
                        _error(response).detail, batch, batch_records, batch_bytes
                    )
                else:  # no record of the batch could be read: each one's own reason
                    alone = len(batch)
                continue
            if response.is_error:
                raise _error(response)  # the key, the model, the service: no record would fare better
            body = response.json()
            served = f"{body['model']}@{body['version']}"
            if len(body["records"]) != len(batch):
                raise ApiError(
                    500,
                    f"the service answered {len(body['records'])} results for {len(batch)} records "
                    f"({', '.join(r.id for r in batch)})",
                )
            for record, result in zip(batch, body["records"], strict=True):
                if result["ok"]:
                    ids.append(record.id)
                    rows.append(result["embedding"])
                else:
                    failures.append(Failure(record.id, result["status_code"], result["error"]))
            if progress:
                progress(len(batch))
        if served is None:  # every record failed (there was at least one: find_records refuses none)
            if len(failures) == 1:
                raise ApiError(failures[0].status_code, f"{failures[0].id}: {failures[0].error}")
            reasons = "; ".join(f"{f.id}: {f.error}" for f in failures[:5])
            more = f"; and {len(failures) - 5} more" if len(failures) > 5 else ""
            raise ApiError(
                failures[0].status_code,
                f"none of the {len(failures)} records could be embedded: {reasons}{more}",
            )
        return EmbedResult(served, ids, np.asarray(rows, dtype=np.float32), failures)

    @staticmethod
    def _record_failure(record: Record, response: httpx.Response) -> Failure:
        """The failure of a one-record request; raises when the refusal is about the request itself (the
        key, the model: ``REQUEST_ERRORS``) or the service failed (5xx): no other record would fare better."""
        error = _error(response)
        if error.status_code in REQUEST_ERRORS or error.status_code >= 500:
            raise error
        return Failure(record.id, error.status_code, error.detail)

    def predict(
        self,
        paths: Iterable[str | Path] | list[Record],
        model: str | None = None,
        *,
        method: str | None = None,
        progress: Callable[[int], None] | None = None,
        **options: Any,
    ) -> PredictResult:
        """Diagnosis probabilities of every record in ``paths`` (``POST /predict``, one request each). A
        record the API refuses is a ``Failure``; a refusal of the request itself (``REQUEST_ERRORS``: the key,
        the model) or a server error raises, as does every record failing."""
        query, form = _split_options(model, options | ({"method": method} if method else {}))
        result = PredictResult([])
        for record in _records(paths):
            files = [("files", item) for item in record.read()]
            response = self._http.post("/predict", params=query, data=form, files=files)
            if response.is_error:
                result.failures.append(self._record_failure(record, response))
            else:
                result.predictions.append({"id": record.id} | response.json())
            if progress:
                progress(1)
        if not result.predictions and result.failures:
            first = result.failures[0]
            raise ApiError(first.status_code, f"{first.id}: {first.error}")
        return result


FORM_FIELDS = ("fs", "leads")
REQUEST_ERRORS = (401, 403, 404, 405, 409)  # the key, the model or the route: no record would do better


def _records(paths: Iterable[str | Path] | list[Record]) -> list[Record]:
    paths = list(paths)
    return paths if paths and all(isinstance(p, Record) for p in paths) else find_records(paths)


def _split_options(model: str | None, options: dict) -> tuple[dict, dict]:
    """The query parameters and form fields of an inference request (None values left out)."""
    query = {k: v for k, v in options.items() if k not in FORM_FIELDS and v is not None}
    query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in query.items()}
    if model:
        query["model"] = model
    form = {k: str(options[k]) for k in FORM_FIELDS if options.get(k) is not None}
    return query, form


def _smaller(message: str, batch: list[Record], max_records: int, max_bytes: int) -> tuple[int, int]:
    """Batch limits under the service's cap its 413 ``message`` names: its records cap, 90 % of its body
    cap (the multipart framing), else half the batch that was refused."""
    if match := re.search(r"at most (\d+) (?:are|records)", message):
        return max(1, min(int(match.group(1)), len(batch) - 1)), max_bytes
    if match := re.search(r"limit of (\d+) bytes", message):
        return max_records, max(1, int(int(match.group(1)) * 0.9))
    return max(1, len(batch) // 2), max_bytes
