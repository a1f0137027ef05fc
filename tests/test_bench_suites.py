"""CI-sized smoke runs of the end-to-end benchmarks, so that they never rot (speed is never
asserted here; the figures come from full runs)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, result", [("bench_optimize.py", "optimize_cpu.json"),
                                            ("bench_training.py", "training_cpu.json")])
def test_quick_run_writes_results(tmp_path, script, result):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "speedup vs" in proc.stdout
    data = json.loads((tmp_path / result).read_text())
    assert data["environment"]["torch"] and data["rows"]
    variants = {r["variant"] for r in data["rows"]}
    assert not any(v.endswith("FAILED") for v in variants if not v.startswith("torch.compile")), data["rows"]
    assert all(r["seconds"] > 0 for r in data["rows"] if not r["variant"].endswith("FAILED"))
    for ext in ("md", "png"):
        assert (tmp_path / result.replace(".json", f".{ext}")).exists()
