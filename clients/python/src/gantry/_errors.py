"""Errors of the Gantry client: one exception per kind of refusal."""

from __future__ import annotations

from typing import Any


class GantryError(Exception):
    """A call the coordinator refused or could not answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class SpecError(GantryError):
    """Bad input (HTTP 400): ``field`` is the path (``jobs[0].resources.gpus``,
    ``job.timeout``, ``body``), ``reason`` why. Nothing was stored."""

    def __init__(self, message: str, field: str, reason: str) -> None:
        super().__init__(message, 400)
        self.field = field
        self.reason = reason


class Unauthorized(GantryError):
    """No token, or one the coordinator does not know (HTTP 401)."""


class Forbidden(GantryError):
    """The token's role does not allow this call (HTTP 403)."""


class NotFound(GantryError):
    """No such job, node or pipeline (HTTP 404)."""


class Conflict(GantryError):
    """The job is not in a state that allows this (HTTP 409)."""


class TooManyStreams(GantryError):
    """This client (its token, or its address without one) already holds as
    many open watches and followed logs as the coordinator allows
    (``--max-streams-per-client``; HTTP 429). Close one first."""


class Unavailable(GantryError):
    """No coordinator answered, none of them leads, or the cluster is in an
    election (HTTP 503). A follower names the leader: ``leader`` is its gRPC
    URL and ``leader_http`` its HTTP base URL, which the client follows by
    itself (so one follower's address is enough)."""

    def __init__(
        self,
        message: str,
        status: int | None = None,
        leader: str | None = None,
        leader_http: str | None = None,
    ) -> None:
        super().__init__(message, status)
        self.leader = leader
        self.leader_http = leader_http


class WaitTimeout(GantryError, TimeoutError):
    """``wait`` gave up before the job ended."""


def error_for(status: int, body: Any, fallback: str) -> GantryError:
    """The exception for an error answer (``body`` is its decoded JSON, if any)."""
    fields = body if isinstance(body, dict) else {}
    message = str(fields.get("error") or fallback)
    if status == 400:
        return SpecError(
            message, str(fields.get("field", "body")), str(fields.get("reason", message))
        )
    if status == 401:
        return Unauthorized(message, status)
    if status == 403:
        return Forbidden(message, status)
    if status == 404:
        return NotFound(message, status)
    if status == 409:
        return Conflict(message, status)
    if status == 429:
        return TooManyStreams(message, status)
    if status == 503:
        leader = fields.get("leader")
        leader_http = fields.get("leader_http")
        return Unavailable(
            message,
            status,
            leader if isinstance(leader, str) else None,
            leader_http if isinstance(leader_http, str) else None,
        )
    return GantryError(message, status)
