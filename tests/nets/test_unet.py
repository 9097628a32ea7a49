"""Shapes, initialisation, conditioning and precision behaviour of the U-Net (celldiff.nets.unet)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from celldiff.nets.unet import UNet, UNetConfig, count_parameters, group_norm, timestep_embedding


def tiny(**overrides: object) -> UNet:
    config: dict[str, object] = dict(
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        image_size=16,
        dropout=0.0,
        num_heads=2,
    )
    config.update(overrides)
    return UNet(**config)  # type: ignore[arg-type]


def randomise_zero_layers(net: UNet) -> UNet:
    """Give the zero-initialised layers small random values so every path carries signal."""
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    return net


def batch(n: int = 2, channels: int = 3, size: int = 16, seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=gen), torch.randint(
        0, 1000, (n,), generator=gen
    )


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize(("c_in", "c_out"), [(3, 3), (7, 3)])
def test_output_shape_and_zero_init(size: int, c_in: int, c_out: int) -> None:
    torch.manual_seed(0)
    net = UNet(
        in_channels=c_in,
        out_channels=c_out,
        base_channels=8,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(16,),
        image_size=size,
        num_heads=2,
    )
    x, t = batch(2, c_in, size)
    out = net(x, t)
    assert out.shape == (2, c_out, size, size)
    assert torch.equal(out, torch.zeros_like(out))  # zero-initialised output conv


def test_default_parameter_count() -> None:
    n = count_parameters(UNet())
    assert 8_000_000 <= n <= 12_000_000, n
    assert count_parameters(UNet(num_classes=8)) == n + 9 * 256  # (8 + null) x emb_dim


def test_output_depends_on_t_and_labels_after_training() -> None:
    torch.manual_seed(0)
    net = tiny(num_classes=4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, t = batch(4)
    labels = torch.tensor([0, 1, 2, 4])
    # Two steps: the first only moves the output conv (everything upstream gets zero gradient
    # through the zero-initialised output); the second reaches the rest of the network.
    for _ in range(2):
        loss = (net(x, t, labels) - torch.randn_like(x)).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    x1, t1 = x[:1].expand(2, -1, -1, -1), torch.tensor([10, 900])
    out = net(x1, t1)
    assert not torch.allclose(out[0], out[1])
    out_a = net(x1, torch.tensor([10, 10]), torch.tensor([0, 3]))
    assert not torch.allclose(out_a[0], out_a[1])
    # None means the null class.
    torch.testing.assert_close(
        net(x, t), net(x, t, torch.full((4,), net.null_class)), rtol=0, atol=0
    )
    # Float timesteps are accepted and agree with long ones.
    torch.testing.assert_close(net(x, t.float()), net(x, t))


def test_bad_class_labels() -> None:
    net = tiny(num_classes=3).eval()  # values are checked when sampling/evaluating (no sync in training)
    x, t = batch(2)
    for bad in (
        torch.tensor([0, 4]),
        torch.tensor([-1, 0]),
        torch.tensor([0.0, 1.0]),
        torch.tensor([0]),
    ):
        with pytest.raises(ValueError, match="class_labels"):
            net(x, t, bad)
    net(x, t, torch.tensor([0, 3]))  # 3 = null class is valid
    with pytest.raises(ValueError, match="unconditional"):
        tiny()(x, t, torch.tensor([0, 1]))


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(image_size=18, channel_mult=(1, 2, 2)), "divisible"),
        (dict(attention_resolutions=(12,)), "reachable"),
        (dict(num_heads=3), "num_heads"),
        (dict(dropout=1.0), "dropout"),
        (dict(channel_mult=()), "channel_mult"),
        (dict(base_channels=0), "base_channels"),
        (dict(num_classes=-1), "num_classes"),
    ],
)
def test_bad_config(overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        tiny(**overrides)


def test_bad_input_shape() -> None:
    net = tiny()
    with pytest.raises(ValueError, match="divisible"):
        net(torch.zeros(1, 3, 15, 15), torch.zeros(1, dtype=torch.long))
    with pytest.raises(ValueError, match="B, 3"):
        net(torch.zeros(1, 4, 16, 16), torch.zeros(1, dtype=torch.long))


def test_gradients_reach_every_parameter_with_null_labels() -> None:
    torch.manual_seed(0)
    net = randomise_zero_layers(tiny(num_classes=5))
    x, t = batch(2)
    net(x, t).pow(2).mean().backward()  # labels None: the null embedding is still used (DDP)
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        if name != "class_embed.weight":
            assert p.grad.abs().sum() > 0, name
    assert net.class_embed.weight.grad[net.null_class].abs().sum() > 0


def test_bf16_autocast_forward() -> None:
    torch.manual_seed(0)
    net = randomise_zero_layers(tiny(base_channels=8, num_classes=2))
    x, t = batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, t, torch.tensor([0, 2]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    reference = net(x, t, torch.tensor([0, 2]))
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.05)


def test_channels_last_matches_contiguous() -> None:
    torch.manual_seed(0)
    net = randomise_zero_layers(tiny()).eval()
    x, t = batch(2)
    expected = net(x, t)
    net = net.to(memory_format=torch.channels_last)
    out = net(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_small_channel_counts_and_group_norm_clamp() -> None:
    assert group_norm(16, 32).num_groups == 16
    assert group_norm(48, 32).num_groups == 24
    assert group_norm(8, 32).num_groups == 8
    net = tiny(base_channels=8, num_groups=32)
    x, t = batch(1)
    assert net(x, t).shape == x.shape


def test_timestep_embedding() -> None:
    emb = timestep_embedding(torch.tensor([0, 5, 999]), 32)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(16), torch.zeros(16)]))
    assert timestep_embedding(torch.tensor([1.5]), 33).shape == (1, 33)
    assert not torch.allclose(emb[1], emb[2])


@pytest.mark.slow
def test_compiles_without_graph_breaks() -> None:
    net = tiny(base_channels=8, num_classes=3)
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)  # fails on any graph break
    x, t = batch(2)
    labels = torch.tensor([0, 3])
    torch.testing.assert_close(compiled(x, t, labels), net(x, t, labels))
    torch.testing.assert_close(compiled(x, t), net(x, t))


def test_config_is_the_one_list_of_arguments() -> None:
    config = UNetConfig.from_mapping({"base_channels": 16, "channel_mult": [1, 2], "num_res_blocks": 1, "lr": 1e-3,
                                      "attention_resolutions": [8], "image_size": 16, "num_heads": 2}, in_channels=7)  # fmt: skip
    assert config.channel_mult == (1, 2) and config.attention_resolutions == (8,) and config.in_channels == 7
    torch.manual_seed(0)
    from_config = UNet(config)
    torch.manual_seed(0)
    from_kwargs = UNet(in_channels=7, base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                       image_size=16, num_heads=2)  # fmt: skip
    assert from_config.config == from_kwargs.config
    for a, b in zip(from_config.state_dict().values(), from_kwargs.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="not both"):
        UNet(config, base_channels=8)
