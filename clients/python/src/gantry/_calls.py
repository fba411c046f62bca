"""Each API call as data (method, path, parameters, body, and how to read
the answer), so the blocking and the asyncio client only carry them out."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import quote

from ._common import Spec, spec_body, states_param
from ._models import Job, JobState, Node, Pipeline

T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    """One request and how to read its answer's JSON."""

    method: str
    path: str
    parse: Callable[[Any], T]
    params: Mapping[str, str] | None = None
    content: bytes | None = None
    headers: Mapping[str, str] | None = None


def _segment(text: str) -> str:
    """A name as one URL path segment."""
    return quote(text, safe="")


def _nothing(_: Any) -> None:
    return None


def _jobs(answer: Any) -> list[Job]:
    return [Job.from_json(j) for j in answer]


def submit(spec: Spec, key: str | None) -> Call[list[int]]:
    content, content_type = spec_body(spec)
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["Idempotency-Key"] = key
    return Call(
        "POST",
        "/v1/jobs",
        lambda a: [int(i) for i in a["job_ids"]],
        content=content,
        headers=headers,
    )


def cancel(id: int) -> Call[JobState]:
    return Call("POST", f"/v1/jobs/{int(id)}/cancel", lambda a: JobState(a["state"]))


def dlq_retry(id: int, spec: Mapping[str, Any] | None) -> Call[None]:
    if spec is None:
        return Call("POST", f"/v1/dlq/{int(id)}/retry", _nothing)
    content, content_type = spec_body(spec)
    return Call(
        "POST",
        f"/v1/dlq/{int(id)}/retry",
        _nothing,
        content=content,
        headers={"Content-Type": content_type},
    )


def dlq_drop(id: int) -> Call[None]:
    return Call("DELETE", f"/v1/dlq/{int(id)}", _nothing)


def drain(node: str, deadline: str | None) -> Call[None]:
    params = {"deadline": deadline} if deadline else None
    return Call("POST", f"/v1/nodes/{_segment(node)}/drain", _nothing, params=params)


def undrain(node: str) -> Call[None]:
    return Call("POST", f"/v1/nodes/{_segment(node)}/undrain", _nothing)


def gpu_reset(node: str, gpu: int) -> Call[None]:
    # The coordinator checks the index (a number, 0 or more) and names
    # `gpu` when it is not one.
    return Call("POST", f"/v1/nodes/{_segment(node)}/gpus/{int(gpu)}/reset", _nothing)


def job(id: int) -> Call[Job]:
    return Call("GET", f"/v1/jobs/{int(id)}", Job.from_json)


def jobs(
    state: str | JobState | Sequence[str | JobState] | None,
    kind: str | None,
    pipeline: str | None,
    limit: int,
) -> Call[list[Job]]:
    params = {"limit": str(limit)}
    if states_param(state):
        params["state"] = states_param(state)
    if kind:
        params["kind"] = kind
    if pipeline:
        params["pipeline"] = pipeline
    return Call("GET", "/v1/jobs", _jobs, params=params)


def dlq() -> Call[list[Job]]:
    return Call("GET", "/v1/dlq", _jobs)


def nodes() -> Call[list[Node]]:
    return Call("GET", "/v1/nodes", lambda a: [Node.from_json(n) for n in a])


def status() -> Call[dict[str, Any]]:
    return Call("GET", "/v1/status", dict)


def pipeline(name: str, run: int | None) -> Call[Pipeline]:
    params = {"run": str(run)} if run is not None else None
    return Call("GET", f"/v1/pipelines/{_segment(name)}", Pipeline.from_json, params=params)


def events(
    from_index: int, last: int | None, job: int | None, kind: str | None, pipeline: str | None
) -> tuple[dict[str, str], dict[str, str]]:
    """Parameters and headers of ``/v1/events``: resume after ``last``."""
    params = {"from": str(from_index)}
    if job:
        params["job"] = str(job)
    if kind:
        params["kind"] = kind
    if pipeline:
        params["pipeline"] = pipeline
    headers = {"Accept": "text/event-stream"}
    if last is not None:
        headers["Last-Event-ID"] = str(last)
    return params, headers


def logs(id: int, stderr: bool, follow: bool, offset: int = 0) -> tuple[str, dict[str, str]]:
    """Path and parameters of a log read from byte ``offset``."""
    params = {"stream": "stderr" if stderr else "stdout", "follow": str(follow).lower()}
    if offset:
        params["offset"] = str(offset)
    return f"/v1/jobs/{int(id)}/logs", params
