#!/usr/bin/env python
"""All-reduce bandwidth between the GPUs of this host, as tensor parallelism uses it (NCCL, one process per GPU).

For each message size: the median time of an in-place sum all-reduce over every visible GPU, its algorithm
bandwidth (bytes / time) and bus bandwidth (algorithm × 2(n-1)/n, the figure comparable to the link's rating),
plus the sizes a TP decode step actually sends (one hidden-state row per sequence, twice per layer). Checks the
sum is right. Issue 8 uses it to explain the gap between the measured TP 2 speed-up and 2x.

    python3 bench/allreduce_bw.py                  # every visible GPU (needs 2+)
    python3 bench/allreduce_bw.py --device cpu     # gloo, 2 processes: a smoke run of the script itself
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES_MIB = (0.0078125, 0.0625, 0.5, 4, 32, 256)  # 8 KiB (a batch-1 hidden row of an 8B model is 8 KiB in bf16) .. 256 MiB


def _rank(rank: int, world: int, port: int, device: str, out: "mp.Queue") -> None:
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    dev = torch.device("cuda", rank) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    rows = []
    for mib in SIZES_MIB:
        n = max(1, int(mib * 2**20) // torch.finfo(dtype).bits * 8)
        x = torch.full((n,), float(rank + 1), dtype=dtype, device=dev)
        for _ in range(3):  # warm-up (communicator set-up, first-use allocations)
            dist.all_reduce(x)
        x.fill_(float(rank + 1))
        dist.all_reduce(x)
        ok = bool((x == world * (world + 1) / 2).all())
        times = []
        for _ in range(10 if mib < 64 else 4):
            if device == "cuda":
                torch.cuda.synchronize(dev)
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            if device == "cuda":
                torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
        t = statistics.median(times)
        nbytes = n * x.element_size()
        rows.append((nbytes, t, nbytes / t, nbytes / t * 2 * (world - 1) / world, ok))
    if rank == 0:
        out.put(rows)
    dist.destroy_process_group()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--world", type=int, help="ranks (default: every visible GPU; 2 on CPU)")
    args = ap.parse_args()
    world = args.world or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if world < 2:
        sys.exit("needs 2+ GPUs (or --device cpu)")
    from tinkerbell.engine.tp.launch import free_port

    port = free_port()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, port, args.device, out)) for r in range(world)]
    for p in procs:
        p.start()
    rows = out.get(timeout=600)
    for p in procs:
        p.join(timeout=60)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU (gloo)"
    print(f"all-reduce (sum, in place) over {world} x {name}, {os.environ.get('NCCL_ALGO', 'default')} algorithm\n")
    print("| message | time | algorithm bandwidth | bus bandwidth | sum correct |\n|---|---|---|---|---|")
    for nbytes, t, alg, bus, ok in rows:
        size = f"{nbytes / 2**10:,.0f} KiB" if nbytes < 2**20 else f"{nbytes / 2**20:,.0f} MiB"
        print(f"| {size} | {t * 1e6:,.1f} µs | {alg / 1e9:,.2f} GB/s | {bus / 1e9:,.2f} GB/s | {'yes' if ok else 'NO'} |")
    return 0 if all(r[4] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
