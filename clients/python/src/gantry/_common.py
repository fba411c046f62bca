"""What the blocking and the asyncio client share: settings from the
environment, request bodies, answers to values or exceptions, and the
incremental parsers of Server-Sent Events and log lines."""

from __future__ import annotations

import json
import os
import ssl
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import httpx

from ._errors import GantryError, SpecError, Unavailable, error_for
from ._models import Event, JobState

DEFAULT_ADDR = "http://127.0.0.1:7080"

#: Largest spec file the coordinator accepts (its own limit, checked here
#: first so a huge file is not read into memory).
MAX_SPEC_BYTES = 4 << 20

#: A spec: a dict (one job or a pipeline), a list of job dicts, or the path
#: of a YAML spec file (as for ``gantry submit -f``).
Spec = Union[Mapping[str, Any], Sequence[Mapping[str, Any]], str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Settings:
    """Where and how to connect."""

    urls: list[str]
    headers: dict[str, str]
    verify: bool | ssl.SSLContext


def settings(url: str | None, token: str | None, ca: str | None) -> Settings:
    """Arguments first, then ``GANTRY_HTTP_ADDR`` (a comma-separated list
    allowed), ``GANTRY_TOKEN`` and ``GANTRY_TLS_CA``."""
    text = url if url is not None else os.environ.get("GANTRY_HTTP_ADDR", DEFAULT_ADDR)
    urls = [u.strip().rstrip("/") for u in text.split(",") if u.strip()]
    if not urls:
        raise ValueError("no coordinator address (GANTRY_HTTP_ADDR is empty)")
    urls = [u if "://" in u else f"http://{u}" for u in urls]
    token = token if token is not None else os.environ.get("GANTRY_TOKEN") or None
    ca = ca if ca is not None else os.environ.get("GANTRY_TLS_CA") or None
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token.strip()}"
    verify: bool | ssl.SSLContext = True
    if ca:
        verify = ssl.create_default_context(cafile=ca)
    return Settings(urls=urls, headers=headers, verify=verify)


def spec_body(spec: Spec) -> tuple[bytes, str]:
    """The request body of a submit: a path is sent as its YAML text (the
    coordinator parses it exactly as ``gantry submit -f``), anything else as
    JSON."""
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        with path.open("rb") as file:
            data = file.read(MAX_SPEC_BYTES + 1)
        if len(data) > MAX_SPEC_BYTES:
            reason = "larger than the 4MiB limit for a spec file"
            raise SpecError(f"{path}: {reason}", "body", reason)
        return data, "application/yaml"
    return json.dumps(spec).encode(), "application/json"


def decode(response: httpx.Response) -> Any:
    """The JSON of a successful answer; the matching exception otherwise."""
    if response.status_code >= 400:
        raise failure(response.status_code, response.content)
    return response.json()


def failure(status: int, content: bytes) -> GantryError:
    """The exception for an error answer's status and body."""
    try:
        body = json.loads(content)
    except ValueError:
        body = None
    return error_for(status, body, f"HTTP {status}")


def states_param(state: str | JobState | Sequence[str | JobState] | None) -> str:
    """``state=`` as the API takes it: comma-separated names."""
    if state is None:
        return ""
    items = [state] if isinstance(state, (str, JobState)) else list(state)
    return ",".join(s.value if isinstance(s, JobState) else s for s in items)


class SseParser:
    """Server-Sent Events, line by line (the ``text/event-stream`` format):
    ``feed`` returns an event when a blank line ends one."""

    def __init__(self) -> None:
        self._id: str | None = None
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str | None, str, str] | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = ""
                return None
            done = (self._id, self._event or "message", "\n".join(self._data))
            self._id, self._event, self._data = None, "", []
            return done
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if name == "id":
            self._id = value
        elif name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def sse_event(event: str, data: str) -> Event | None:
    """A parsed SSE event as an :class:`Event` (``None`` for other types);
    an ``error`` event raises, ending the stream: with the status it names
    (401 for a revoked token), 503 (the caller reconnects) otherwise."""
    if event == "error":
        try:
            fields = json.loads(data)
        except ValueError:
            fields = None
        status = fields.get("status") if isinstance(fields, dict) else None
        raise failure(status if isinstance(status, int) else 503, data.encode())
    if event != "job":
        return None
    raw = json.loads(data)
    return Event.from_json(raw) if isinstance(raw, dict) else None


