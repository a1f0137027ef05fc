"""Smoke test: the encoder benchmark runs end to end in --quick mode and writes its table.
(Speed is never asserted here; the script itself checks every variant against eager.)"""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_conv_pool_quick(tmp_path):
    env = dict(os.environ, AEFAST_BENCH_OUT=str(tmp_path))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_conv_pool.py"), "--quick"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "speedup vs eager" in proc.stdout
    data = json.loads((tmp_path / "bench_conv_pool_quick.json").read_text())
    variants = {r["variant"] for r in data["rows"]}
    modes = {r["case"].rsplit(" ", 1)[1] for r in data["rows"]}
    assert {"eager", "aefast-cpu"} <= variants and modes == {"fwd", "bwd", "full"}
    assert all(r["seconds"] > 0 and r["peak_bytes"] >= 0 for r in data["rows"])
    assert (tmp_path / "bench_conv_pool_quick.md").exists() and (tmp_path / "bench_conv_pool_quick.png").exists()
