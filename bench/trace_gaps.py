"""Where the GPU's time goes within one profiled step: reads the timeline that `BENCH_PROFILE=1 bench/speed.py`
writes ($OUT/trace_<side>.json.gz, a torch.profiler Chrome trace) and prints the kernels' busy time (over all
streams: a replayed CUDA graph spreads its kernels over many), kernel time by kind, the memsets and the wait
around them, the idle gaps (the largest with the kernels around them), and per twentieth of the step how busy
the kernels and the copies to and from the host were.

    python bench/trace_gaps.py trace_tunelab_qlora32h.json.gz
"""
from __future__ import annotations

import argparse
import gzip
import json
from collections import defaultdict


def load(path: str) -> list[dict]:
    """The trace's GPU events (kernels and copies), each with its stream, sorted by start."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    return sorted(gpu, key=lambda e: e["ts"])


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping (start, end) spans merged."""
    out: list[list[float]] = []
    for s, e in sorted(spans):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def busy_in(spans: list[tuple[float, float]], lo: float, hi: float) -> float:
    return sum(max(0.0, min(e, hi) - max(s, lo)) for s, e in spans)


def copy_kind(e: dict) -> str:
    name = e["name"].lower()
    return "d2h" if "dtoh" in name else "h2d" if "htod" in name else "d2d"


def kind(name: str) -> str:
    """A kernel's kind, from its name."""
    low = name.lower()
    for key, label in (("nvjet", "GEMM (cuBLAS)"), ("gemm", "GEMM (cuBLAS)"), ("splitkreduce", "GEMM (cuBLAS)"),
                       ("sdpa", "attention"), ("cudnn", "attention"), ("flash", "attention"),
                       ("nf4", "NF4 dequantisation"), ("triton", "Triton (compiled)"), ("adam", "optimizer"),
                       ("multi_tensor", "optimizer"), ("copy", "casts and copies"), ("cat", "casts and copies")):
        if key in low:
            return label
    return "other"


def memset_waits(events: list[dict]) -> tuple[int, int, float]:
    """Memsets that sit between two kernels in the timeline (all streams, in time order): how many, how many
    come right before a GEMM, and the microseconds from the end of the kernel before each to the start of the
    kernel after it, summed."""
    ordered = [e for e in events if e["cat"] in ("kernel", "gpu_memset")]
    count = before_gemm = 0
    waited = 0.0
    for prev, cur, nxt in zip(ordered, ordered[1:], ordered[2:]):
        if cur["cat"] != "gpu_memset" or prev["cat"] != "kernel" or nxt["cat"] != "kernel":
            continue
        count += 1
        before_gemm += kind(nxt["name"]).startswith("GEMM")
        waited += max(0.0, nxt["ts"] - (prev["ts"] + prev["dur"]))
    return count, before_gemm, waited


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    events = load(args.trace)
    kernels = [e for e in events if e["cat"] == "kernel"]
    streams = {e["args"].get("stream", -1) for e in kernels}
    start, end = kernels[0]["ts"], max(e["ts"] + e["dur"] for e in kernels)
    busy = union([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    copies = {k: union([(e["ts"], e["ts"] + e["dur"]) for e in events
                        if e["cat"] == "gpu_memcpy" and copy_kind(e) == k]) for k in ("d2h", "h2d")}
    span = end - start
    print(f"{len(kernels)} kernels on {len(streams)} streams, {span / 1e3:.1f} ms from first to last, busy "
          f"{busy_in(busy, start, end) / 1e3:.1f} ms; copies d2h {busy_in(copies['d2h'], start, end) / 1e3:.1f}"
          f" ms, h2d {busy_in(copies['h2d'], start, end) / 1e3:.1f} ms")
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in kernels:
        row = by_kind[kind(e["name"])]
        row[0] += 1
        row[1] += e["dur"]
    print("\n| kernels | count | ms |\n| --- | --- | --- |")
    for label, (n, us) in sorted(by_kind.items(), key=lambda kv: -kv[1][1]):
        print(f"| {label} | {n} | {us / 1e3:.1f} |")
    count, before_gemm, waited = memset_waits(events)
    if count:
        print(f"\nmemsets between kernels: {count} ({before_gemm} right before a GEMM); from the kernel before to "
              f"the kernel after: {waited / 1e3:.1f} ms, {waited / count:.1f} us each")
    gaps = [(s1 - e0, e0) for (_, e0), (s1, _) in zip(busy, busy[1:])]  # (idle us, where it starts)
    buckets = [(0, 5), (5, 20), (20, 100), (100, 1000), (1000, float("inf"))]
    print("idle gaps (us): " + ", ".join(
        f"{lo}-{hi}: {sum(1 for g, _ in gaps if lo <= g < hi)} ({sum(g for g, _ in gaps if lo <= g < hi) / 1e3:.1f} ms)"
        for lo, hi in buckets))
    ends = {e["ts"] + e["dur"]: e for e in kernels}
    starts = {e["ts"]: e for e in kernels}
    print(f"\nlargest {args.top} gaps:\n| at ms | gap us | before | after |\n| --- | --- | --- | --- |")
    for g, at in sorted(gaps, reverse=True)[:args.top]:
        before = ends.get(at, {}).get("name", "?")[:60]
        after = next((starts[t]["name"][:60] for t in sorted(starts) if t >= at + g - 1e-3), "?")
        print(f"| {(at - start) / 1e3:.2f} | {g:.0f} | {before} | {after} |")
    print("\n| twentieth | from ms | compute busy % | d2h busy % | h2d busy % |\n| --- | --- | --- | --- | --- |")
    step = span / 20
    for i in range(20):
        lo, hi = start + i * step, start + (i + 1) * step
        shares = [100 * busy_in(spans, lo, hi) / step for spans in (busy, copies["d2h"], copies["h2d"])]
        print(f"| {i} | {(lo - start) / 1e3:.0f} | " + " | ".join(f"{x:.0f}" for x in shares) + " |")


if __name__ == "__main__":
    main()
