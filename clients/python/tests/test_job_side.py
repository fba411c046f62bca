"""The job-side helpers without a cluster: the context from an
environment, the torch cap without torch, and the stop flag on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import gantry


def test_job_context_reads_what_the_agent_sets() -> None:
    env = {
        "GANTRY_JOB_ID": "42",
        "GANTRY_ATTEMPT": "3",
        "GANTRY_BATCH_SIZE": "256",
        "GANTRY_GPU_MEMORY_BYTES": str(12 << 30),
        "CUDA_VISIBLE_DEVICES": "1,3",
        "GANTRY_WORK_DIR": "/data/jobs/42/3/work",
        "GANTRY_NODE": "gpu-7",
    }
    ctx = gantry.job_context(env)
    assert ctx == gantry.JobContext(
        job_id=42,
        attempt=3,
        batch_size=256,
        gpu_memory_bytes=12 << 30,
        gpus=[1, 3],
        work_dir=Path("/data/jobs/42/3/work"),
        snapshot_dir=None,
        node="gpu-7",
    )
    assert gantry.job_context({}) is None
    bare = gantry.job_context({"GANTRY_JOB_ID": "1"})
    assert bare is not None and bare.batch_size is None and bare.gpus == []


def test_limit_torch_memory_does_nothing_without_a_booking_or_torch() -> None:
    assert gantry.limit_torch_memory(gantry.job_context({"GANTRY_JOB_ID": "1"})) is None
    ctx = gantry.job_context({"GANTRY_JOB_ID": "1", "GANTRY_GPU_MEMORY_BYTES": "1024"})
    try:
        import torch  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        assert gantry.limit_torch_memory(ctx) is None


def test_stop_requested_turns_true_on_sigterm(tmp_path: Path) -> None:
    script = tmp_path / "loop.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(gantry.__file__).parent.parent)!r})\n"
        "import gantry\n"
        "assert not gantry.stop_requested()\n"
        "print('ready', flush=True)\n"
        "while not gantry.stop_requested():\n"
        "    time.sleep(0.01)\n"
        "print('checkpointed', flush=True)\n"
    )
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=10)
    assert out.strip() == "checkpointed"
    assert process.returncode == 0


def test_stop_reason_reads_the_file_the_agent_writes(tmp_path: Path) -> None:
    reason = tmp_path / ".gantry-stop-reason"
    env = {"GANTRY_STOP_REASON_FILE": str(reason)}
    assert gantry.stop_reason(env) is None
    assert gantry.stop_reason({}) is None
    reason.write_text("preempted by job 7 (priority 10)\n")
    assert gantry.stop_reason(env) == "preempted by job 7 (priority 10)"
