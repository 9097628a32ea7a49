"""Data loading throughput: decode-once uint8 cache vs a torchvision ImageFolder pipeline.

    python benchmarks/bench_data.py                                      # bundled 320-image sample
    python benchmarks/bench_data.py --data-dir /work/shared/data/pbc64   # all 17,092 images (64 x 64)
    python benchmarks/bench_data.py --image-size 360 --batch-size 16     # full-size originals

Prints, side by side, for the same files, batch size and workers:
  (a) building the cache (cold: a fresh cache folder), images/s;
  (b) one pass of ImageFolder + Resize + CenterCrop + ToTensor + Normalize through a DataLoader;
  (a1), (b1) the same with one process each: the per-CPU cost, steadier on a shared machine;
  (c) CellDataModule.train_dataloader() over the cache, with augmentation, over several epochs,
      with --num-workers workers and in-process (num_workers=0);
and the ratios against the targets (c) >= 50 x (b) and (a) >= 2 x (b). All files are read once
beforehand so that neither side pays for the disk and the order does not matter.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader, Subset
from torchvision import datasets
from torchvision import transforms as T

from celldiff.data.datamodule import CellDataModule
from celldiff.data.imagecache import build_cache
from celldiff.data.scan import scan_dataset
from celldiff.errors import CellDataWarning


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> str:
    try:
        flags = open("/proc/cpuinfo").read().split("flags")[1].split("\n")[0].split()
    except (OSError, IndexError):
        return "unknown"
    wanted = [f for f in flags if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")]
    return " ".join(wanted) or "none of avx2/avx512"


def imagefolder_pass(root: Path, relpaths: list[str], size: int, batch_size: int, workers: int) -> float:
    """Seconds for one shuffled pass over ``relpaths`` (worker start-up included, as in training)."""
    transform = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    folder = datasets.ImageFolder(str(root), transform=transform)
    position = {Path(path).relative_to(root).as_posix(): i for i, (path, _) in enumerate(folder.samples)}
    subset = Subset(folder, [position[p] for p in relpaths])
    loader = DataLoader(subset, batch_size=batch_size, shuffle=True, num_workers=workers)
    start = time.perf_counter()
    count = sum(len(images) for images, _ in loader)
    assert count == len(relpaths)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default="/work/shared/data/pbc_sample")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2, help="DataLoader workers (and cache decode workers)")
    parser.add_argument("--limit", type=int, default=None, help="use N files spread evenly over the classes")
    parser.add_argument("--cached-images", type=int, default=30000, help="images to draw in (c), at least 3 epochs")
    args = parser.parse_args()

    scan = scan_dataset(args.data_dir)
    if args.limit and args.limit < len(scan.relpaths):
        keep = np.unique(np.linspace(0, len(scan.relpaths) - 1, args.limit).round().astype(int)).tolist()
        scan = dataclasses.replace(
            scan, **{field: tuple(getattr(scan, field)[i] for i in keep) for field in ("relpaths", "labels", "stamps")}
        )
    root = scan.source / scan.prefix
    total_bytes = 0
    for rel in scan.relpaths:  # page-cache every file: both pipelines then decode from memory
        total_bytes += len((root / rel).read_bytes())
    size, workers = args.image_size, args.num_workers
    print(f"cpu:        {cpu_model()} | {os.cpu_count()} cores | flags: {cpu_flags()}")
    print(f"software:   torch {torch.__version__}, torchvision {torchvision.__version__}, numpy {np.__version__}")
    print(
        f"data:       {args.data_dir}: {len(scan.relpaths)} files, {total_bytes / 2**20:.1f} MiB, {len(scan.class_names)} classes"
    )
    print(f"setting:    image_size {size}, batch_size {args.batch_size}, num_workers {workers}")

    with tempfile.TemporaryDirectory(prefix="celldiff-bench-") as cache_dir, warnings.catch_warnings():
        warnings.simplefilter("ignore", CellDataWarning)
        start = time.perf_counter()
        data = build_cache(scan, size, cache_dir, workers=max(workers, 1))
        build_s = time.perf_counter() - start
        count = len(scan.relpaths)
        build_rate = count / build_s

        folder_s = imagefolder_pass(root, list(data.relpaths), size, args.batch_size, workers)
        folder_rate = len(data.relpaths) / folder_s

        # The same two, one process each: per-CPU cost, less sensitive to other load on the machine.
        start = time.perf_counter()
        build_cache(scan, size, Path(cache_dir) / "serial", workers=1)
        serial_build_s = time.perf_counter() - start
        serial_folder_s = imagefolder_pass(root, list(data.relpaths), size, args.batch_size, 0)

        cached = {}
        for loader_workers in dict.fromkeys([workers, 0]):  # also in-process: the cache needs no workers
            module = CellDataModule(
                args.data_dir,
                image_size=size,
                batch_size=args.batch_size,
                num_workers=loader_workers,
                cache_dir=cache_dir,
            )
            module.cached = data  # the cache just built (also when --limit selected a subset)
            module.setup("fit")
            loader = module.train_dataloader()
            epochs = max(3, math.ceil(args.cached_images / (len(loader) * args.batch_size)))
            start = time.perf_counter()
            drawn = sum(len(batch["image"]) for _ in range(epochs) for batch in loader)
            cached[loader_workers] = (epochs, drawn, time.perf_counter() - start)
            del loader  # stop persistent workers before the next measurement

        later_s = None
        if not args.limit:  # a later run: new module, same arguments, the cache exists
            later = CellDataModule(args.data_dir, image_size=size, batch_size=args.batch_size, cache_dir=cache_dir)
            start = time.perf_counter()
            later.prepare_data()
            later.setup("fit")
            later_s = time.perf_counter() - start

    def row(name: str, seconds: float, images: int, rate: float) -> None:
        print(f"  {name:<52} {seconds:8.2f} s {images:8d} img {rate:12,.0f} img/s")

    print("results:")
    row("(a) cache build, cold (decode + sha256 + write)", build_s, count, build_rate)
    row("(b) ImageFolder+Resize+CenterCrop+ToTensor, 1 pass", folder_s, len(data.relpaths), folder_rate)
    row("(a1) cache build, 1 process", serial_build_s, count, count / serial_build_s)
    row(
        "(b1) ImageFolder pass, num_workers=0",
        serial_folder_s,
        len(data.relpaths),
        len(data.relpaths) / serial_folder_s,
    )
    for loader_workers, (epochs, drawn, seconds) in cached.items():
        row(
            f"(c) cached train_dataloader, augment, {loader_workers} workers, {epochs} ep",
            seconds,
            drawn,
            drawn / seconds,
        )
    if later_s is not None:
        print(f"  later setup on a cache hit (scan + stat + mmap + split): {later_s:.3f} s, no image opened")
    epochs, drawn, seconds = cached[workers]
    ratio_c, ratio_a = drawn / seconds / folder_rate, build_rate / folder_rate
    print(
        f"ratios:     (c)/(b) = {ratio_c:,.1f}x with {workers} workers (target >= 50x: {'met' if ratio_c >= 50 else 'MISSED'})"
    )
    if workers:
        best = max(d / s for _, d, s in cached.values()) / folder_rate
        print(f"            (c)/(b) = {best:,.1f}x best of {sorted(cached)} workers")
    print(f"            (a)/(b) = {ratio_a:,.2f}x  (target >= 2x: {'met' if ratio_a >= 2 else 'MISSED'})")
    print(f"            (a1)/(b1) = {serial_folder_s / serial_build_s * count / len(data.relpaths):,.2f}x per CPU")
    print(f"load:       {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1/5/15 min) on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
