"""Smoke run of the CPU kernel ledger (bench/bench_kernel_ledger.py --quick): every kernel family
is in the table, every case names the variant its dispatch rule took, forced variants really took
their path (the script checks it through the kernels' profiler labels), and the limits are
measured in the run. Speed is never asserted here."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("conv_pool2d forward", "conv_pool2d backward", "conv_bn_pool2d forward", "conv_bn_pool2d backward",
            "unpool_conv_transpose2d forward", "unpool_conv_transpose2d backward", "conv_transpose_act2d forward",
            "conv_transpose_act2d backward", "batch_norm_act2d forward", "batch_norm_act2d backward", "recon_loss")


def test_kernel_ledger_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_kernel_ledger.py"), "--quick", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "bench_kernel_ledger_quick.json").read_text())
    rows = data["rows"]
    kernels = {r["extra"]["kernel"] for r in rows}
    assert all(any(k.startswith(f) for k in kernels) for f in FAMILIES), kernels
    assert all(r["seconds"] > 0 for r in rows)
    cases = {r["case"] for r in rows}
    for case in cases:
        picks = [r for r in rows if r["case"] == case and r["extra"]["rule"]]
        assert len(picks) == 1, (case, [r["variant"] for r in rows if r["case"] == case])
        assert picks[0]["extra"]["verdict"] and not picks[0]["extra"]["lower_bound"]
    # Competing algorithms are side by side: the encoder forward's three paths on a K >= 64 shape,
    # the encoder backward's sparse kernels (both wgrad forms, each with both dgrad forms) against
    # oneDNN and the GEMM form, the decoder's
    # window-vector kernels against the per-entry ones on a C_out 1 shape.
    variants = {(r["extra"]["kernel"].split(" (")[0], r["extra"]["case"]): set() for r in rows}
    for r in rows:
        variants[(r["extra"]["kernel"].split(" (")[0], r["extra"]["case"])].add(r["variant"])
    assert len(variants[("conv_pool2d forward", "quick 2x8->16 10x9")]) == 3
    assert len(variants[("conv_pool2d backward", "quick 2x8->16 10x9")]) == 7
    # (+ the vendor conv over the unpooled map, which can be forced on any shape)
    assert len(variants[("unpool_conv_transpose2d forward", "quick 2x8->1 8x8")]) == 5
    assert len(variants[("unpool_conv_transpose2d forward", "quick 1x16->24 6x7")]) == 4  # large slab: no window vectors
    # The quick encoder shapes (K = 9, K = 72, channels-last with 8 channels on a 64x64 map) are where
    # the forward's rule (today: direct, Winograd, oneDNN) picks different paths; the ledger reads
    # each pick from the kernels' profiler labels.
    picks = {r["extra"]["case"]: r["variant"] for r in rows
             if r["extra"]["rule"] and r["extra"]["kernel"].startswith("conv_pool2d forward")}
    assert len(picks) == 3 and len(set(picks.values())) >= 2, picks
    md = (tmp_path / "bench_kernel_ledger_quick.md").read_text()
    assert "GEMM peak (the better of torch.mm's sgemm and oneDNN's conv) measured in this run" in md and "% of GEMM peak" in md and "% of copy" in md
    assert (tmp_path / "bench_kernel_ledger_quick.png").exists()
