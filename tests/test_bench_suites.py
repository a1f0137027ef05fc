"""CI-sized smoke runs of the end-to-end benchmarks, so that they never rot (speed is never
asserted here; the figures come from full runs)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script, result", [("bench_optimize.py", "optimize_cpu.json"),
                                            ("bench_optimize_architectures.py", "optimize_architectures_cpu.json"),
                                            ("bench_conv_bn_pool.py", "bench_conv_bn_pool_quick.json"),
                                            ("bench_conv_transpose_act.py", "bench_conv_transpose_act_quick.json"),
                                            ("bench_batch_norm_act.py", "bench_batch_norm_act_quick.json"),
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
    if script == "bench_optimize_architectures.py":
        # every architecture, its three variants (eager, eager in channels_last, optimized), with its
        # fused-site accounting and the overall fraction
        sys.path.insert(0, str(ROOT / "bench"))
        import architectures

        cases = {r["case"].split(" ", 1)[0] for r in data["rows"]}
        assert cases == set(architectures.ARCHITECTURES)
        assert len(data["rows"]) == 3 * len(cases)
        assert {r["variant"] for r in data["rows"]} == {"original (eager)", "original, channels_last (eager)",
                                                     "aefast.optimize"}
        assert all(set(r["extra"]["site_counts"]) == set(architectures.SITE_KINDS) for r in data["rows"])
        assert "sites fused in training mode, all architectures:" in proc.stdout
    if script == "bench_training.py":
        # The per-kernel breakdown of the aefast and the eager training step, in both files.
        md = (tmp_path / "training_cpu.md").read_text()
        assert "## Per-kernel breakdown of the training step" in md and "aefast::conv_pool2d_forward" in md
        assert "GB/s" not in md.split("## Per-kernel")[0]  # no column of zeros in the step rows
        breakdowns = {b["variant"]: b for b in data["breakdowns"]}
        assert set(breakdowns) == {"aefast", "eager"}
        for b in breakdowns.values():
            modelled = [r for r in b["rows"] if r["modelled"] and r["flops"] > 0]
            assert modelled and all(r["gflops"] > 0 and r["bytes"] > 0 and r["binds"] in ("compute", "memory")
                                    for r in modelled)
        ops = {r["op"] for r in breakdowns["aefast"]["rows"]}
        assert {"aefast::conv_pool2d_forward", "aefast::unpool_conv_transpose2d_backward"} <= ops
        assert "aten::convolution_backward" in {r["op"] for r in breakdowns["eager"]["rows"]}


def test_every_bench_suite_has_a_script():
    from aefast.cli import BENCH_SUITES

    assert all((ROOT / "bench" / f"bench_{suite}.py").exists() for suite in BENCH_SUITES)
