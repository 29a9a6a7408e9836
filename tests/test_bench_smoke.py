"""Smoke test of the benchmark: `python -m bench --quick` runs every code path and writes its report.

No timing is asserted here; timing goals live in the benchmark's own report.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_bench_writes_the_report(tmp_path: Path):
    proc = subprocess.run(
        # One thread: the suite may share the machine, and oversubscribed OpenMP threads stall for seconds.
        [sys.executable, "-m", "bench", "--quick", "--out", str(tmp_path), "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    table = (tmp_path / "results.md").read_text()
    assert proc.stdout == table
    assert "| measurement | ratio | IQR | goal | met? |" in table
    assert "- [ ]" not in table  # every precondition check passed

    data = json.loads((tmp_path / "results.json").read_text())
    assert data["ok"] is True
    assert data["plan"]["name"] == "quick"
    keys = {r["key"] for r in data["results"]}
    assert {"a.mixed", "a.mixed_wide", "a.lora_vs_base", "a.kinds", "c.mixed.B8"} <= keys
    for batch in (1, 8):
        assert {f"b.adapter.B{batch}", f"b.wrapper.B{batch}"} <= keys
        assert {f"b.bottleneck.{kind}.B{batch}" for kind in ("seq_bn", "double_seq_bn", "par_bn")} <= keys
    assert [b["adapter_id"] for b in data["bottlenecks"]] == ["seq_bn", "double_seq_bn", "par_bn"]
    for result in data["results"]:
        assert result["rounds"] >= 1
        assert result["ratio"]["median"] > 0
        assert f"| {result['title']} |" in table


def test_quick_continuous_batching_bench_writes_its_report(tmp_path: Path):
    """Both engines in one real server, every request answered, identical greedy answers from both."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.continuous", "--quick", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (tmp_path / "continuous.md").read_text()
    assert proc.stdout == table
    assert "| continuous |" in table and "| request-level |" in table
    data = json.loads((tmp_path / "continuous.json").read_text())
    assert data["ok"] is True
    runs = data["runs"]
    assert len(runs["generate_stream"]["outcomes"]) == len(runs["generate_stream_request"]["outcomes"]) == 16
    texts = [[o["text"] for o in run["outcomes"]] for run in runs.values()]
    assert texts[0] == texts[1] and all(t is not None for t in texts[0])


def test_quick_cache_bench_loads_adapters_on_demand_and_writes_its_report(tmp_path: Path):
    """`python -m bench.adapter_cache --quick`: a store of 120 adapters, 20 in use, a device budget of a third
    of them; every request answered (the bench raises on any failure) and the counters consistent."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.adapter_cache", "--quick", "--out", str(tmp_path), "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (tmp_path / "adapter_cache.md").read_text()
    assert proc.stdout.strip() == table.strip()
    data = json.loads((tmp_path / "adapter_cache.json").read_text())
    assert (data["store_size"], data["in_use"]) == (120, 20)
    assert len(data["cold_ms"]) == len(data["warm_ms"]) >= 1
    assert 0 < data["loads"] < data["requests"] and 0 < data["hit_rate"] < 1  # misses, and hits
    assert data["scale_ratio"] > 0 and data["small_device_ratio"] > 0
    assert "| cold adapter: first request / warm request" in table


def test_quick_quantized_bench_measures_every_load_and_writes_its_report(tmp_path: Path):
    """`python -m bench.quantized --quick`: fp32, bf16, int8 and nf4 loads of the small bench model, their
    bytes (the quantized ones really smaller), decode steps and one linear layer timed side by side."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.quantized", "--quick", "--out", str(tmp_path), "--threads", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    table = (tmp_path / "quantized.md").read_text()
    assert proc.stdout.strip() == table.strip()
    data = json.loads((tmp_path / "quantized.json").read_text())
    sizes = {name: b["quantized"] + b["full"] for name, b in data["bytes"].items()}
    assert sizes["nf4"] < sizes["int8"] < sizes["bf16"] < sizes["fp32"]
    assert data["bytes"]["bf16"]["quantized"] == 0 and data["bytes"]["nf4"]["quantized"] > 0
    for key in ("B1", "B8"):
        assert set(data["decode"][key]) == {"fp32", "bf16", "int8", "nf4"}
        assert all(row["median_ms"] > 0 for row in data["decode"][key].values())
    assert {"T1", "T8"} <= set(data["large"])
    assert data["budget"]["llama7b_computed"]["adapters"]["nf4"] > 0


def _gpu_check(device: str, out: Path) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "bench.gpu_check", "--device", device, "--quick", "--out", str(out)]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_gpu_check_bench_runs_on_the_cpu_and_refuses_a_missing_gpu(tmp_path: Path):
    """`python -m bench.gpu_check` (make gpu-check's bench) on the CPU: both rounds measured; asking for CUDA
    where torch sees none fails with the reason instead of a traceback."""
    proc = _gpu_check("cpu", tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "mixed / 1 adapter:" in proc.stdout and "8 adapters mixed" in proc.stdout
    import torch

    if not torch.cuda.is_available():
        missing = _gpu_check("cuda", tmp_path)
        assert missing.returncode == 2 and "no CUDA GPU" in missing.stderr
