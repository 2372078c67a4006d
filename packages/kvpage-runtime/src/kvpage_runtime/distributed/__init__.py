"""Tensor parallelism: model shards over torch.distributed, workers started by an executor.

``parallel`` is what the layers see (a rank's place and its collectives); ``worker`` is the
loop every non-driver rank runs; ``executor`` starts the workers (processes, or Ray actors)
and drives them from the engine's process, which is rank 0.
"""

from kvpage_runtime.distributed.parallel import TensorParallel

__all__ = ["TensorParallel"]
