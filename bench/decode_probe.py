"""Where a decode step's time goes, on the GPU: a probe for the sampler's remaining gaps (issue 4).

    PYTHONPATH=. python3 bench/decode_probe.py [--out DIR] [--skip-8b]

(1) GEMV at M=1 for the 1B / 8B projection shapes: cuBLAS (F.linear) vs our Triton GEMV (kernels/_gemv_triton.py)
    over a few block shapes, weights rotated so L2 holds none of them (as in a real forward), checked against
    float32; GB/s against the 2.9 TB/s roofline.
(2) The 1B batch-1 asynchronous decode step under the profiler: GPU busy time per step, kernels outside the
    captured forward, and the idle gaps between kernels.
(3) Llama-3.1-8B, 256 requests 128/128: time in steps that prefill vs pure decode steps, prefill TFLOP/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import Future

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
from sampling_speed import build_ours, hf_dict, make_sampler, prompts  # noqa: E402

from tinkerbell.engine.types import SampleJob  # noqa: E402

SHAPES = {
    "1B qkv": (3072, 2048), "1B o": (2048, 2048), "1B gate_up": (16384, 2048), "1B down": (2048, 8192),
    "1B lm_head": (128256, 2048),
    "8B qkv": (6144, 4096), "8B o": (4096, 4096), "8B gate_up": (28672, 4096), "8B down": (4096, 14336),
    "8B lm_head": (128256, 4096),
}


def timed_graph(fn, reps: int = 20) -> float:
    """Median µs of one call, from CUDA-graph replays of `reps` calls (launch gaps as in the decode graph)."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(reps):
            fn(i)
    times = []
    for _ in range(7):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) * 1000 / reps)
    return sorted(times)[len(times) // 2]


def gemv_table() -> None:
    from tinkerbell.engine.kernels import _gemv_triton as gt

    print("\n(1) GEMV, M=1, bf16, weights rotated past L2", flush=True)
    print(f"{'shape':14} {'n x k':>14} {'cuBLAS us':>10} {'GB/s':>6} {'triton us':>10} {'GB/s':>6} {'cfg':>18} "
          f"{'rel err':>8}")
    for name, (n, k) in SHAPES.items():
        copies = max(2, min(8, int(200e6 // (n * k * 2))))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        ref = (x.float() @ ws[0].float().t())
        nbytes = n * k * 2
        t_cublas = timed_graph(lambda i=0: F.linear(x, ws[i % copies]))
        best = None
        cands = {gt.config(n, k)}
        for bn in (4, 8, 16, 32, 64):
            for bk in (256, 512, 1024):
                for stages in (2, 3, 4):
                    if bk <= k:
                        cands.add((bn, bk, 4, stages))
        for cfg in sorted(cands):
            try:
                t = timed_graph(lambda i=0, c=cfg: gt.launch(x, ws[i % copies], cfg=c))
            except Exception as e:  # noqa: BLE001 - a config that does not compile is skipped
                print("  skip", cfg, repr(e)[:80])
                continue
            if best is None or t < best[0]:
                best = (t, cfg)
        y = gt.launch(x, ws[0], cfg=best[1])
        err = ((y.float() - ref).norm() / ref.norm()).item()
        t_def = timed_graph(lambda i=0: gt.launch(x, ws[i % copies]))
        print(f"{name:14} {n:>6} x {k:<6} {t_cublas:10.2f} {nbytes / t_cublas / 1e3:6.0f} {best[0]:10.2f} "
              f"{nbytes / best[0] / 1e3:6.0f} {str(best[1]):>18} {err:8.1e}  default cfg {t_def:.2f} us",
              flush=True)


def drive_timed(sampler, jobs):
    futs = []
    for j in jobs:
        f = Future()
        sampler.add_request(j, f)
        futs.append(f)
    torch.cuda.synchronize()
    steps = []
    t0 = time.perf_counter()
    while sampler.has_work():
        c0 = sampler.stats()["tokens_computed"] - sampler.stats()["tokens_generated"]
        a = time.perf_counter()
        sampler.step()
        b = time.perf_counter()
        c1 = sampler.stats()["tokens_computed"] - sampler.stats()["tokens_generated"]
        steps.append((b - a, c1 - c0))
    return time.perf_counter() - t0, steps


def step_profile(out: str | None) -> None:
    from torch.profiler import ProfilerActivity, profile

    print("\n(2) 1B batch-1 async decode step under the profiler", flush=True)
    model = build_ours(hf_dict("Llama-3.2-1B"), torch.bfloat16)
    cfg = model.cfg
    sampler = make_sampler(model, torch.bfloat16, fast=True, num_blocks=2000)
    p1 = prompts(1, 128, cfg.vocab_size, 1)[0]
    job = lambda n: SampleJob(prompt=p1, max_tokens=n, temperature=1.0, seed=0, stop_at_eos=False)  # noqa: E731
    drive_timed(sampler, [job(64)])
    for _ in range(3):
        sampler.blocks.reset()
        total, steps = drive_timed(sampler, [job(512)])
        dec = sorted(t for t, _ in steps[5:])
        print(f"512 tokens: {511 / (total - steps[0][0]):.0f} tok/s decode; "
              f"step median {dec[len(dec) // 2] * 1e3:.3f} ms", flush=True)
    sampler.blocks.reset()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        drive_timed(sampler, [job(64)])
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    evs.sort(key=lambda e: e.time_range.start)
    evs = evs[len(evs) // 3:]  # steady state
    span = evs[-1].time_range.end - evs[0].time_range.start
    busy = sum(e.time_range.end - e.time_range.start for e in evs)
    from collections import Counter

    names = Counter()
    gaps = Counter()
    for a, b in zip(evs, evs[1:]):
        g = b.time_range.start - a.time_range.end
        if g > 3:
            gaps[(a.name[:40], b.name[:40])] += g
    for e in evs:
        names[e.name[:70]] += e.time_range.end - e.time_range.start
    steps = 40
    print(f"steady state: {len(evs)} GPU events over {span / 1e3:.2f} ms, busy {busy / 1e3:.2f} ms "
          f"({busy / span:.0%}); per step ≈ {span / steps:.0f} us span (approx {steps} steps)")
    print("top kernels by total time (us):")
    for n, t in names.most_common(22):
        print(f"  {t:9.0f}  {n}")
    print("largest idle gaps (sum us, after -> before):")
    for (a, b), g in gaps.most_common(10):
        print(f"  {g:8.0f}  {a} -> {b}")
    if out:
        prof.export_chrome_trace(os.path.join(out, "b1_async_trace.json"))
    del sampler, model
    torch.cuda.empty_cache()


def _sampler_8b_256():
    """A warm sampler over random Llama-3.1-8B weights and the 256-request 128/128 workload's jobs (`mk(new)`)."""
    model = build_ours(hf_dict("Llama-3.1-8B"), torch.bfloat16)
    sampler = make_sampler(model, torch.bfloat16, fast=True, num_blocks=256 * 256 // 16 + 600)
    ps = prompts(256, 128, model.cfg.vocab_size, 2)
    mk = lambda new: [SampleJob(prompt=p, max_tokens=new, temperature=1.0, seed=i, stop_at_eos=False)  # noqa: E731
                      for i, p in enumerate(ps)]
    drive_timed(sampler, mk(4))
    return model, sampler, mk


def phases_8b() -> None:
    print("\n(3) Llama-3.1-8B, 256 requests 128/128: prefill vs decode steps", flush=True)
    model, sampler, mk = _sampler_8b_256()
    cfg = model.cfg
    for run in range(2):
        sampler.blocks.reset()
        total, steps = drive_timed(sampler, mk(128))
        pre = [(t, n) for t, n in steps if n > 0]
        dec = [t for t, n in steps if n == 0]
        pt = sum(t for t, _ in pre)
        ptok = sum(n for _, n in pre)
        params = sum(p.numel() for p in model.parameters()) - cfg.vocab_size * cfg.hidden_size
        print(f"run {run}: {256 * 128 / total:,.0f} output tok/s in {total:.3f} s; {len(pre)} prefill steps "
              f"{pt:.3f} s ({ptok} prompt tokens, ≈{2 * params * ptok / pt / 1e12:.0f} TFLOP/s incl. their decode "
              f"rows); {len(dec)} decode steps {sum(dec):.3f} s (median {sorted(dec)[len(dec) // 2] * 1e3:.2f} ms)")
        print("   first 12 steps (ms, prompt tokens):",
              " ".join(f"{t * 1e3:.1f}/{n}" for t, n in steps[:12]))
    st = sampler.stats()
    print("   stats:", {k: st[k] for k in st if "async" in k})


def kernel_breakdown(fn, steps: int, label: str, top: int = 16) -> None:
    """GPU kernel time per step by kernel name, under the profiler (`fn` runs `steps` steps)."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    names: Counter = Counter()
    for e in evs:
        names[e.name[:90]] += e.time_range.end - e.time_range.start
    total = sum(names.values())
    print(f"{label}: {total / steps / 1e3:.3f} ms of kernels per step")
    for n, t in names.most_common(top):
        print(f"  {t / steps:9.1f} us  {n}")


def decode_8b_256() -> None:
    """(4) one 8B decode step at batch 256 with real contexts (128..256 keys), by kernel; GEMMs at M=256."""
    print("\n(4) Llama-3.1-8B decode at batch 256, real contexts", flush=True)
    model, sampler, mk = _sampler_8b_256()
    sampler.blocks.reset()
    futs = []
    for j in mk(128):
        f = Future()
        sampler.add_request(j, f)
        futs.append(f)
    n = 0
    while sampler.has_work():
        sampler.step()
        n += 1
        if n == 60:  # mid-decode: contexts ≈ 190
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                sampler.step()
            torch.cuda.synchronize()
            print(f"10 async steps mid-decode: {(time.perf_counter() - t0) / 10 * 1e3:.2f} ms/step")
            kernel_breakdown(lambda: [sampler.step() for _ in range(5)], 5, "8B b256 async step")
    for (m, k, nn) in ((256, 4096, 6144), (256, 4096, 4096), (256, 4096, 28672), (256, 14336, 4096),
                       (256, 4096, 128256)):
        copies = max(2, min(6, int(400e6 // (nn * k * 2))))
        ws = [torch.randn(nn, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        t = timed_graph(lambda i=0: F.linear(x, ws[i % copies]))
        print(f"GEMM M={m} K={k} N={nn}: {t:8.1f} us  {2 * m * k * nn / t / 1e6:5.0f} TFLOP/s  "
              f"{nn * k * 2 / t / 1e3:5.0f} GB/s")
    del sampler, model
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-8b", action="store_true")
    ap.add_argument("--only", default="123")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__)
    if "1" in args.only:
        gemv_table()
    if "2" in args.only:
        step_profile(args.out)
    if "3" in args.only and not args.skip_8b:
        phases_8b()
    if "4" in args.only and not args.skip_8b:
        decode_8b_256()


if __name__ == "__main__":
    main()
