"""Generation shared out across ranks: image i depends on seed i alone, whatever the batches or the ranks."""

from __future__ import annotations

import contextlib
import os
import socket

import torch
import torch.multiprocessing as mp

from celldiff.evaluation.sharding import generate_sharded, rank_and_world, sharded_map


class _SeedModel:
    """Stands in for a diffusion model: image i is noise from seeds[i], plus its label (B, 3, 2, 2)."""

    device = torch.device("cpu")

    def __init__(self) -> None:
        self.batches: list[int] = []

    def network_condition(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"label": batch["label"]}

    def generate(self, seeds: list[int], condition: dict[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
        self.batches.append(len(seeds))
        noise = torch.stack([torch.randn(3, 2, 2, generator=torch.Generator().manual_seed(s)) for s in seeds])
        return noise * scale + condition["label"].view(-1, 1, 1, 1)


def test_sharded_map_runs_every_job_once_in_order_on_one_process():
    assert rank_and_world() == (0, 1)
    calls = []
    assert sharded_map(lambda j: calls.append(j) or j * j, 5) == [0, 1, 4, 9, 16]
    assert calls == [0, 1, 2, 3, 4] and sharded_map(lambda j: j, 0) == []


def test_generate_sharded_does_not_depend_on_the_batches():
    seeds, labels = [11, 3, 7, 5, 2], torch.tensor([0, 1, 2, 3, 4])
    entered = []

    @contextlib.contextmanager
    def context():
        entered.append(True)
        yield

    model = _SeedModel()
    whole = generate_sharded(model, seeds, {"label": labels}, forward_context=context, scale=0.5)
    assert whole.shape == (5, 3, 2, 2) and model.batches == [5] and entered == [True]
    batched = generate_sharded(model, seeds, {"label": labels}, batch_size=2, scale=0.5)
    assert model.batches[1:] == [2, 2, 1] and torch.equal(whole, batched)
    single = _SeedModel().generate([7], {"label": torch.tensor([2])}, scale=0.5)
    assert torch.equal(whole[2:3], single)
    assert generate_sharded(model, [], {"label": torch.zeros(0)}).numel() == 0


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _SeedModel()
        images = generate_sharded(model, [11, 3, 7, 5, 2], {"label": torch.arange(5)}, batch_size=2)
        out[rank] = (images, model.batches, rank_and_world())
    finally:
        torch.distributed.destroy_process_group()


def test_generate_sharded_on_two_gloo_ranks_equals_one_process():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
        results = dict(out)
    expected = generate_sharded(_SeedModel(), [11, 3, 7, 5, 2], {"label": torch.arange(5)}, batch_size=2)
    for rank in (0, 1):
        images, batches, world = results[rank]
        assert world == (rank, 2) and torch.equal(images, expected)
    assert results[0][1] == [2, 1] and results[1][1] == [2]  # jobs 0, 2 on rank 0; job 1 on rank 1
