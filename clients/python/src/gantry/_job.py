"""Inside a job: what the scheduler decided for this attempt (from the
``GANTRY_*`` environment the agent sets), a PyTorch memory cap at the
booking, and a stop flag raised by the agent's SIGTERM (before a cancel, a
drain deadline or a preemption), so a training loop can checkpoint first."""

from __future__ import annotations

import importlib
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any


@dataclass(frozen=True)
class JobContext:
    """This attempt as the scheduler placed it."""

    job_id: int
    attempt: int
    #: The batch size chosen for the GPU's free memory (``batch:`` in the
    #: spec), or ``None`` when the job has no batch policy.
    batch_size: int | None
    #: GPU memory booked per GPU, in bytes (0: none booked).
    gpu_memory_bytes: int
    #: The GPU indices given to the job (as in ``CUDA_VISIBLE_DEVICES``).
    gpus: list[int]
    work_dir: Path | None
    #: Where the spec's ``snapshot:`` files were copied, if it has any.
    snapshot_dir: Path | None
    node: str


def _env_int(env: dict[str, str], name: str) -> int | None:
    text = env.get(name, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text[:64]!r} is not an integer") from None


def job_context(env: dict[str, str] | None = None) -> JobContext | None:
    """What the scheduler decided for this attempt, read from the
    environment the agent gives the job; ``None`` outside a Gantry job."""
    env = dict(os.environ) if env is None else env
    job_id = _env_int(env, "GANTRY_JOB_ID")
    if job_id is None:
        return None
    devices = env.get("CUDA_VISIBLE_DEVICES", "")
    work = env.get("GANTRY_WORK_DIR")
    snapshot = env.get("GANTRY_SNAPSHOT_DIR")
    return JobContext(
        job_id=job_id,
        attempt=_env_int(env, "GANTRY_ATTEMPT") or 0,
        batch_size=_env_int(env, "GANTRY_BATCH_SIZE"),
        gpu_memory_bytes=_env_int(env, "GANTRY_GPU_MEMORY_BYTES") or 0,
        gpus=[int(d) for d in devices.split(",") if d.strip().isdigit()],
        work_dir=Path(work) if work else None,
        snapshot_dir=Path(snapshot) if snapshot else None,
        node=env.get("GANTRY_NODE", ""),
    )


def limit_torch_memory(context: JobContext | None = None) -> float | None:
    """Caps PyTorch's per-process GPU memory on every visible device to the
    memory booked for this attempt, so an over-eager allocator meets its own
    out-of-memory error before it crowds out a neighbour. Returns the
    fraction set on the first device; does nothing (``None``) outside a job,
    without a booking, or when torch or CUDA is not available."""
    context = context if context is not None else job_context()
    if context is None or context.gpu_memory_bytes <= 0:
        return None
    try:
        torch: Any = importlib.import_module("torch")
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    first: float | None = None
    for device in range(torch.cuda.device_count()):
        total = int(torch.cuda.get_device_properties(device).total_memory)
        fraction = min(1.0, context.gpu_memory_bytes / total)
        torch.cuda.set_per_process_memory_fraction(fraction, device)
        first = fraction if first is None else first
    return first


_stop = threading.Event()
_installed = False
_previous: Callable[[int, FrameType | None], Any] | None = None


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _stop.set()
    if callable(_previous):
        _previous(signum, frame)


def install_stop_handler() -> bool:
    """Catches SIGTERM so :func:`stop_requested` turns true instead of the
    process dying. Called by the first ``stop_requested()``; call it early
    (from the main thread) so a stop between start and the first check is
    not lost. Returns whether the handler is in place (signals can only be
    caught from the main thread)."""
    global _installed, _previous
    if _installed:
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    # A handler the program set before is still called; the default
    # (terminate) is what this replaces.
    _previous = previous if callable(previous) else None
    _installed = True
    return True


def stop_requested() -> bool:
    """True once the agent has asked this job to stop (SIGTERM, sent before
    a cancel, a drain deadline or a preemption; the agent kills the job
    after its grace period). Check it between steps and checkpoint;
    :func:`stop_reason` says why."""
    install_stop_handler()
    return _stop.is_set()


def stop_reason(env: Mapping[str, str] | None = None) -> str | None:
    """Why the agent asked this job to stop (``preempted by job 7
    (priority 10)``, ``cancelled``, ``preempted: node n1 drained``, ``node
    fault: gpu 3 ...``, ``timed out after 1h``), or ``None`` before any stop
    and outside a job. The environment cannot change after start, so the
    agent writes the reason to the file ``GANTRY_STOP_REASON_FILE`` names
    just before its SIGTERM: read it once :func:`stop_requested` is true."""
    env = os.environ if env is None else env
    path = env.get("GANTRY_STOP_REASON_FILE")
    if not path:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as file:
            text = file.read(4096).strip()
    except FileNotFoundError:
        return None
    return text or None
