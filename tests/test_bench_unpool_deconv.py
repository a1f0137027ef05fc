"""Smoke test of bench/bench_unpool_deconv.py --quick (speed is never asserted)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_runs_and_writes_results(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_unpool_deconv.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speedup vs eager" in proc.stdout and "executed / dense" in proc.stdout
    data = json.loads((tmp_path / "bench_unpool_deconv.json").read_text())
    variants = {r["variant"] for r in data["rows"]}
    assert {"eager", "aefast[cpu] flat idx", "aefast[cpu] window idx", "vendor GEMM form (GEMMs alone)"} <= variants
    modes = {r["case"].rsplit(" ", 1)[1] for r in data["rows"]}
    assert modes == {"fwd", "bwd", "full"}
    for r in data["rows"]:
        assert r["seconds"] > 0 and r["peak_bytes"] >= 0
        want = 1.0 if r["variant"] in ("eager", "vendor GEMM form (GEMMs alone)") else 0.25
        assert abs(r["extra"]["macs_vs_dense"] - want) < 1e-9
    assert (tmp_path / "bench_unpool_deconv.md").exists() and (tmp_path / "bench_unpool_deconv.png").exists()
