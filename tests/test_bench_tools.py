"""bench/trace_gaps.py on a hand-made timeline whose gaps are known; the GPU bench's own check on this CPU."""
import gzip
import json
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import trace_gaps  # noqa: E402


def ev(cat, name, ts, dur, **args):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "args": args}


def test_trace_gaps_splits_idle_time_into_host_late_and_waiting(tmp_path):
    events = [
        ev("cpu_op", "aten::mm", 0, 100), ev("cuda_runtime", "cudaLaunchKernel", 10, 5, correlation=1),
        ev("kernel", "gemm", 20, 50, stream=7, correlation=1),
        # 70 -> 200: the host syncs and allocates, then launches the next kernel late
        ev("cpu_op", "aten::_local_scalar_dense", 75, 100), ev("cuda_runtime", "cudaStreamSynchronize", 120, 50),
        ev("cuda_runtime", "cudaMalloc", 100, 20),
        ev("cpu_op", "aten::linear", 178, 10), ev("cuda_runtime", "cudaLaunchKernel", 180, 5, correlation=2),
        ev("kernel", "norm", 200, 30, stream=7, correlation=2),
        # 230 -> 400: launched early (at 210), but waits for a copy on stream 9
        ev("cuda_runtime", "cudaLaunchKernel", 210, 5, correlation=3), ev("gpu_memcpy", "Memcpy HtoD", 230, 160, stream=9),
        ev("kernel", "gemm", 400, 30, stream=7, correlation=3),
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    a = trace_gaps.analyse(trace_gaps.load(str(path)))
    assert (a["window_ms"], a["busy_ms"], a["idle_ms"], a["compute_stream"]) == (0.43, 0.11, 0.32, 7)
    assert a["gap_ms"] == {"host late": 0.15, "waits on another stream": 0.17} and a["gaps"] == 3
    assert a["other_streams_ms"] == {9: 0.16}
    assert a["host_calls"] == {"cudaMalloc": {"n": 1, "ms": 0.02}, "cudaStreamSynchronize": {"n": 1, "ms": 0.05}}
    first = a["largest"][0]
    assert (first["gap_ms"], first["kind"], first["next"]) == (0.17, "waits on another stream", "gemm")
    second = a["largest"][1]
    assert second["launched_in"] == "aten::linear" and "aten::_local_scalar_dense" in second["host_ops"]
    assert "idle 0.32 ms" in trace_gaps.report(a)


def test_gpu_bench_runs_its_variants_on_the_cpu():
    """SIM=1: bench/throughput.py gpu on a tiny model of the same kind, so a change cannot break the one GPU call
    unseen: our preset (gpu_fast: traced checkpoints) and the best plain-TRL baseline run and end at the same loss."""
    env = {**os.environ, "SIM": "1", "TOKENS": "2000", "WARM": "1", "VARIANTS": "c_ours,b_trl_packed_flex"}
    r = subprocess.run([sys.executable, "bench/throughput.py", "gpu"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = {line.split(":")[0]: line for line in r.stdout.splitlines() if line.startswith(("c_ours", "b_trl"))}
    assert set(results) == {"c_ours", "b_trl_packed_flex"}, r.stdout[-3000:]
    losses = {name: float(line.split("'val_loss': ")[1].split("}")[0]) for name, line in results.items()}
    assert abs(losses["c_ours"] - losses["b_trl_packed_flex"]) < 0.01, losses
