"""A training-loop skeleton for a Gantry job: size the batch from what the
scheduler chose, cap PyTorch to the GPU memory booked, and checkpoint when
the agent asks the job to stop (a cancel, a drain deadline, a preemption)
so the next attempt resumes instead of starting over.

Submit it with a batch policy, e.g.::

    client.submit({"name": "train", "kind": "training",
                   "command": ["python", "examples/train_loop.py"],
                   "resources": {"gpus": 1, "gpu_memory": "24GiB"},
                   "batch": {"tiers": [{"min_free": "40GiB", "size": 512}, {"size": 128}]}})
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import gantry

STEPS = 1000


def main() -> None:
    # Catch SIGTERM before anything slow, so an early stop is not lost.
    gantry.install_stop_handler()
    ctx = gantry.job_context()
    batch_size = ctx.batch_size if ctx and ctx.batch_size else 32
    gantry.limit_torch_memory(ctx)  # no-op without torch or outside a job
    # The work dir is per attempt; keep checkpoints beside the job's data.
    checkpoint = Path(ctx.work_dir if ctx and ctx.work_dir else ".") / "checkpoint.json"
    step = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
    print(f"job {ctx.job_id if ctx else '-'} starts at step {step}, batch {batch_size}")
    while step < STEPS:
        if gantry.stop_requested():
            checkpoint.write_text(json.dumps({"step": step}))
            print(f"stop requested: checkpointed at step {step}")
            return
        time.sleep(0.01)  # one training step on `batch_size` samples
        step += 1
    print("done")


if __name__ == "__main__":
    main()
