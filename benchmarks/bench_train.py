"""Training throughput of the DDPM U-Net: images/s per training step, fp32 and bf16 side by side.

    python benchmarks/bench_train.py                      # phase-1 U-Net (64 x 64, base 64)
    python benchmarks/bench_train.py --batch-size 64 --steps 50 --precisions 32-true bf16-mixed 16-mixed
    python benchmarks/bench_train.py --base-channels 32 --channel-mult 1 2 4 8 --num-res-blocks 1 \
        --attention-resolutions 8          # configs/results/phase1_64.yaml's 11 M U-Net

Prints the machine (CPU flags or GPU), the model size, the FLOPs of one training step (forward +
backward, counted by torch's FlopCounterMode), images/s and peak memory per precision, and on a GPU
the model FLOPs utilisation against the peak the user passes (--peak-tflops).
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from bench_data import cpu_model  # the benchmarks folder is on sys.path when run as a script
from torch.utils.flop_counter import FlopCounterMode

from celldiff.nets.unet import count_parameters
from celldiff.training.module import DiffusionModule


def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return "unknown"
    wanted = [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_fp16")]
    return " ".join(wanted) or "none of avx2/avx512"


def autocast_for(precision: str, device: torch.device):
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return torch.autocast(device.type, enabled=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--base-channels", type=int, default=64)
    parser.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 2, 2])
    parser.add_argument("--num-res-blocks", type=int, default=2)
    parser.add_argument("--attention-resolutions", type=int, nargs="*", default=[16])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per precision (after 2 warm-up steps)")
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    parser.add_argument("--peak-tflops", type=float, default=None, help="accelerator peak for MFU (e.g. 989 for H100 bf16)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}")
    else:
        print(f"CPU: {cpu_model()}; flags: {cpu_flags()}")

    module = DiffusionModule(
        image_size=args.image_size, base_channels=args.base_channels, channel_mult=tuple(args.channel_mult),
        num_res_blocks=args.num_res_blocks, attention_resolutions=tuple(args.attention_resolutions),
    ).to(device)
    net = module.unet
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    step_net = torch.compile(net) if args.compile else net
    print(f"U-Net: {count_parameters(module.unet) / 1e6:.2f} M parameters, {args.image_size} x {args.image_size}, "
          f"batch {args.batch_size}")
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    x0 = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        x0 = x0.to(memory_format=torch.channels_last)

    def train_step(precision: str) -> None:
        t = torch.randint(0, module.schedule.num_timesteps, (x0.shape[0],), device=device)
        noise = torch.randn_like(x0)
        with autocast_for(precision, device):
            loss = module.diffusion_loss(x0, t, noise, {}, step_net).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        train_step("32-true")
    flops = counter.get_total_flops()
    print(f"FLOPs per training step (fwd+bwd): {flops / 1e9:.1f} GFLOP ({flops / args.batch_size / 1e9:.2f} per image)")

    print(f"{'precision':<12} {'images/s':>10} {'s/step':>8} {'TFLOP/s':>8} {'MFU':>6} {'peak mem':>10}")
    for precision in args.precisions:
        if precision == "16-mixed" and device.type == "cpu":
            print(f"{precision:<12} skipped (fp16 autocast is for GPUs)")
            continue
        for _ in range(2):
            train_step(precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(precision)
        if device.type == "cuda":
            torch.cuda.synchronize()
            peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
        else:
            peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB*"
        seconds = (time.perf_counter() - start) / args.steps
        tflops = flops / seconds / 1e12
        mfu = f"{100 * tflops / args.peak_tflops:.1f}%" if args.peak_tflops else "-"
        print(f"{precision:<12} {args.batch_size / seconds:>10.1f} {seconds:>8.3f} {tflops:>8.3f} {mfu:>6} {peak:>10}")
    if device.type == "cpu":
        print("* CPU peak memory is the process's maximum resident set size")


if __name__ == "__main__":
    main()
