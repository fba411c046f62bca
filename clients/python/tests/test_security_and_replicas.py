"""Tokens and roles (401 without, 403 for a user token on drain) and a
follower that names the leader, against real coordinators."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from conftest import Daemons, free_port, wait_until

import gantry

USER = "alice-secret-0123456789"
ADMIN = "ops-secret-0123456789ab"


@pytest.fixture(scope="module")
def secured(daemons: Daemons) -> str:
    tokens = daemons.root / "tokens.yaml"
    tokens.write_text(
        f"- {{name: alice, token: {USER}, role: user}}\n"
        f"- {{name: ops, token: {ADMIN}, role: admin}}\n"
    )
    daemon = daemons.start(
        "secured",
        [
            "coordinator",
            "--grpc-addr",
            "127.0.0.1:0",
            "--http-addr",
            "127.0.0.1:0",
            "--data-dir",
            str(daemons.root / "secured"),
            "--tokens",
            str(tokens),
        ],
    )
    return daemon.http


def test_no_token_is_unauthorized(secured: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GANTRY_TOKEN", raising=False)
    with pytest.raises(gantry.Unauthorized):
        gantry.Client(url=secured).submit({"command": ["true"]})
    with pytest.raises(gantry.Unauthorized):
        gantry.Client(url=secured, token="not-a-known-token-at-all").jobs()


def test_a_user_token_cannot_drain(secured: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GANTRY_TOKEN", USER)
    user = gantry.Client(url=secured)
    with pytest.raises(gantry.Forbidden) as raised:
        user.drain("gpu-1", deadline="30m")
    assert "admin" in str(raised.value)
    assert len(user.submit({"command": ["true"]})) == 1
    admin = gantry.Client(url=secured, token=ADMIN)
    # A user may change only its own jobs: the admin's is refused before
    # anything else is looked at.
    theirs = admin.submit({"command": ["true"]})[0]
    with pytest.raises(gantry.Forbidden):
        user.dlq_drop(theirs)
    with pytest.raises(gantry.NotFound):
        admin.drain("gpu-1")


def test_gpu_reset_is_for_admins(secured: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GANTRY_TOKEN", raising=False)
    user = gantry.Client(url=secured, token=USER)
    with pytest.raises(gantry.Forbidden) as raised:
        user.gpu_reset("gpu-1", 0)
    assert "admin" in str(raised.value)
    admin = gantry.Client(url=secured, token=ADMIN)
    with pytest.raises(gantry.NotFound):
        admin.gpu_reset("gpu-1", 0)
    with pytest.raises(gantry.SpecError) as bad:
        admin.gpu_reset("gpu-1", -1)
    assert bad.value.field == "gpu"

    async def async_reset() -> None:
        async with gantry.AsyncClient(url=secured, token=ADMIN) as client:
            with pytest.raises(gantry.NotFound):
                await client.gpu_reset("gpu-1", 0)

    asyncio.run(async_reset())


@pytest.fixture(scope="module")
def replicas(daemons: Daemons) -> Iterator[list[str]]:
    """Three coordinator replicas on 127.0.0.1; their HTTP addresses."""
    ports = [free_port() for _ in range(3)]
    peers = ",".join(f"{i + 1}=http://127.0.0.1:{p}" for i, p in enumerate(ports))
    started = [
        daemons.start(
            f"replica-{i + 1}",
            [
                "coordinator",
                "--id",
                str(i + 1),
                "--peers",
                peers,
                "--grpc-addr",
                f"127.0.0.1:{port}",
                "--http-addr",
                "127.0.0.1:0",
                "--data-dir",
                str(daemons.root / f"replica-{i + 1}"),
            ],
        )
        for i, port in enumerate(ports)
    ]
    yield [d.http for d in started]


def _leader(https: list[str]) -> int | None:
    for i, http in enumerate(https):
        try:
            ready = httpx.get(http + "/readyz", timeout=2).json()
        except (httpx.HTTPError, ValueError):
            continue
        if ready.get("ready") and ready.get("is_leader"):
            return i
    return None


def _knows_leader(follower: str, leader: str) -> bool | None:
    try:
        ready = httpx.get(follower + "/readyz", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return None
    return True if ready.get("leader_http") == leader else None


def test_a_follower_redirecting_to_the_leader(replicas: list[str]) -> None:
    leader = wait_until("a leader", lambda: _leader(replicas))
    follower = next(i for i in range(3) if i != leader)
    wait_until(
        "the follower to know the leader",
        lambda: _knows_leader(replicas[follower], replicas[leader]),
    )
    # The follower's answer names the leader's gRPC and HTTP addresses.
    raw = httpx.post(replicas[follower] + "/v1/jobs", json={"command": ["true"]}, timeout=10)
    assert raw.status_code == 503, raw.text
    assert raw.json()["leader_http"] == replicas[leader]
    assert raw.headers["gantry-leader-http"] == replicas[leader]
    status = gantry.Client(url=replicas[leader], token="").status()
    assert raw.json()["leader"] == status["leader_url"]
    # Given only the follower, the client follows it: writes, reads,
    # events and logs.
    client = gantry.Client(url=replicas[follower], token="")
    [job_id] = client.submit({"command": ["true"]}, key="through-a-follower")
    assert client.job(job_id).id == job_id
    assert client.submit({"command": ["true"]}, key="through-a-follower") == [job_id]
    one = gantry.Client(url=replicas[follower], token="")
    event = next(iter(one.watch(job=job_id)))
    assert event.job_id == job_id
    # No agent here: the leader answers that the job is not placed yet.
    with pytest.raises(gantry.NotFound, match="not been placed yet"):
        list(gantry.Client(url=replicas[follower], token="").logs(job_id))

    async def through_the_follower() -> None:
        async with gantry.AsyncClient(url=replicas[follower], token="") as client:
            [again] = await client.submit({"command": ["true"]}, key="through-a-follower")
            assert again == job_id
            assert (await client.job(job_id)).id == job_id

    asyncio.run(through_the_follower())
    # A list with the follower first finds the leader too.
    both = gantry.Client(url=f"{replicas[follower]},{replicas[leader]}", token="")
    assert both.job(job_id).id == job_id
