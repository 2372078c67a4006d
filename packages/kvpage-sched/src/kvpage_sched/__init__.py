"""kvpage-sched: continuous-batching scheduler over a paged KV cache.

    sched = Scheduler(cache_manager, SchedulerConfig(max_num_seqs=256))
    sched.add_request(Request("a", prompt_token_ids, max_tokens=64))
    out = sched.schedule()                   # what to compute this step
    sched.update_from_output(out, {"a": [token]}, finished={})
"""

from .config import SchedulerConfig
from .errors import RequestNotFoundError, RequestRejectedError, SchedulerConfigError, SchedulerError
from .output import ScheduledRequest, SchedulerOutput, StepStats
from .policy import FCFSQueue, PriorityQueue, WaitingQueue
from .protocol import CacheManagerProtocol
from .request import FinishReason, Request, RequestStatus
from .scheduler import Scheduler

__version__ = "0.1.0"

__all__ = [
    "CacheManagerProtocol", "FCFSQueue", "FinishReason", "PriorityQueue", "Request",
    "RequestNotFoundError", "RequestRejectedError", "RequestStatus", "ScheduledRequest",
    "Scheduler", "SchedulerConfig", "SchedulerConfigError", "SchedulerError", "SchedulerOutput",
    "StepStats", "WaitingQueue",
]