class LineSplitter:
    """Bytes to text lines (without their newline), undecodable bytes
    replaced: a job's output is whatever the job wrote."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> list[str]:
        self._rest += chunk
        *lines, self._rest = self._rest.split(b"\n")
        return [line.decode("utf-8", "replace") for line in lines]

    def flush(self) -> list[str]:
        rest, self._rest = self._rest, b""
        return [rest.decode("utf-8", "replace")] if rest else []


#: Reconnections of one log stream in a row with no output received between
#: them: a stream that breaks again at once is not a passing failover.
MAX_LOG_RESUMES = 10


class LogResume:
    """Where a followed log stream is, so that a connection dropped
    mid-stream (a failover, a cut) is reopened after the last byte
    received rather than from the start or not at all."""

    def __init__(self) -> None:
        #: Bytes of the stream received so far: the next request's offset.
        self.offset = 0
        #: Whether any request of this stream was answered 200: a first
        #: opening's failures are final, as for any call.
        self.opened = False
        self._resumes = 0

    def received(self, chunk: bytes) -> None:
        self.offset += len(chunk)
        self._resumes = 0

    def pause_before_resuming(self, error: Exception) -> float | None:
        """Seconds to wait before reopening after ``error``, or ``None``
        when the error ends the stream."""
        if not self.opened or not reconnectable(error) or self._resumes >= MAX_LOG_RESUMES:
            return None
        self._resumes += 1
        return min(0.2 * self._resumes, MAX_BACKOFF)


#: Redirections to a named leader one request follows at most (a leader
#: changing under it may name another).
MAX_REDIRECTS = 3

#: Addresses an endpoint list grows to at most with leaders named by
#: followers (each replica's HTTP address, so a handful in practice).
MAX_ADDRESSES = 32


class Endpoints:
    """The coordinators' addresses and which one answered last (tried
    first): a request goes to each in turn past unreachable ones and
    followers, and to the leader a follower names (its HTTP address is
    added to the list when new)."""

    def __init__(self, url: str | None, token: str | None, ca: str | None) -> None:
        self._settings = settings(url, token, ca)
        self._current = 0

    def _leader(self, error: GantryError, asked: int) -> int | None:
        """The index of the leader a follower named in ``error`` (added to
        the addresses when new), unless it is the one asked."""
        if not isinstance(error, Unavailable) or not error.leader_http:
            return None
        url = error.leader_http.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            return None
        urls = self._settings.urls
        if url not in urls:
            if len(urls) >= MAX_ADDRESSES:
                return None
            urls.append(url)
        index = urls.index(url)
        return None if index == asked else index

    def _after_error(self, error: Exception) -> None:
        """A stream failed: the leader it named is tried first, else the
        next address."""
        leader = self._leader(error, self._current) if isinstance(error, GantryError) else None
        if leader is not None:
            self._current = leader
        else:
            self._next()

    def _plan(self) -> Attempts:
        """The addresses one request tries, in order."""
        return Attempts(self, self._order())

    def _order(self) -> list[int]:
        n = len(self._settings.urls)
        return [(self._current + i) % n for i in range(n)]

    def _url(self, index: int, path: str) -> str:
        return self._settings.urls[index] + path

    def _skip(self, response_status: int) -> bool:
        """Whether to try the next address after this answer (a follower
        or an election, when there are others to ask)."""
        return response_status == 503 and len(self._settings.urls) > 1

    def _next(self) -> None:
        """Makes the next address the first tried (after a stream failed)."""
        self._current = (self._current + 1) % len(self._settings.urls)


class Attempts:
    """The addresses one request tries: each in turn, a leader named by a
    follower first (at most :data:`MAX_REDIRECTS` times)."""

    def __init__(self, endpoints: Endpoints, order: list[int]) -> None:
        self._endpoints = endpoints
        self._order = order
        self._redirects = 0
        self.last: GantryError = Unavailable("no coordinator address")

    def next(self) -> int | None:
        """The next address to try, if any is left."""
        return self._order.pop(0) if self._order else None

    def failed(self, asked: int, error: GantryError) -> bool:
        """Records a refusal from ``asked``; whether to try another address
        (a named leader, or the next one when there are several)."""
        self.last = error
        leader = self._endpoints._leader(error, asked)
        if leader is not None and self._redirects < MAX_REDIRECTS:
            self._redirects += 1
            if leader in self._order:
                self._order.remove(leader)
            self._order.insert(0, leader)
            return True
        return self._endpoints._skip(error.status or 0)


def ends(event: Event) -> bool:
    """Whether ``event`` says its job reached a terminal state."""
    try:
        return JobState(event.state).is_terminal
    except ValueError:
        return False


#: How long ``wait`` reads a quiet event stream before it reconnects (the
#: coordinator sends a keep-alive every 15 s, so silence past this is a
#: dead connection).
WAIT_READ_TIMEOUT = 45.0


def wait_timeout(deadline: float | None) -> httpx.Timeout:
    """The timeouts of one connection of ``wait``: reads end at the
    deadline (or when the connection went silent)."""
    read = WAIT_READ_TIMEOUT
    if deadline is not None:
        read = max(min(read, deadline - time.monotonic()), 0.001)
    return httpx.Timeout(30.0, read=read)


#: Longest pause between two reconnects of a watch.
MAX_BACKOFF = 2.0

#: A stream's timeouts: a quiet event stream or followed log is not dead.
STREAM_TIMEOUT = httpx.Timeout(30.0, read=None)


def reconnectable(error: Exception) -> bool:
    """Whether a watch resumes after this error: a dropped connection, an
    unreachable or a not-leading coordinator, an error event."""
    if isinstance(error, GantryError):
        return error.status in (None, 503)
    return isinstance(error, (httpx.TransportError, httpx.StreamError))
