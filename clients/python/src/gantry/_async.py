"""The asyncio client: :class:`~gantry.Client`'s methods as coroutines,
its streams as async iterators (docstrings are on :class:`~gantry.Client`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
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


class AsyncClient(Endpoints):
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
        super().__init__(url, token, ca)
        self._http = httpx.AsyncClient(
            headers=self._settings.headers, verify=self._settings.verify, timeout=timeout
        )

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _send(self, call: Call[T]) -> T:
        attempts = self._plan()
        while (i := attempts.next()) is not None:
            try:
                response = await self._http.request(
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

    async def submit(self, spec: Spec, key: str | None = None) -> list[int]:
        return await self._send(_calls.submit(spec, key))

    async def cancel(self, id: int) -> JobState:
        return await self._send(_calls.cancel(id))

    async def dlq_retry(self, id: int, spec: Mapping[str, Any] | None = None) -> None:
        await self._send(_calls.dlq_retry(id, spec))

    async def dlq_drop(self, id: int) -> None:
        await self._send(_calls.dlq_drop(id))

    async def drain(self, node: str, deadline: str | None = None) -> None:
        await self._send(_calls.drain(node, deadline))

    async def undrain(self, node: str) -> None:
        await self._send(_calls.undrain(node))

    async def gpu_reset(self, node: str, gpu: int) -> None:
        await self._send(_calls.gpu_reset(node, gpu))

    async def job(self, id: int) -> Job:
        return await self._send(_calls.job(id))

    async def jobs(
        self,
        state: str | JobState | Sequence[str | JobState] | None = None,
        kind: str | None = None,
        pipeline: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        return await self._send(_calls.jobs(state, kind, pipeline, limit))

    async def dlq(self) -> list[Job]:
        return await self._send(_calls.dlq())

    async def nodes(self) -> list[Node]:
        return await self._send(_calls.nodes())

    async def status(self) -> dict[str, Any]:
        return await self._send(_calls.status())

    async def pipeline(self, name: str, run: int | None = None) -> Pipeline:
        return await self._send(_calls.pipeline(name, run))

    async def wait(self, id: int, timeout: float | None = None) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        after = int((await self.status()).get("last_event_index") or 0)
        backoff = 0.1
        while True:
            job = await self.job(id)
            if job.state.is_terminal:
                return job
            params, headers = _calls.events(after + 1, after, id, None, None)
            try:
                async for event in self._events(params, headers, wait_timeout(deadline)):
                    after, backoff = event.index, 0.1
                    if ends(event):
                        job = await self.job(id)
                        if job.state.is_terminal:
                            return job
            except Exception as error:
                if not reconnectable(error):
                    raise
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(f"job {id} is still {job.state.value} after {timeout}s")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def watch(
        self,
        from_index: int = 1,
        job: int | None = None,
        kind: str | None = None,
        pipeline: str | None = None,
    ) -> AsyncIterator[Event]:
        last = from_index - 1 if from_index > 1 else None
        backoff = 0.1
        while True:
            params, headers = _calls.events(from_index, last, job, kind, pipeline)
            try:
                async for event in self._events(params, headers):
                    last, backoff = event.index, 0.1
                    yield event
            except Exception as error:
                if not reconnectable(error):
                    raise
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _events(
        self,
        params: dict[str, str],
        headers: dict[str, str],
        timeout: httpx.Timeout = STREAM_TIMEOUT,
    ) -> AsyncIterator[Event]:
        url = self._url(self._current, "/v1/events")
        try:
            async with self._http.stream(
                "GET", url, params=params, headers=headers, timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    raise failure(response.status_code, response.content)
                parser = SseParser()
                async for line in response.aiter_lines():
                    parsed = parser.feed(line)
                    event = None if parsed is None else sse_event(parsed[1], parsed[2])
                    if event is not None:
                        yield event
        except (httpx.TransportError, GantryError) as error:
            self._after_error(error)
            raise
        # The server never ends a watch: an end is a dropped connection.
        raise httpx.RemoteProtocolError("event stream ended")

    async def logs(self, id: int, stderr: bool = False, follow: bool = False) -> AsyncIterator[str]:
        lines = LineSplitter()
        where = LogResume()
        while True:
            try:
                async for chunk in self._log_chunks(id, stderr, follow, where):
                    where.received(chunk)
                    for line in lines.feed(chunk):
                        yield line
                for line in lines.flush():
                    yield line
                return
            except Exception as error:
                pause = where.pause_before_resuming(error)
                if pause is None:
                    raise
            await asyncio.sleep(pause)

    async def _log_chunks(
        self, id: int, stderr: bool, follow: bool, where: LogResume
    ) -> AsyncIterator[bytes]:
        path, params = _calls.logs(id, stderr, follow, where.offset)
        attempts = self._plan()
        while (i := attempts.next()) is not None:
            url = self._url(i, path)
            async with self._http.stream(
                "GET", url, params=params, timeout=STREAM_TIMEOUT
            ) as response:
                if response.status_code >= 400:
                    await response.aread()
                    error = failure(response.status_code, response.content)
                    if response.status_code == 503 and attempts.failed(i, error):
                        continue
                    raise error
                self._current = i
                where.opened = True
                async for chunk in response.aiter_bytes():
                    yield chunk
                return
        raise attempts.last
