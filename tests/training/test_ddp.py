"""DDP on CPU (gloo): 2 processes with batch b train exactly like 1 process with batch 2b."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, SAMPLE


def run_script(tmp_path, *args: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(REPO / "tests" / "training" / "ddp_equivalence.py"), *args],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    results = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}.pt"
        env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
        result = subprocess.run([sys.executable, str(REPO / "tests" / "training" / "ddp_equivalence.py"), str(out), str(world)],
                                cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        results[world] = torch.load(out, weights_only=False)
    one, two = results[1], results[2]
    assert one["steps"] == two["steps"] == 6
    # The logged loss is the global batch's mean in both (sync_dist), step by step.
    assert one["losses"] == pytest.approx(two["losses"], rel=1e-4, abs=1e-6)
    # Weights agree to a small fraction of the optimizer's movement (lr 1e-3 x 6 steps = 6e-3 per
    # weight): the gradients differ only in float summation order, which Adam's normalisation
    # amplifies for near-zero gradients (the zero-initialised layers).
    for key, value in one["ema"].items():
        torch.testing.assert_close(two["ema"][key], value, rtol=1e-3, atol=2e-4, msg=key)
    moved = max((one["ema"][k] - two["ema"][k]).abs().max().item() for k in one["ema"])
    assert moved < 2e-4


@pytest.mark.slow
def test_two_processes_draw_the_images_masks_and_flips_of_one_process_with_the_global_batch(tmp_path):
    """The real CellDataModule (masks, augmentation, shuffle then class balance, 2 workers per rank under
    DDP): at every step, rank 0's batch followed by rank 1's is the 1-process global batch, pixel for pixel."""
    data_dir = tmp_path / "pbc"
    for class_dir in sorted(p for p in SAMPLE.iterdir() if p.is_dir()):
        (data_dir / class_dir.name).mkdir(parents=True)
        for f in sorted(class_dir.glob("*.jpg"))[:6]:
            shutil.copy(f, data_dir / class_dir.name / f.name)
    for world in (1, 2):
        run_script(tmp_path, str(tmp_path / f"data{world}.pt"), str(world), str(data_dir))
    one = torch.load(tmp_path / "data1.pt.rank0", weights_only=False)
    ranks = [torch.load(tmp_path / f"data2.pt.rank{r}", weights_only=False) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 3 * 3  # 3 epochs of 29 train images in global batches of 8
    assert {len(b["index"]) for b in one} == {8} and {len(b["index"]) for r in ranks for b in r} == {4}
    for step, global_batch in enumerate(one):
        assert [int(r[step]["epoch"]) for r in ranks] == [int(global_batch["epoch"])] * 2
        for key in ("index", "label", "image", "mask"):
            union = torch.cat([r[step][key] for r in ranks])
            assert torch.equal(union, global_batch[key]), (step, key)
    # Different ranks trained on different images, masks and flips; and each epoch on a new order.
    assert not torch.equal(ranks[0][0]["image"], ranks[1][0]["image"])
    assert not torch.equal(ranks[0][0]["mask"], ranks[1][0]["mask"])
    assert torch.cat([b["index"] for b in one[:4]]).tolist() != torch.cat([b["index"] for b in one[4:8]]).tolist()
