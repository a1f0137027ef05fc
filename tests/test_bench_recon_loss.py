"""Smoke test: the recon_loss benchmark runs end to end with --quick and writes its tables
(speed is never asserted)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_quick(tmp_path):
    env = dict(os.environ, AEFAST_BACKEND="cpu")
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_recon_loss.py"), "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    payload = json.loads((tmp_path / "bench_recon_loss_quick.json").read_text())
    cases = {r["case"] for r in payload["rows"]}
    assert len(cases) == 2 * 5 * 4  # both shapes, every kind and reduction
    assert {r["variant"] for r in payload["rows"]} == {"eager", "aefast"}
    assert all(r["seconds"] > 0 and r["bytes_moved"] > 0 for r in payload["rows"])
    assert (tmp_path / "bench_recon_loss_quick.md").read_text().count("| mse/mean") == 4
    assert (tmp_path / "bench_recon_loss_quick.png").exists()
    assert "fallbacks: none" in res.stdout
