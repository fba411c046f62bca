"""Typed views of the API's JSON: jobs, attempts, nodes, events. Each keeps
the dict it was read from in ``raw``, so fields added later are reachable."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class JobState(str, enum.Enum):
    """A job's state; terminal states are :attr:`is_terminal`."""

    PENDING = "pending"
    ASSIGNED = "assigned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"
    DEADLETTERED = "deadlettered"

    @property
    def is_terminal(self) -> bool:
        """Whether the job will not change state again by itself (a
        dead-lettered job waits for ``dlq_retry``)."""
        return self in _TERMINAL


_TERMINAL = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED, JobState.DEADLETTERED}
)


def _int(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key)
    return value if isinstance(value, int) else 0


def _opt_int(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    return value if isinstance(value, int) else None


def _str(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    return value if isinstance(value, str) else ""


@dataclass(frozen=True)
class Attempt:
    """One run of a job on a node."""

    attempt: int
    node: str
    gpus: list[int]
    gpu_memory_bytes: int
    batch_size: int
    outcome: str
    exit_code: int | None
    error: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Attempt:
        gpus = raw.get("gpus")
        return cls(
            attempt=_int(raw, "attempt"),
            node=_str(raw, "node"),
            gpus=[g for g in gpus if isinstance(g, int)] if isinstance(gpus, list) else [],
            gpu_memory_bytes=_int(raw, "gpu_memory_bytes"),
            batch_size=_int(raw, "batch_size"),
            outcome=_str(raw, "outcome"),
            exit_code=_opt_int(raw, "exit_code"),
            error=_str(raw, "error"),
            raw=raw,
        )


@dataclass(frozen=True)
class Job:
    """A job as the coordinator holds it."""

    id: int
    name: str
    kind: str
    state: JobState
    reason: str
    pipeline: str
    run: int
    attempts: list[Attempt]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Job:
        attempts = raw.get("attempts")
        return cls(
            id=_int(raw, "id"),
            name=_str(raw, "name"),
            kind=_str(raw, "kind"),
            state=JobState(_str(raw, "state")),
            reason=_str(raw, "reason"),
            pipeline=_str(raw, "pipeline"),
            run=_int(raw, "run"),
            attempts=[Attempt.from_json(a) for a in attempts if isinstance(a, dict)]
            if isinstance(attempts, list)
            else [],
            raw=raw,
        )


@dataclass(frozen=True)
class Node:
    """An agent's node."""

    name: str
    state: str
    draining: bool
    connected: bool
    gpus: list[dict[str, Any]]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Node:
        gpus = raw.get("gpus")
        return cls(
            name=_str(raw, "name"),
            state=_str(raw, "state"),
            draining=raw.get("draining") is True,
            connected=raw.get("connected") is True,
            gpus=[g for g in gpus if isinstance(g, dict)] if isinstance(gpus, list) else [],
            raw=raw,
        )


@dataclass(frozen=True)
class Event:
    """One event of the cluster's history; ``index`` orders them."""

    index: int
    at_ms: int
    job_id: int
    job_name: str
    kind: str
    state: str
    node: str
    attempt: int
    message: str
    pipeline: str
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Event:
        return cls(
            index=_int(raw, "index"),
            at_ms=_int(raw, "at_ms"),
            job_id=_int(raw, "job_id"),
            job_name=_str(raw, "job_name"),
            kind=_str(raw, "kind"),
            state=_str(raw, "state"),
            node=_str(raw, "node"),
            attempt=_int(raw, "attempt"),
            message=_str(raw, "message"),
            pipeline=_str(raw, "pipeline"),
            raw=raw,
        )


@dataclass(frozen=True)
class Pipeline:
    """One run of a pipeline and its jobs."""

    name: str
    run: int
    jobs: list[Job]
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Pipeline:
        jobs = raw.get("jobs")
        return cls(
            name=_str(raw, "name"),
            run=_int(raw, "run"),
            jobs=[Job.from_json(j) for j in jobs if isinstance(j, dict)]
            if isinstance(jobs, list)
            else [],
            raw=raw,
        )
