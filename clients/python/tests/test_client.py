"""The client against a real ``gantry dev``: submit, wait, logs, pipelines,
events across a cut connection, wait following the events, cancel, the
dead-letter queue, bad specs, idempotent keys."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, Proxy, wait_until

import gantry
from gantry import JobState


@pytest.fixture
def client(dev: Daemon) -> gantry.Client:
    return gantry.Client(url=dev.http)


def test_client_reads_its_address_from_the_environment(
    dev: Daemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GANTRY_HTTP_ADDR", f"http://127.0.0.1:1,{dev.http}")
    monkeypatch.delenv("GANTRY_TOKEN", raising=False)
    with gantry.Client() as client:
        # The first address refuses connections; the second answers.
        assert client.status()["is_leader"] is True


def test_submit_wait_and_logs(client: gantry.Client) -> None:
    [job_id] = client.submit(
        {"name": "hello", "command": ["sh", "-c", "echo hello; echo oops >&2"]}
    )
    job = client.wait(job_id, timeout=30)
    assert job.state is JobState.SUCCEEDED
    assert job.name == "hello" and job.raw["id"] == job_id
    assert job.attempts[0].exit_code == 0
    assert list(client.logs(job_id)) == ["hello"]
    assert list(client.logs(job_id, stderr=True)) == ["oops"]
    assert list(client.logs(job_id, follow=True)) == ["hello"]
    assert job_id in [j.id for j in client.jobs(state=JobState.SUCCEEDED)]


def test_pipeline_from_a_dict_and_a_yaml_file(client: gantry.Client, tmp_path: Path) -> None:
    ids = client.submit(
        {
            "pipeline": "py-loop",
            "jobs": [
                {"name": "export", "kind": "export", "command": ["true"]},
                {"name": "train", "kind": "training", "command": ["true"], "after": ["export"]},
            ],
        }
    )
    assert len(ids) == 2
    assert all(client.wait(i, timeout=30).state is JobState.SUCCEEDED for i in ids)
    run = client.pipeline("py-loop")
    assert sorted(j.id for j in run.jobs) == sorted(ids)
    assert [j.id for j in client.jobs(kind="training", pipeline="py-loop")] == [ids[1]]
    spec = tmp_path / "job.yaml"
    spec.write_text("name: from-yaml\ncommand: [echo, yaml]\n---\ncommand: [true]\n")
    from_file = client.submit(spec)
    assert len(from_file) == 2
    assert list(client.logs(client.wait(from_file[0], timeout=30).id)) == ["yaml"]


def test_watch_resumes_across_a_cut_connection_without_missing_one(
    client: gantry.Client, dev: Daemon
) -> None:
    for _ in range(3):
        client.submit({"command": ["true"]})
    last = wait_until(
        "events",
        lambda: (
            client.status()["last_event_index"]
            if client.status()["last_event_index"] >= 9
            else None
        ),
    )
    proxy = Proxy(dev.http)
    try:
        with gantry.Client(url=proxy.url) as through:
            seen: list[int] = []
            for event in through.watch(from_index=1):
                seen.append(event.index)
                if len(seen) == last // 2:
                    proxy.cut()
                if len(seen) == last + 1:
                    break
                if len(seen) == last:
                    # One more, live, after the reconnect.
                    client.submit({"command": ["true"]})
    finally:
        proxy.close()
    assert seen == list(range(1, last + 2))


def test_watch_filters_by_job(client: gantry.Client) -> None:
    [job_id] = client.submit({"command": ["true"]})
    client.wait(job_id, timeout=30)
    events = []
    for event in client.watch(job=job_id):
        events.append(event)
        if event.state == "succeeded":
            break
    assert {e.job_id for e in events} == {job_id}
    assert [e.index for e in events] == sorted(e.index for e in events)


def test_cancel_a_running_job(client: gantry.Client) -> None:
    [job_id] = client.submit({"command": ["sleep", "600"]})
    wait_until("running", lambda: True if client.job(job_id).state is JobState.RUNNING else None)
    client.cancel(job_id)
    assert client.wait(job_id, timeout=30).state is JobState.CANCELLED
    with pytest.raises(gantry.NotFound):
        client.cancel(999_999)


def test_dead_letter_and_retry(client: gantry.Client) -> None:
    [job_id] = client.submit({"command": ["false"], "retry": {"max_attempts": 1}})
    assert client.wait(job_id, timeout=30).state is JobState.DEADLETTERED
    assert job_id in [j.id for j in client.dlq()]
    client.dlq_retry(job_id, spec={"command": ["echo", "fixed"]})
    assert client.wait(job_id, timeout=30).state is JobState.SUCCEEDED
    assert list(client.logs(job_id)) == ["fixed"]
    [other] = client.submit({"command": ["false"], "retry": {"max_attempts": 1}})
    assert client.wait(other, timeout=30).state is JobState.DEADLETTERED
    client.dlq_drop(other)
    assert other not in [j.id for j in client.dlq()]
    with pytest.raises(gantry.Conflict):
        client.dlq_drop(job_id)


#: The bad specs of the CLI's bad-input test (integration-tests/tests/
#: bad_input.rs), each with the field path and words `gantry submit -f`
#: prints for it.
BAD_SPECS: list[tuple[str, str, str, str]] = [
    ("malformed yaml", "command: [true\n", "body", "malformed YAML"),
    (
        "unknown kind",
        "kind: sleeping\ncommand: [true]\n",
        "jobs[0].kind",
        'unknown kind "sleeping"',
    ),
    (
        "negative gpu memory",
        "command: [true]\nresources: {gpus: 1, gpu_memory: -1}\n",
        "job.resources.gpu_memory",
        "must not be negative",
    ),
    (
        "absurd gpus",
        "command: [true]\nresources: {gpus: 10000}\n",
        "jobs[0].resources.gpus",
        "10000 exceeds the maximum",
    ),
    ("empty command", "command: []\n", "jobs[0].command", "must not be empty"),
    ("unknown field", "command: [true]\ngpus: 1\n", "job", "unknown field `gpus`"),
    (
        "10 MB spec",
        'command: [true]\nenv: {BIG: "' + "x" * (10 << 20) + '"}\n',
        "body",
        "larger than the 4MiB limit",
    ),
    ("retry zero", "command: [true]\nretry: {max_attempts: 0}\n", "job.retry.max_attempts", ""),
    (
        "retry million",
        "command: [true]\nretry: {max_attempts: 1000000}\n",
        "jobs[0].retry.max_attempts",
        "1000000 exceeds",
    ),
    (
        "after unknown",
        "- {name: a, command: [true], after: [b]}\n",
        "jobs[0].after",
        'no job named "b"',
    ),
    (
        "cycle",
        "- {name: a, command: [true], after: [b]}\n- {name: b, command: [true], after: [a]}\n",
        "",
        "cycle",
    ),
    ("reserved env", "command: [true]\nenv: {GANTRY_JOB_ID: 3}\n", "jobs[0].env.GANTRY_JOB_ID", ""),
    (
        "self edge",
        "- {name: a, command: [true], after: [a]}\n",
        "jobs[0].after",
        "cannot wait for itself",
    ),
    (
        "duplicate stage",
        "pipeline: p\njobs:\n  - {name: a, command: [true]}\n  - {name: a, command: [true]}\n",
        "",
        '"a" is used twice',
    ),
    (
        "snapshot escape",
        "command: [true]\nsnapshot: [{from: /models/x.pt, as: ../x.pt}]\n",
        "jobs[0].snapshot[0].as",
        "",
    ),
    (
        "snapshot absolute target",
        "command: [true]\nsnapshot: [{from: /models/x.pt, as: /etc/passwd}]\n",
        "jobs[0].snapshot[0].as",
        "",
    ),
    (
        "snapshot relative source",
        "command: [true]\nsnapshot: [{from: models/x.pt, as: x.pt}]\n",
        "jobs[0].snapshot[0].from",
        "",
    ),
    (
        "bad memory policy",
        "command: [true]\ngpu_memory_policy: explode\n",
        "jobs[0].gpu_memory_policy",
        "",
    ),
]


@pytest.mark.parametrize(
    ("case", "text", "field", "words"), BAD_SPECS, ids=[c[0] for c in BAD_SPECS]
)
def test_bad_specs_raise_spec_error_with_the_field(
    client: gantry.Client, tmp_path: Path, case: str, text: str, field: str, words: str
) -> None:
    before = len(client.jobs(limit=10_000))
    spec = tmp_path / "spec.yaml"
    spec.write_text(text)
    with pytest.raises(gantry.SpecError) as raised:
        client.submit(spec)
    error = raised.value
    assert error.field.startswith(field), f"{case}: {error.field!r} ({error})"
    assert words in str(error), f"{case}: {error}"
    assert "\n" not in str(error) and len(str(error)) < 2000
    assert len(client.jobs(limit=10_000)) == before, f"{case}: nothing stored"


def test_bad_dict_specs_name_the_field(client: gantry.Client) -> None:
    cases: list[tuple[Any, str]] = [
        ({"command": ["true"], "priority": "high"}, "job.priority"),
        ([{"command": ["true"]}, {"command": ["true"], "bogus": 1}], "jobs[1]"),
        ({"command": ["true"], "resources": {"gpus": -2}}, "job.resources.gpus"),
        (42, "body"),
    ]
    for spec, field in cases:
        with pytest.raises(gantry.SpecError) as raised:
            client.submit(spec)
        assert raised.value.field.startswith(field), raised.value


def test_a_key_makes_a_resubmission_return_the_same_ids(client: gantry.Client) -> None:
    spec = [{"command": ["true"]}, {"command": ["true"]}]
    first = client.submit(spec, key="py-nightly-1")
    assert client.submit(spec, key="py-nightly-1") == first
    assert client.submit(spec, key="py-nightly-2") != first


def test_the_job_side_helpers_inside_a_real_job(client: gantry.Client, tmp_path: Path) -> None:
    """A job that reads its context and checkpoints when asked to stop."""
    script = tmp_path / "train.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(gantry.__file__).parent.parent)!r})\n"
        "import gantry\n"
        "gantry.install_stop_handler()\n"
        "ctx = gantry.job_context()\n"
        "print('context', ctx.job_id, ctx.attempt, ctx.batch_size, ctx.gpus,"
        " ctx.gpu_memory_bytes, flush=True)\n"
        "while not gantry.stop_requested():\n"
        "    time.sleep(0.05)\n"
        "print('checkpoint at stop', flush=True)\n"
    )
    [job_id] = client.submit(
        {
            "command": [sys.executable, str(script)],
            "resources": {"gpus": 1, "gpu_memory": "10GiB"},
            "batch": {"tiers": [{"min_free": "40GiB", "size": 256}, {"size": 64}]},
        }
    )

    def printed_context() -> bool | None:
        try:
            return True if any(x.startswith("context") for x in client.logs(job_id)) else None
        except gantry.NotFound:  # not placed yet
            return None

    wait_until("context printed", printed_context)
    client.cancel(job_id)
    # The job checkpoints and exits 0 within its grace: the attempt
    # succeeded (the coordinator records the exit it saw).
    assert client.wait(job_id, timeout=30).state.is_terminal
    lines = list(client.logs(job_id))
    attempt = client.job(job_id).attempts[-1]
    expected = f"context {job_id} {attempt.attempt} 256 {attempt.gpus} {10 << 30}"
    assert lines[0] == expected, lines
    assert "checkpoint at stop" in lines


def test_the_async_client(dev: Daemon) -> None:
    async def run() -> None:
        async with gantry.AsyncClient(url=dev.http) as client:
            [job_id] = await client.submit({"command": ["echo", "async"]})
            job = await client.wait(job_id, timeout=30)
            assert job.state is JobState.SUCCEEDED
            assert [line async for line in client.logs(job_id)] == ["async"]
            events = []
            async for event in client.watch(job=job_id):
                events.append(event)
                if event.state == "succeeded":
                    break
            assert {e.job_id for e in events} == {job_id}
            assert (await client.nodes())[0].gpus
            with pytest.raises(gantry.SpecError):
                await client.submit({"command": []})

    asyncio.run(run())


def _count_job_reads(client: gantry.Client | gantry.AsyncClient, job_id: int) -> list[str]:
    """Records the client's reads of one job (``GET /v1/jobs/ID``)."""
    reads: list[str] = []
    path = f"/v1/jobs/{job_id}"

    def hook(request: httpx.Request) -> None:
        if request.method == "GET" and request.url.path == path:
            reads.append(str(request.url))

    async def async_hook(request: httpx.Request) -> None:
        hook(request)

    if isinstance(client, gantry.Client):
        client._http.event_hooks["request"] = [hook]
    else:
        client._http.event_hooks["request"] = [async_hook]
    return reads


