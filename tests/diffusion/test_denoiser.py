"""The denoiser: the inpainting network's input channels, v -> eps, classifier-free guidance."""

from __future__ import annotations

import torch
from torch import Tensor

from celldiff.diffusion.denoiser import Denoiser, guided_model_fn, inpainting_input
from celldiff.diffusion.schedule import NoiseSchedule


def test_guided_model_fn_exact_cases() -> None:
    def cond(x: Tensor, t: Tensor) -> Tensor:
        return x * 3.0 + 0.1

    def uncond(x: Tensor, t: Tensor) -> Tensor:
        return x * -1.0 + 0.7

    x, t = torch.randn(2, 1, 3, 3), torch.tensor([4, 5])
    assert torch.equal(guided_model_fn(cond, uncond, 1.0)(x, t), cond(x, t))
    assert torch.equal(guided_model_fn(cond, uncond, 0.0)(x, t), uncond(x, t))
    guided = guided_model_fn(cond, uncond, 2.5)(x, t)
    torch.testing.assert_close(guided, uncond(x, t) + 2.5 * (cond(x, t) - uncond(x, t)))


def test_inpainting_input_is_x_t_masked_image_and_mask() -> None:
    g = torch.Generator().manual_seed(0)
    x_t, known = torch.randn(2, 3, 8, 8, generator=g), torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    x = inpainting_input(x_t, known, mask)
    assert x.shape == (2, 7, 8, 8) and x.dtype == x_t.dtype
    assert torch.equal(x[:, :3], x_t) and torch.equal(x[:, 3:6], known * (1 - mask)) and torch.equal(x[:, 6:], mask)
    assert (x[:, 3:6][mask.expand(-1, 3, -1, -1) > 0] == 0).all()  # nothing of the missing region leaks
    assert inpainting_input(x_t.bfloat16(), known, mask.bfloat16()).dtype == torch.bfloat16


class Recorder(torch.nn.Module):
    """A stand-in network: returns a fixed output and records what it was given."""

    def __init__(self, output: Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
        self.output, self.seen = output, {}

    def forward(self, x: Tensor, t: Tensor, class_labels: Tensor | None = None) -> Tensor:
        self.seen.update(x=x, t=t, class_labels=class_labels)
        return self.output


def test_forward_runs_the_network_in_its_dtype_and_layout_and_guides_with_the_null_class() -> None:
    schedule = NoiseSchedule("linear", 100)
    x_t, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 50])
    known, mask = torch.zeros(2, 3, 8, 8), torch.ones(2, 1, 8, 8)
    net = Recorder(torch.zeros(2, 3, 8, 8), dtype=torch.bfloat16)
    denoiser = Denoiser(schedule, inpainting=True, null_class=4, channels_last=True)
    denoiser.forward(net, x_t, t, {"known": known, "mask": mask, "class_labels": None})
    assert net.seen["x"].dtype == torch.bfloat16 and net.seen["x"].shape == (2, 7, 8, 8)
    assert net.seen["x"].is_contiguous(memory_format=torch.channels_last)
    labels = []

    class Spy(Recorder):
        def forward(self, x, t, class_labels=None):
            labels.append(class_labels.tolist())
            return torch.full_like(x, float(class_labels[0]))

    guided = Denoiser(schedule, null_class=4).model_fn(Spy(x_t), {"class_labels": torch.tensor([1, 2])}, 3.0)
    eps = guided(x_t, t)
    assert labels == [[1, 2], [4, 4]]  # conditional, then the null class
    torch.testing.assert_close(eps, torch.full_like(x_t, 4.0 + 3.0 * (1.0 - 4.0)))


def test_v_model_output_becomes_eps_through_the_schedule() -> None:
    schedule = NoiseSchedule("cosine", 100)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1, torch.randn(3, 3, 8, 8, generator=g)
    t = torch.tensor([0, 40, 99])
    x_t, v = schedule.q_sample(x0, t, noise), schedule.velocity(x0, t, noise)
    eps = Denoiser(schedule, prediction_type="v").model_fn(Recorder(v), {})(x_t, t)
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=0)
    assert torch.equal(Denoiser(schedule).model_fn(Recorder(v), {})(x_t, t), v)  # an eps model's output as it is
