"""Generation shared out across the ranks of a process group: the one place work is split by rank.

Evaluation (``celldiff.evaluation.run``) and the training callbacks' grids and panels cut their
images into jobs; under DDP each rank runs every world-th job and every rank gets every result,
in job order. Each image depends only on its own noise seed (and condition), so the result is the
same on one device as on many, whatever the batch it is drawn in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def sharded_map(run_job: Callable[[int], T], num_jobs: int) -> list[T]:
    """``[run_job(0), ..., run_job(num_jobs - 1)]`` on every rank, each job run on rank ``job % world``.

    Every rank must call it (under a process group it ends in ``all_gather_object``). The results
    travel pickled: keep them small and on the CPU.
    """
    rank, world = rank_and_world()
    mine = {j: run_job(j) for j in range(rank, num_jobs, world)}
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, mine)
        mine = {j: result for part in gathered for j, result in part.items()}
    return [mine[j] for j in range(num_jobs)]


def generate_sharded(
    model: Any,
    seeds: Sequence[int],
    batch: dict[str, Tensor],
    batch_size: int | None = None,
    forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
    **sample_kwargs: Any,
) -> Tensor:
    """Images (N, C, S, S) in [-1, 1], on the CPU and on every rank: image i from ``seeds[i]``.

    Args:
        model: A diffusion model (``network_condition(batch)``, ``generate(seeds, condition, **kw)``,
            ``device``), or anything shaped like one (``celldiff.evaluation.baselines.FillBaseline``).
        seeds: N noise seeds.
        batch: Per-image inputs of ``network_condition``, each (N, ...): ``label`` (N,), and for
            inpainting ``image`` (N, 3, S, S) in [-1, 1] and ``mask`` (N, 1, S, S), 1 = missing.
        batch_size: Images per job; default ceil(N / world): one job per rank.
        forward_context: Wraps each ``generate`` (e.g. the trainer precision plugin's ``forward_context``).
        sample_kwargs: Passed to ``generate`` (``sampler``, ``steps``).
    """
    n = len(seeds)
    size = max(1, batch_size or math.ceil(n / rank_and_world()[1]))
    jobs = [range(i, min(i + size, n)) for i in range(0, n, size)]
    context = forward_context or nullcontext

    def run(j: int) -> Tensor:
        index = list(jobs[j])
        condition = model.network_condition({k: v[index].to(model.device) for k, v in batch.items()})
        with context():
            return model.generate([seeds[i] for i in index], condition=condition, **sample_kwargs).cpu()

    results = sharded_map(run, len(jobs))
    return torch.cat(results) if results else torch.zeros(0)
