"""Sampling throughput of the U-Net: DDPM (T steps) vs DDIM (50) vs DPM-Solver++ (20), with peak memory.

Usage:
    python benchmarks/bench_sampling.py                   # base 64, 64x64, batch 16, T = 1000
    python benchmarks/bench_sampling.py --ddpm-steps 100  # slow CPU: time 100 steps, extrapolate
    python benchmarks/bench_sampling.py --base-channels 32 --channel-mult 1 2 4 8 --num-res-blocks 1 \
        --attention-resolutions 8 --precision bf16   # configs/results/phase1_64.yaml's U-Net
    python benchmarks/bench_sampling.py --base-channels 32 --channel-mult 1 2 4 8 --num-res-blocks 1 \
        --attention-resolutions 8 --threads 1 --batch-size 4 --ddpm-steps 50   # DPM-Solver++ 20 vs DDIM 50 vs DDPM

Every DDPM step costs one network evaluation, so timing ``--ddpm-steps`` < T steps and scaling by
T / steps gives the full-T figure; both are printed, labelled. The weights are random (the output
conv randomised too, so the sampler does real work); throughput does not depend on them.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from celldiff.diffusion.samplers import sample
from celldiff.diffusion.schedule import NoiseSchedule
from celldiff.nets.unet import UNet, count_parameters


def cpu_description() -> str:
    """CPU model name and the SIMD flags that matter for fp32/bf16 throughput."""
    model, flags = platform.processor() or "unknown", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("unknown", "", "x86_64"):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    present = {flag: (flag in flags) for flag in wanted}
    return f"{model} | " + " ".join(f"{k}={'yes' if v else 'no'}" for k, v in present.items())


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory: CUDA allocator peak, or the process's max RSS on CPU (Linux: KiB)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    assert torch.isfinite(out).all()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 2, 2])
    parser.add_argument("--num-res-blocks", type=int, default=2)
    parser.add_argument("--attention-resolutions", type=int, nargs="*", default=[16])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-timesteps", type=int, default=1000, help="T of the schedule")
    parser.add_argument("--ddpm-steps", type=int, default=1000, help="DDPM steps actually timed")
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--dpmsolver-steps", type=int, default=20, help="DPM-Solver++ 2M steps (0: skip)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--precision",
        choices=["fp32", "bf16"],
        default="fp32",
        help="bf16 = autocast around the network (the sampler stays fp32)",
    )
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"cpu: {cpu_description()}")
    print(
        f"torch {torch.__version__} | threads {torch.get_num_threads()} | device {device}"
        + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
    )

    net = UNet(
        base_channels=args.base_channels,
        channel_mult=tuple(args.channel_mult),
        num_res_blocks=args.num_res_blocks,
        attention_resolutions=tuple(args.attention_resolutions),
        image_size=args.image_size,
        dropout=0.0,
    )
    with torch.no_grad():
        for p in net.parameters():
            if not p.any():  # zero-initialised layers: make the output non-trivial
                p.normal_(0, 0.02)
    net = net.to(device).eval()
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    schedule = NoiseSchedule("linear", args.num_timesteps).to(device)
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    print(
        f"UNet base {args.base_channels}, {count_parameters(net) / 1e6:.2f} M params | "
        f"batch {shape} | precision {args.precision} | channels_last {args.channels_last}"
    )

    def autocast() -> AbstractContextManager:
        if args.precision == "bf16":
            return torch.autocast(device.type, dtype=torch.bfloat16)
        return nullcontext()

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with autocast():
            return net(x.contiguous(memory_format=memory_format), t)

    def run(method: str, steps: int) -> torch.Tensor:
        gen = torch.Generator(device).manual_seed(0)
        return sample(
            model_fn, schedule, shape, method=method, steps=steps, generator=gen, device=device
        )

    with torch.inference_mode():
        timed(lambda: run("ddim", 2), device)  # warm-up (allocator, oneDNN/cuDNN kernels)
        rows = []
        runs = [("ddpm", args.ddpm_steps), ("ddim", args.ddim_steps), ("dpmsolver", args.dpmsolver_steps)]
        for method, steps in [(m, s) for m, s in runs if s > 0]:
            seconds = timed(lambda m=method, s=steps: run(m, s), device)
            rows.append((method, steps, seconds, peak_memory_mb(device)))

    print(
        f"\n{'sampler':<10}{'steps':>7}{'time [s]':>11}{'s/step':>9}{'img/s':>10}{'s/img':>9}{'peak MiB':>10}"
    )
    for method, steps, seconds, peak in rows:
        print(
            f"{method:<10}{steps:>7}{seconds:>11.2f}{seconds / steps:>9.3f}"
            f"{args.batch_size / seconds:>10.3f}{seconds / args.batch_size:>9.3f}{peak:>10.0f}   (measured)"
        )
    method, steps, seconds, _ = rows[0]
    if method == "ddpm" and steps != args.num_timesteps:
        full = seconds / steps * args.num_timesteps
        print(
            f"{'ddpm':<10}{args.num_timesteps:>7}{full:>11.2f}{seconds / steps:>9.3f}"
            f"{args.batch_size / full:>10.3f}{full / args.batch_size:>9.3f}{'':>10}   (extrapolated from {steps} steps)"
        )
    note = "process max RSS" if device.type == "cpu" else "torch.cuda.max_memory_allocated"
    print(f"peak memory: {note}")


if __name__ == "__main__":
    main()
