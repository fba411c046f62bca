"""Python client for Gantry, a GPU-aware cluster job scheduler.

From a notebook or a driver script::

    import gantry
    client = gantry.Client()          # GANTRY_HTTP_ADDR, GANTRY_TOKEN, GANTRY_TLS_CA
    [job_id] = client.submit({"name": "train", "command": ["python", "train.py"],
                              "resources": {"gpus": 1, "gpu_memory": "12GiB"}})
    job = client.wait(job_id)
    for line in client.logs(job_id):
        print(line)

Inside a job: :func:`job_context`, :func:`limit_torch_memory` and
:func:`stop_requested`.
"""

from ._async import AsyncClient
from ._client import Client
from ._errors import (
    Conflict,
    Forbidden,
    GantryError,
    NotFound,
    SpecError,
    TooManyStreams,
    Unauthorized,
    Unavailable,
    WaitTimeout,
)
from ._job import (
    JobContext,
    install_stop_handler,
    job_context,
    limit_torch_memory,
    stop_reason,
    stop_requested,
)
from ._models import Attempt, Event, Job, JobState, Node, Pipeline

__all__ = [
    "AsyncClient",
    "Attempt",
    "Client",
    "Conflict",
    "Event",
    "Forbidden",
    "GantryError",
    "Job",
    "JobContext",
    "JobState",
    "Node",
    "NotFound",
    "Pipeline",
    "SpecError",
    "TooManyStreams",
    "Unauthorized",
    "Unavailable",
    "WaitTimeout",
    "install_stop_handler",
    "job_context",
    "limit_torch_memory",
    "stop_reason",
    "stop_requested",
]
