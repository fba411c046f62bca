"""The blocking client."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

import httpx

from . import _calls
from ._calls import Call
from ._common import (
    MAX_BACKOFF,
    STREAM_TIMEOUT,
    Endpoints,
    LineSplitter,
    LogResume,
    Spec,
    SseParser,
    decode,
    ends,
    failure,
    reconnectable,
    sse_event,
    wait_timeout,
)
from ._errors import GantryError, Unavailable, WaitTimeout
from ._models import Event, Job, JobState, Node, Pipeline

T = TypeVar("T")


class Client(Endpoints):
    """A Gantry coordinator's HTTP API.

    With no arguments it reads ``GANTRY_HTTP_ADDR`` (default
    ``http://127.0.0.1:7080``; a comma-separated list of the replicas' HTTP
    addresses lets it find the leader), ``GANTRY_TOKEN`` and
    ``GANTRY_TLS_CA``.
    """

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        ca: str | None = None,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(url, token, ca)
        self._http = httpx.Client(
            headers=self._settings.headers, verify=self._settings.verify, timeout=timeout
        )

    def close(self) -> None:
        """Closes the connections."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _send(self, call: Call[T]) -> T:
        attempts = self._plan()
        while (i := attempts.next()) is not None:
            try:
                response = self._http.request(
                    call.method,
                    self._url(i, call.path),
                    params=call.params,
                    content=call.content,
                    headers=call.headers,
                )
            except httpx.TransportError as error:
                attempts.last = Unavailable(f"{self._settings.urls[i]}: {error}")
                continue
            if response.status_code == 503 and attempts.failed(i, failure(503, response.content)):
                continue
            self._current = i
            return call.parse(decode(response))
        raise attempts.last

    def submit(self, spec: Spec, key: str | None = None) -> list[int]:
        """Submits a job (dict), a list of jobs, a pipeline (dict with
        ``pipeline`` and ``jobs``) or a YAML spec file (path); returns the
        job ids. ``key`` makes it idempotent: the same key returns the same
        ids and never creates jobs twice (``gantry submit --key``)."""
        return self._send(_calls.submit(spec, key))

    def cancel(self, id: int) -> JobState:
        """Cancels a job; returns its state after the request."""
        return self._send(_calls.cancel(id))

    def dlq_retry(self, id: int, spec: Mapping[str, Any] | None = None) -> None:
        """Sends a dead-lettered job back to the queue, with a corrected
        spec (one job) if given."""
        self._send(_calls.dlq_retry(id, spec))

    def dlq_drop(self, id: int) -> None:
        """Drops a dead-lettered job for good (a user token: only its own jobs)."""
        self._send(_calls.dlq_drop(id))

    def drain(self, node: str, deadline: str | None = None) -> None:
        """Drains a node (admin); with a deadline (``30m``) its jobs are
        preempted then and run elsewhere."""
        self._send(_calls.drain(node, deadline))

    def undrain(self, node: str) -> None:
        """Returns a node to service (admin)."""
        self._send(_calls.undrain(node))

    def gpu_reset(self, node: str, gpu: int) -> None:
        """Clears GPU ``gpu`` of ``node``'s fault so it takes placements
        again, as ``gantry gpu reset`` (admin)."""
        self._send(_calls.gpu_reset(node, gpu))

    def job(self, id: int) -> Job:
        """One job with its attempts."""
        return self._send(_calls.job(id))

    def jobs(
        self,
        state: str | JobState | Sequence[str | JobState] | None = None,
        kind: str | None = None,
        pipeline: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """Jobs, newest first, filtered by state(s), kind and pipeline."""
        return self._send(_calls.jobs(state, kind, pipeline, limit))

    def dlq(self) -> list[Job]:
        """Dead-lettered jobs."""
        return self._send(_calls.dlq())

    def nodes(self) -> list[Node]:
        """Nodes with their GPUs."""
        return self._send(_calls.nodes())

    def status(self) -> dict[str, Any]:
        """The cluster's status as the answering replica sees it."""
        return self._send(_calls.status())

    def pipeline(self, name: str, run: int | None = None) -> Pipeline:
        """A pipeline run (the latest without ``run``) and its jobs."""
        return self._send(_calls.pipeline(name, run))

    def wait(self, id: int, timeout: float | None = None) -> Job:
        """Waits until the job is terminal (succeeded, failed, cancelled or
        dead-lettered) and returns it; raises :class:`WaitTimeout` after
        ``timeout`` seconds. It follows the job's events rather than
        polling: the job is read once at the start and again after each
        reconnect (so an end between two connections is not missed), and
        the events resume after the last one seen."""
        deadline = None if timeout is None else time.monotonic() + timeout
        # The event index first: whatever the job read misses comes after it.
        after = int(self.status().get("last_event_index") or 0)
        backoff = 0.1
        while True:
            job = self.job(id)
            if job.state.is_terminal:
                return job
            params, headers = _calls.events(after + 1, after, id, None, None)
            try:
                for event in self._events(params, headers, wait_timeout(deadline)):
                    after, backoff = event.index, 0.1
                    if ends(event):
                        job = self.job(id)
                        if job.state.is_terminal:
                            return job
            except Exception as error:
                if not reconnectable(error):
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {id} is still {job.state.value} after {timeout}s")
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def watch(
        self,
        from_index: int = 1,
        job: int | None = None,
        kind: str | None = None,
        pipeline: str | None = None,
    ) -> Iterator[Event]:
        """Events from ``from_index`` on (history, then live), forever. A
        dropped connection is resumed after the last event seen
        (``Last-Event-ID``), so none is missed or repeated."""
        last = from_index - 1 if from_index > 1 else None
        backoff = 0.1
        while True:
            params, headers = _calls.events(from_index, last, job, kind, pipeline)
            try:
                for event in self._events(params, headers):
                    last, backoff = event.index, 0.1
                    yield event
            except Exception as error:
                if not reconnectable(error):
                    raise
            time.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _events(
        self,
        params: dict[str, str],
        headers: dict[str, str],
        timeout: httpx.Timeout = STREAM_TIMEOUT,
    ) -> Iterator[Event]:
        url = self._url(self._current, "/v1/events")
        try:
            with self._http.stream(
                "GET", url, params=params, headers=headers, timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    raise failure(response.status_code, response.content)
                parser = SseParser()
                for line in response.iter_lines():
                    parsed = parser.feed(line)
                    event = None if parsed is None else sse_event(parsed[1], parsed[2])
                    if event is not None:
                        yield event
        except (httpx.TransportError, GantryError) as error:
            self._after_error(error)
            raise
        # The server never ends a watch: an end is a dropped connection.
        raise httpx.RemoteProtocolError("event stream ended")

    def logs(self, id: int, stderr: bool = False, follow: bool = False) -> Iterator[str]:
        """A job's output, line by line (without newlines); with ``follow``,
        until the job's attempt ends. A connection dropped mid-stream is
        reopened (on whichever coordinator leads then) after the last byte
        received, so no line is repeated or skipped."""
        lines = LineSplitter()
        where = LogResume()
        while True:
            try:
                for chunk in self._log_chunks(id, stderr, follow, where):
                    where.received(chunk)
                    yield from lines.feed(chunk)
                yield from lines.flush()
                return
            except Exception as error:
                pause = where.pause_before_resuming(error)
                if pause is None:
                    raise
            time.sleep(pause)

    def _log_chunks(self, id: int, stderr: bool, follow: bool, where: LogResume) -> Iterator[bytes]:
        """One request's worth of :meth:`logs`, from ``where.offset``."""
        path, params = _calls.logs(id, stderr, follow, where.offset)
        attempts = self._plan()
        while (i := attempts.next()) is not None:
            url = self._url(i, path)
            with self._http.stream("GET", url, params=params, timeout=STREAM_TIMEOUT) as response:
                if response.status_code >= 400:
                    response.read()
                    error = failure(response.status_code, response.content)
                    if response.status_code == 503 and attempts.failed(i, error):
                        continue
                    raise error
                self._current = i
                where.opened = True
                yield from response.iter_bytes()
                return
        raise attempts.last
