"""Where a profiled GPU step waits: the compute stream's busy and idle time, and its largest gaps with their cause.

    python bench/trace_gaps.py trace_c_ours.json.gz             # the timeline bench/throughput.py writes (PROFILE)

A gap on the compute stream is either the host being late (the next kernel was launched after the gap began:
the host op that launched it and the host ops running in the gap are named) or a wait on another stream (the
kernel was launched before the gap: e.g. an offloaded activation still being copied back). Also the host's
synchronizing and allocator calls (cudaMalloc after an empty_cache, stream/device synchronizations).
"""
from __future__ import annotations

import gzip
import json
import sys
from bisect import bisect_left, bisect_right
from collections import Counter, defaultdict

GPU = ("kernel", "gpu_memcpy", "gpu_memset")
HOST_CALLS = ("cudaMalloc", "cudaFree", "cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
              "cudaMemcpy", "cudaStreamWaitEvent", "cudaHostAlloc")


def load(path: str) -> list:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return [e for e in data.get("traceEvents", data) if e.get("ph") == "X" and "dur" in e]


def analyse(events: list, min_gap_us: float = 20.0, top: int = 12) -> dict:
    gpu = [e for e in events if e.get("cat") in GPU and "stream" in e.get("args", {})]
    host = [e for e in events if e.get("cat") in ("cpu_op", "user_annotation", "python_function")]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in ("cuda_runtime", "cuda_driver") and "correlation" in e.get("args", {})}
    per_stream, kernels = Counter(), Counter()
    for e in gpu:
        per_stream[e["args"]["stream"]] += e["dur"]
        kernels[e["args"]["stream"]] += e["dur"] if e["cat"] == "kernel" else 0
    if not kernels:
        raise ValueError("no GPU kernels in this trace (a CPU run?)")
    stream = kernels.most_common(1)[0][0]  # the one that runs the most kernel time (copies run beside it)
    host.sort(key=lambda h: h["ts"])
    starts = [h["ts"] for h in host]
    work = sorted((e for e in gpu if e["args"]["stream"] == stream), key=lambda e: e["ts"])
    start = min(e["ts"] for e in host + work)
    end = max(e["ts"] + e["dur"] for e in events)
    busy, gaps, cursor = 0.0, [], start
    for e in work:
        if e["ts"] - cursor >= min_gap_us:
            gaps.append((cursor, e["ts"], e))
        busy += max(0.0, e["ts"] + e["dur"] - max(cursor, e["ts"]))
        cursor = max(cursor, e["ts"] + e["dur"])
    kinds, rows = defaultdict(float), []
    for g0, g1, e in gaps:
        launch = launches.get(e["args"].get("correlation"))
        late = launch is not None and launch["ts"] + launch["dur"] > g0
        kind = "host late" if late or launch is None else "waits on another stream"
        kinds[kind] += g1 - g0
        # host ops overlapping the gap that are not much longer than it (not the whole step or layer around it)
        near = host[bisect_left(starts, g0 - 5 * (g1 - g0)):bisect_left(starts, g1)]
        during = Counter(h["name"] for h in near if h["ts"] + h["dur"] > g0 and h["dur"] < 5 * (g1 - g0))
        by = []  # the innermost host op around the launch: the latest one to start that still encloses it
        if launch is not None:
            i = bisect_right(starts, launch["ts"])
            by = [h["name"] for h in reversed(host[max(0, i - 2000):i]) if h["ts"] + h["dur"] >= launch["ts"]][:1]
        rows.append(dict(at_ms=round((g0 - start) / 1e3, 2), gap_ms=round((g1 - g0) / 1e3, 3), kind=kind,
                         next=e["name"][:60], launched_in=by[0] if by else None,
                         host_ops=[n for n, _ in during.most_common(4)]))
    calls = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.get("cat") in ("cuda_runtime", "cuda_driver") and e["name"].startswith(HOST_CALLS):
            calls[e["name"]][0] += 1
            calls[e["name"]][1] += e["dur"]
    return dict(window_ms=round((end - start) / 1e3, 2), compute_stream=stream, busy_ms=round(busy / 1e3, 2),
                idle_ms=round((end - start - busy) / 1e3, 2), gaps=len(gaps), min_gap_us=min_gap_us,
                gap_ms={k: round(v / 1e3, 2) for k, v in kinds.items()},
                other_streams_ms={s: round(t / 1e3, 2) for s, t in per_stream.items() if s != stream},
                host_calls={k: dict(n=n, ms=round(t / 1e3, 2)) for k, (n, t) in sorted(calls.items())},
                largest=sorted(rows, key=lambda r: -r["gap_ms"])[:top])


def report(a: dict) -> str:
    lines = [f"step window {a['window_ms']} ms; compute stream {a['compute_stream']} busy {a['busy_ms']} ms, idle "
             f"{a['idle_ms']} ms ({a['gaps']} gaps of {a['min_gap_us']:g} us or more: "
             + ", ".join(f"{k} {v} ms" for k, v in a["gap_ms"].items())
             + f"; shorter gaps {round(a['idle_ms'] - sum(a['gap_ms'].values()), 2)} ms)",
             "other streams (overlapped): " + ", ".join(f"{s}: {t} ms" for s, t in a["other_streams_ms"].items()),
             "host calls: " + ", ".join(f"{k} x{v['n']} {v['ms']} ms" for k, v in a["host_calls"].items()),
             "largest gaps (ms into the step, length, cause, next kernel, launched in, host ops in the gap):"]
    lines += [f"  {r['at_ms']:>8} {r['gap_ms']:>7}  {r['kind']:<24} {r['next']:<60} {r['launched_in']} {r['host_ops']}"
              for r in a["largest"]]
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        print(f"== {path}")
        try:
            print(report(analyse(load(path))))
        except ValueError as e:
            print(e)