def test_wait_follows_the_events_across_a_cut_connection(dev: Daemon) -> None:
    proxy = Proxy(dev.http)
    try:
        client = gantry.Client(url=proxy.url)
        [job_id] = client.submit({"command": ["sleep", "3"]})
        reads = _count_job_reads(client, job_id)
        # The connection is cut while the wait follows the job's events.
        cutter = threading.Timer(1.0, proxy.cut)
        cutter.start()
        job = client.wait(job_id, timeout=30)
        cutter.join()
        assert job.state is JobState.SUCCEEDED
        # Read at the start, after the reconnect and at the end: polling
        # every half second for three seconds would read it more often.
        assert 2 <= len(reads) <= 4, reads
    finally:
        proxy.close()


def test_wait_times_out(client: gantry.Client, dev: Daemon) -> None:
    [job_id] = client.submit({"command": ["sleep", "60"]})
    with pytest.raises(gantry.WaitTimeout, match=f"job {job_id} is still"):
        client.wait(job_id, timeout=1)

    async def run() -> None:
        async with gantry.AsyncClient(url=dev.http) as aclient:
            reads = _count_job_reads(aclient, job_id)
            with pytest.raises(gantry.WaitTimeout):
                await aclient.wait(job_id, timeout=1)
            assert len(reads) == 1, reads

    asyncio.run(run())
    client.cancel(job_id)


def test_logs_follow_resumes_across_a_cut_connection(dev: Daemon) -> None:
    script = "i=0; while [ $i -lt 40 ]; do i=$((i+1)); echo line $i; sleep 0.1; done"
    expected = [f"line {i}" for i in range(1, 41)]
    proxy = Proxy(dev.http)
    try:
        with gantry.Client(url=proxy.url) as through:
            [job_id] = through.submit({"command": ["sh", "-c", script]})
            wait_until(
                "the job running", lambda: through.job(job_id).state is JobState.RUNNING or None
            )
            lines: list[str] = []
            for line in through.logs(job_id, follow=True):
                lines.append(line)
                if len(lines) == 5:
                    proxy.cut()
            assert lines == expected

        async def run() -> list[str]:
            async with gantry.AsyncClient(url=proxy.url) as aclient:
                [job_id] = await aclient.submit({"command": ["sh", "-c", script]})
                while (await aclient.job(job_id)).state is not JobState.RUNNING:
                    await asyncio.sleep(0.05)
                got: list[str] = []
                async for line in aclient.logs(job_id, follow=True):
                    got.append(line)
                    if len(got) == 5:
                        proxy.cut()
                return got

        assert asyncio.run(run()) == expected
    finally:
        proxy.close()
