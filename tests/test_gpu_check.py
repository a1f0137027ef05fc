"""scripts/gpu_check_summary.py's check of a GPU-check summary: CI runs it on the dry run's
summary (.ci/run), so it must reject a summary that lacks a step or where a step failed."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check_summary", ROOT / "scripts" / "gpu_check_summary.py")
summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summary)

TABLE = "| group | variant | median |\n|---|---|---|\n| model W1 | eager | 1.0 |\n"


def _summary(header="# aefast GPU check, DRY RUN on CPU (no GPU): torch 2.13.0, 2026-12-06", statuses=None,
             sections=summary.SECTIONS):
    statuses = statuses or {}
    parts = [header]
    for name in sections:
        parts.append(f"\n## {name}\nstatus: {statuses.get(name, 'ok')}\ntime: 1 s\n")
    return "\n".join(parts) + "\n" + TABLE


def test_a_complete_dry_run_summary_passes():
    assert summary.verify(_summary(), dry_run=True) == []


def test_a_missing_or_misordered_section_fails():
    missing = [s for s in summary.SECTIONS if s != "tests"]
    assert any("sections" in p for p in summary.verify(_summary(sections=missing), dry_run=True))
    swapped = list(summary.SECTIONS)
    swapped[3], swapped[5] = swapped[5], swapped[3]
    assert summary.verify(_summary(sections=swapped), dry_run=True)


def test_a_failed_step_fails_the_dry_run_but_not_a_gpu_summary():
    failed = _summary(statuses={"bench-fp32": "FAILED (rc=4)"})
    assert summary.verify(failed, dry_run=True) == ["section bench-fp32: FAILED (rc=4)"]
    gpu = failed.replace("DRY RUN on CPU (no GPU): torch 2.13.0", "H100, driver 580.1, torch 2.11.0 (CUDA 13.0)")
    assert summary.verify(gpu, dry_run=False) == []  # a GPU run reports its failures; it is still complete


def test_a_section_without_status_and_a_wrong_header_fail():
    text = _summary().replace("## wheels\nstatus: ok", "## wheels\nstatus unknown")
    assert summary.verify(text, dry_run=True) == ["section wheels has no status line"]
    assert summary.verify(_summary(header="# something else"), dry_run=True)
    assert summary.verify(_summary(), dry_run=False)  # a DRY RUN header is no GPU header
