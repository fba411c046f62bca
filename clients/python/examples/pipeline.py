"""Submit a self-play -> training -> evaluation pipeline from Python and
follow it to the end: events as they happen, then each stage's output.

    GANTRY_HTTP_ADDR=http://127.0.0.1:7080 python examples/pipeline.py
"""

from __future__ import annotations

import gantry

PIPELINE = {
    "pipeline": "sq8-loop",
    "jobs": [
        {
            "name": "selfplay",
            "kind": "selfplay",
            "command": ["sh", "-c", "echo 'played 512 games at batch' $GANTRY_BATCH_SIZE"],
            "resources": {"gpus": 1, "gpu_memory": "12GiB"},
            "batch": {"tiers": [{"min_free": "32GiB", "size": 512}, {"size": 128}]},
        },
        {
            "name": "train",
            "kind": "training",
            "after": ["selfplay"],
            "command": ["sh", "-c", "echo 'trained on' $GANTRY_GPU_MEMORY_BYTES 'bytes'"],
            "resources": {"gpus": 1, "gpu_memory": "24GiB"},
            "retry": {"max_attempts": 3, "backoff": "30s"},
        },
        {
            "name": "evaluate",
            "kind": "evaluation",
            "after": ["train"],
            "command": ["echo", "win rate 0.61"],
        },
    ],
}


def main() -> None:
    with gantry.Client() as client:
        ids = client.submit(PIPELINE)
        print("submitted", ids)
        remaining = set(ids)
        # Events from the start of history; the iterator resumes by itself
        # after a dropped connection, so no transition is missed.
        for event in client.watch(pipeline="sq8-loop"):
            if event.job_id not in ids:
                continue  # an earlier run of the same pipeline
            print(f"#{event.index} job {event.job_id} ({event.job_name}): {event.state}")
            if gantry.JobState(event.state).is_terminal:
                remaining.discard(event.job_id)
            if not remaining:
                break
        for job_id in ids:
            job = client.job(job_id)
            print(f"== {job.name}: {job.state.value}")
            for line in client.logs(job_id):
                print("  ", line)


if __name__ == "__main__":
    main()
