"""Training throughput of the U-Net in every CPU/GPU variant, side by side in one run.

    OMP_NUM_THREADS=2 python benchmarks/bench_train_variants.py                 # results configs' 11 M U-Net, 64 px
    python benchmarks/bench_train_variants.py --batch-size 32 --rounds 3 --steps 4

Variants: precision (fp32, bf16-mixed) x memory layout (contiguous, channels_last) x execution (eager,
torch.compile). One training step = the DDPM loss (v target) forward + backward + AdamW, on random images.
The variants are interleaved in rounds (round r times every variant once), so a machine that gets busier
or quieter during the run biases no variant; the table gives the median images/s over the rounds and the
ratio to fp32 / contiguous / eager. torch.compile's first steps (compilation) are excluded as warm-up and
reported separately.
"""

from __future__ import annotations

import argparse
import statistics
import time
from itertools import product

import torch
import torch.nn.functional as F
from bench_data import cpu_model  # the benchmarks folder is on sys.path when run as a script
from bench_train import cpu_flags

from celldiff.nets.unet import UNet, count_parameters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--base-channels", type=int, default=32)
    parser.add_argument("--channel-mult", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--num-res-blocks", type=int, default=1)
    parser.add_argument("--attention-resolutions", type=int, nargs="*", default=[8])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16-mixed"], choices=["fp32", "bf16-mixed"],
                        help="the precisions to measure (bf16-mixed can be many times slower on an AVX2-only CPU)")
    parser.add_argument("--layouts", nargs="+", default=["contiguous", "channels_last"],
                        choices=["contiguous", "channels_last"], help="the memory layouts to measure")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    print(f"GPU: {torch.cuda.get_device_name()}" if device.type == "cuda" else f"CPU: {cpu_model()}; flags: {cpu_flags()}")
    precisions = args.precisions
    layouts = args.layouts
    modes = ["eager"] if args.no_compile else ["eager", "compile"]
    variants = list(product(precisions, layouts, modes))

    nets, steps, compile_s = {}, {}, {}
    for precision, layout, mode in variants:
        torch.manual_seed(0)
        net = UNet(
            in_channels=3, out_channels=3, base_channels=args.base_channels, channel_mult=tuple(args.channel_mult),
            num_res_blocks=args.num_res_blocks, attention_resolutions=tuple(args.attention_resolutions),
            image_size=args.image_size, dropout=0.0,
        ).to(device)  # fmt: skip
        if layout == "channels_last":
            net = net.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
        run_net = torch.compile(net) if mode == "compile" else net
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)

        def step(run_net=run_net, optimizer=optimizer, x=x, precision=precision) -> None:
            t = torch.randint(0, 1000, (x.shape[0],), device=device)
            target = torch.randn_like(x)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                out = run_net(x, t)
            F.mse_loss(out.float(), target).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        start = time.perf_counter()
        for _ in range(2):  # warm-up (compilation for the compiled variants)
            step()
        compile_s[(precision, layout, mode)] = time.perf_counter() - start
        nets[(precision, layout, mode)], steps[(precision, layout, mode)] = net, step
    print(f"U-Net: {count_parameters(next(iter(nets.values()))) / 1e6:.2f} M parameters, "
          f"{args.image_size} x {args.image_size}, batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps")

    rates: dict[tuple[str, str, str], list[float]] = {v: [] for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            start = time.perf_counter()
            for _ in range(args.steps):
                steps[variant]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[variant].append(args.batch_size * args.steps / (time.perf_counter() - start))
    base = statistics.median(rates[variants[0]])
    print(f"{'precision':<11} {'layout':<14} {'mode':<8} {'images/s':>9} {'x base':>7} {'warm-up s':>10}")
    for variant in sorted(variants, key=lambda v: -statistics.median(rates[v])):
        median = statistics.median(rates[variant])
        print(f"{variant[0]:<11} {variant[1]:<14} {variant[2]:<8} {median:>9.1f} {median / base:>7.2f} "
              f"{compile_s[variant]:>10.1f}")


if __name__ == "__main__":
    main()
