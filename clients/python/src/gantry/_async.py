"""The asyncio client: :class:`Client`'s methods as coroutines, its
streams as async iterators."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

import httpx

from ._client import MAX_BACKOFF, _segment
from ._common import (
    RECONNECTABLE,
    LineSplitter,
    Spec,
    SseParser,
    decode,
    events_params,
    failure,
    settings,
    spec_body,
    sse_event,
    states_param,
)
from ._errors import GantryError, Unavailable, WaitTimeout
from ._models import Event, Job, JobState, Node, Pipeline


class AsyncClient:
    """A Gantry coordinator's HTTP API, for asyncio code.

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
        self._settings = settings(url, token, ca)
        self._http = httpx.AsyncClient(
            headers=self._settings.headers,
            verify=self._settings.verify,
            timeout=timeout,
        )
        # The address that answered last; tried first.
        self._current = 0

    async def aclose(self) -> None:
        """Closes the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    def _order(self) -> list[int]:
        n = len(self._settings.urls)
        return [(self._current + i) % n for i in range(n)]

    async def _send(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        content: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """One call, on each address in turn until one answers that is not
        a follower or unreachable."""
        last: GantryError | None = None
        for i in self._order():
            url = self._settings.urls[i] + path
            try:
                response = await self._http.request(
                    method, url, params=params, content=content, headers=headers
                )
            except httpx.TransportError as error:
                last = Unavailable(f"{self._settings.urls[i]}: {error}")
                continue
            if response.status_code == 503 and len(self._settings.urls) > 1:
                last = failure(503, response.content)
                continue
            self._current = i
            return decode(response)
        raise last if last is not None else Unavailable("no coordinator address")

    # ----------------------------------------------------------- writes

    async def submit(self, spec: Spec, key: str | None = None) -> list[int]:
        """Submits a job (dict), a list of jobs, a pipeline (dict with
        ``pipeline`` and ``jobs``) or a YAML spec file (path); returns the
        job ids. ``key`` makes it idempotent: the same key returns the same
        ids and never creates jobs twice (``gantry submit --key``)."""
        content, content_type = spec_body(spec)
        headers = {"Content-Type": content_type}
        if key is not None:
            headers["Idempotency-Key"] = key
        answer = await self._send("POST", "/v1/jobs", content=content, headers=headers)
        return [int(i) for i in answer["job_ids"]]

    async def cancel(self, id: int) -> JobState:
        """Cancels a job; returns its state after the request."""
        answer = await self._send("POST", f"/v1/jobs/{int(id)}/cancel")
        return JobState(answer["state"])

    async def dlq_retry(self, id: int, spec: Mapping[str, Any] | None = None) -> None:
        """Sends a dead-lettered job back to the queue, with a corrected
        spec (one job) if given."""
        if spec is None:
            await self._send("POST", f"/v1/dlq/{int(id)}/retry")
        else:
            content, content_type = spec_body(spec)
            await self._send(
                "POST",
                f"/v1/dlq/{int(id)}/retry",
                content=content,
                headers={"Content-Type": content_type},
            )

    async def dlq_drop(self, id: int) -> None:
        """Drops a dead-lettered job for good (admin)."""
        await self._send("DELETE", f"/v1/dlq/{int(id)}")

    async def drain(self, node: str, deadline: str | None = None) -> None:
        """Drains a node (admin); with a deadline (``30m``) its jobs are
        preempted then and run elsewhere."""
        params = {"deadline": deadline} if deadline else None
        await self._send("POST", f"/v1/nodes/{_segment(node)}/drain", params=params)

    async def undrain(self, node: str) -> None:
        """Returns a node to service (admin)."""
        await self._send("POST", f"/v1/nodes/{_segment(node)}/undrain")

    # ------------------------------------------------------------ reads

    async def job(self, id: int) -> Job:
        """One job with its attempts."""
        return Job.from_json(await self._send("GET", f"/v1/jobs/{int(id)}"))

    async def jobs(
        self,
        state: str | JobState | Sequence[str | JobState] | None = None,
        kind: str | None = None,
        pipeline: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """Jobs, newest first, filtered by state(s), kind and pipeline."""
        params = {"limit": str(limit)}
        if states_param(state):
            params["state"] = states_param(state)
        if kind:
            params["kind"] = kind
        if pipeline:
            params["pipeline"] = pipeline
        return [Job.from_json(j) for j in await self._send("GET", "/v1/jobs", params=params)]

    async def dlq(self) -> list[Job]:
        """Dead-lettered jobs."""
        return [Job.from_json(j) for j in await self._send("GET", "/v1/dlq")]

    async def nodes(self) -> list[Node]:
        """Nodes with their GPUs."""
        return [Node.from_json(n) for n in await self._send("GET", "/v1/nodes")]

    async def status(self) -> dict[str, Any]:
        """The cluster's status as the answering replica sees it."""
        answer: dict[str, Any] = await self._send("GET", "/v1/status")
        return answer

    async def pipeline(self, name: str, run: int | None = None) -> Pipeline:
        """A pipeline run (the latest without ``run``) and its jobs."""
        params = {"run": str(run)} if run is not None else None
        return Pipeline.from_json(
            await self._send("GET", f"/v1/pipelines/{_segment(name)}", params=params)
        )

    async def wait(self, id: int, timeout: float | None = None, poll: float = 0.5) -> Job:
        """Waits until the job is terminal (succeeded, failed, cancelled or
        dead-lettered) and returns it; raises :class:`WaitTimeout` after
        ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.job(id)
            if job.state.is_terminal:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {id} is still {job.state.value} after {timeout}s")
            pause = poll if deadline is None else min(poll, deadline - time.monotonic())
            await asyncio.sleep(max(pause, 0.0))

    # ---------------------------------------------------------- streams

    async def watch(
        self,
        from_index: int = 1,
        job: int | None = None,
        kind: str | None = None,
        pipeline: str | None = None,
    ) -> AsyncIterator[Event]:
        """Events from ``from_index`` on (history, then live), forever. A
        dropped connection is resumed after the last event seen
        (``Last-Event-ID``), so none is missed or repeated."""
        last: int | None = from_index - 1 if from_index > 1 else None
        backoff = 0.1
        params = events_params(job, kind, pipeline)
        while True:
            params["from"] = str(from_index)
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            try:
                async for event in self._stream_events(params, headers):
                    last = event.index
                    backoff = 0.1
                    yield event
            except RECONNECTABLE as error:
                if isinstance(error, GantryError) and error.status not in (None, 503):
                    raise
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _stream_events(
        self, params: dict[str, str], headers: dict[str, str]
    ) -> AsyncIterator[Event]:
        url = self._settings.urls[self._current] + "/v1/events"
        async with self._http.stream(
            "GET", url, params=params, headers=headers, timeout=httpx.Timeout(30.0, read=None)
        ) as response:
            if response.status_code >= 400:
                await response.aread()
                if response.status_code == 503:
                    self._current = (self._current + 1) % len(self._settings.urls)
                raise failure(response.status_code, response.content)
            parser = SseParser()
            async for line in response.aiter_lines():
                parsed = parser.feed(line)
                if parsed is None:
                    continue
                event = sse_event(parsed[1], parsed[2])
                if event is not None:
                    yield event
        # The server never ends a watch: an end is a dropped connection.
        raise httpx.RemoteProtocolError("event stream ended")

    async def logs(self, id: int, stderr: bool = False, follow: bool = False) -> AsyncIterator[str]:
        """A job's output, line by line (without newlines); with ``follow``,
        until the job's attempt ends."""
        params = {"stream": "stderr" if stderr else "stdout", "follow": str(follow).lower()}
        url = self._settings.urls[self._current] + f"/v1/jobs/{int(id)}/logs"
        async with self._http.stream(
            "GET", url, params=params, timeout=httpx.Timeout(30.0, read=None)
        ) as response:
            if response.status_code >= 400:
                await response.aread()
                raise failure(response.status_code, response.content)
            lines = LineSplitter()
            async for chunk in response.aiter_bytes():
                for line in lines.feed(chunk):
                    yield line
            for line in lines.flush():
                yield line
