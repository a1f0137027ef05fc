"""CI-sized smoke runs of the pytest-benchmark suite (bench/suite), so that it never rots: every
case of its quick mode (tiny shapes, one timed round) must produce a result row, and a
torch.compile that fails must show as a FAILED row. Speed is never asserted here.

torch.compile runs with the aot_eager backend here (dynamo capture plus AOT autograd, no
inductor code generation: seconds instead of minutes on 2 cores); the full run uses inductor.
One intra-op thread: on a loaded 2-core machine OpenMP barriers otherwise stall for whole
scheduler slices and the smoke run takes 3-4 times as long.
"""
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = {"conv_pool", "unpool_deconv", "recon_loss", "model"}
MODELS = {"ConvAutoencoder", "ConvDenoisingAutoencoder", "SegNetAutoencoder", "ConvVAE"}


def _run_suite(tmp_path, *args, env_extra=None):
    # Not the xdist worker's variables: pytest-benchmark would take the child for a worker and
    # disable itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.update(OMP_NUM_THREADS="1", **(env_extra or {}))
    env.pop("AEFAST_BENCH_OUT", None)
    cmd = [sys.executable, "-m", "pytest", "bench/suite", "--quick", "--rounds", "1",
           "--compile-backend", "aot_eager", "--bench-out", str(tmp_path), "-q", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def _results(tmp_path):
    lines = [json.loads(line) for line in (tmp_path / "suite_cpu_fp32_quick.jsonl").read_text().splitlines()]
    env = next(item["environment"] for item in lines if "environment" in item)
    collected = next(item["collected"] for item in lines if "collected" in item)
    rows = [item for item in lines if "group" in item]
    return env, [tuple(c) for c in collected], rows


def test_quick_suite_every_case_has_a_result(tmp_path):
    proc = _run_suite(tmp_path, "--benchmark-json", str(tmp_path / "bench.json"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    env, collected, rows = _results(tmp_path)
    assert env["torch"] and env["date"] and env["device"] == "cpu"

    # every collected case produced exactly one row, timed, with its figures
    assert len(collected) == len(set(collected)) == len(rows)
    assert {(r["group"], r["variant"]) for r in rows} == set(collected)
    for r in rows:
        assert r["status"] == "ok", r
        assert r["median_s"] > 0 and math.isfinite(r["median_s"]) and r["rounds"] == 1, r
        assert r["peak_bytes"] >= 0 and r["gflops"] >= 0 and r["gbps"] >= 0, r
        assert (r["flops"] > 0) != (r["family"] == "recon_loss") and (r["bytes"] > 0) == (r["family"] == "recon_loss")

    # the suite covers the kernel families and the four models, and every group puts aefast,
    # eager and torch.compile side by side
    assert {r["family"] for r in rows} == FAMILIES
    assert {r["model"] for r in rows if r["family"] == "model"} == MODELS
    modes = {r["family"]: set() for r in rows}
    for r in rows:
        modes[r["family"]].add(r["mode"])
    assert modes == {"conv_pool": {"fwd", "bwd", "full"}, "unpool_deconv": {"fwd", "bwd", "full"},
                     "recon_loss": {"full"}, "model": {"train step", "inference"}}
    groups = {}
    for r in rows:
        groups.setdefault(r["group"], set()).add(r["variant"])
    for group, variants in groups.items():
        assert {"eager", "torch.compile"} < variants and any(v.startswith("aefast") for v in variants), group
    assert len([g for g in groups if g.startswith("recon_loss")]) == 5 * 4  # every kind and reduction

    # pytest-benchmark's own JSON: one benchmark per case, grouped by case, with the extra figures
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert len(bench["benchmarks"]) == len(rows)
    assert bench["machine_info"]["aefast"]["torch"] == env["torch"]
    for b in bench["benchmarks"]:
        assert b["group"] and {"gflops", "gbps", "peak_mib", "variant"} <= set(b["extra_info"]), b
    md = (tmp_path / "suite_cpu_fp32_quick.md").read_text()
    assert "speedup vs eager" in md and f"{len(rows)} timed, 0 failed." in md


def test_quick_suite_reports_a_compile_failure_as_a_failure(tmp_path):
    # A dynamo backend that always raises, registered by a plugin module: the torch.compile row
    # must fail (not skip) with the reason, and the other variants of the group still run.
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "broken_backend.py").write_text(textwrap.dedent("""
        from torch._dynamo import register_backend

        @register_backend
        def aefast_smoke_broken(gm, example_inputs):
            raise RuntimeError("deliberately broken backend")
    """))
    out = tmp_path / "out"
    pythonpath = os.pathsep.join(filter(None, [str(tmp_path / "plugin"), os.environ.get("PYTHONPATH")]))
    proc = _run_suite(out, "-p", "broken_backend", "--compile-backend", "aefast_smoke_broken",
                      "-k", "conv_pool_N4 and fwd", env_extra={"PYTHONPATH": pythonpath})
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 failed, 2 passed" in proc.stdout and "skipped" not in proc.stdout
    _, collected, rows = _results(out)
    status = {r["variant"]: r for r in rows}
    assert len(collected) == len(rows) == 3 and set(status) == {"aefast-cpu", "eager", "torch.compile"}
    assert status["aefast-cpu"]["status"] == status["eager"]["status"] == "ok"
    failed = status["torch.compile"]
    assert failed["status"] == "FAILED"
    assert "torch.compile" in failed["error"] and "deliberately broken backend" in failed["error"], failed
    md = (out / "suite_cpu_fp32_quick.md").read_text()
    assert "2 timed, 1 failed." in md and "| FAILED |" in md and "deliberately broken backend" in md
