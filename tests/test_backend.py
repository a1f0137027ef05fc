"""Backend choice, info() and the `aefast info` command."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import aefast
from aefast import backend as B
from aefast import functional as AF


def test_default_is_cpu_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv("AEFAST_BACKEND", raising=False)
    assert aefast.get_backend() is None
    assert B.resolve(torch.device("cpu")) == "cpu"


def test_set_backend_as_context_manager_restores():
    assert aefast.get_backend() is None
    with aefast.set_backend("reference"):
        assert aefast.get_backend() == "reference"
        with aefast.set_backend("cpu"):
            assert aefast.get_backend() == "cpu"
        assert aefast.get_backend() == "reference"
    assert aefast.get_backend() is None


def test_set_backend_plain_call_persists():
    aefast.set_backend("reference")
    try:
        assert aefast.get_backend() == "reference"
    finally:
        aefast.set_backend(None)
    assert aefast.get_backend() is None


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("AEFAST_BACKEND", "reference")
    assert aefast.get_backend() == "reference"
    with aefast.set_backend("cpu"):  # an explicit choice beats the environment
        assert aefast.get_backend() == "cpu"
    monkeypatch.setenv("AEFAST_BACKEND", "fastest")
    with pytest.raises(ValueError, match="unknown backend 'fastest'.*AEFAST_BACKEND"):
        aefast.get_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown backend 'gpu'; choose one of cuda, triton, cpu, reference"):
        aefast.set_backend("gpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_cuda_backend_says_why():
    with pytest.raises(aefast.BackendUnavailableError, match="backend 'cuda' is unavailable: .*"):
        aefast.set_backend("cuda")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_triton_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(aefast.BackendUnavailableError, match="TRITON_INTERPRET=1"):
        aefast.set_backend("triton")


def test_cpu_backend_rejects_other_devices():
    with aefast.set_backend("cpu"):
        with pytest.raises(aefast.BackendUnavailableError, match="runs CPU tensors only"):
            B.resolve(torch.device("meta"))


def test_backend_choice_changes_the_implementation(monkeypatch):
    _, flat = F.max_pool2d(torch.randn(1, 1, 4, 4), 2, return_indices=True)
    calls = []
    real = aefast.reference.functional.flat_to_window
    monkeypatch.setattr(aefast.reference.functional, "flat_to_window",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    AF.flat_to_window(flat, (4, 4), 2)
    assert calls == []  # cpu kernel
    with aefast.set_backend("reference"):
        AF.flat_to_window(flat, (4, 4), 2)
    assert calls == [1]


def test_fallbacks_are_counted_in_info():
    B.reset_fallback_counts()
    B.record_fallback("some_op", "cpu", "unsupported parameter")
    B.record_fallback("some_op", "cpu", "unsupported parameter")
    assert aefast.info()["fallbacks"] == {"some_op[cpu]: unsupported parameter": 2}


def test_info_contents():
    data = aefast.info()
    assert data["version"] == aefast.__version__
    assert data["build"]["torch_version"] == torch.__version__
    assert set(data["backends"]) == set(aefast.BACKENDS)
    assert data["backends"]["cpu"]["usable"] and data["backends"]["reference"]["usable"]
    assert data["build"]["cuda"] == bool(data["cuda_archs"])
    for name, st in data["backends"].items():
        assert st["why"], name


def _run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "aefast", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_cli_info():
    out = _run_cli("info")
    assert out.returncode == 0, out.stderr
    assert f"aefast {aefast.__version__}" in out.stdout
    for name in aefast.BACKENDS:
        assert name in out.stdout
    as_json = json.loads(_run_cli("info", "--json").stdout)
    assert as_json["version"] == aefast.__version__


def test_cli_bad_command_is_clean():
    out = _run_cli("frobnicate")
    assert out.returncode == 2 and "Traceback" not in out.stderr and "invalid choice" in out.stderr


def test_import_error_names_the_rebuild_command(monkeypatch):
    from aefast import _extension, _C

    monkeypatch.setattr(_C, "build_info", lambda: {"torch_version": "0.0.0-other", "cuda": False, "cuda_archs": ""})
    with pytest.raises(ImportError, match=r"(?s)built against torch 0\.0\.0-other.*pip install --no-build-isolation -e \."):
        _extension.load()


def test_cpu_kernels_use_torch_intra_op_threads():
    """Our at::parallel_for loops run on torch's intra-op threads. at::parallel_for is a header
    template: compiled without -fopenmp against an OpenMP torch (CMakeLists.txt) it is a serial
    loop, and every CPU kernel of aefast silently ran on one thread."""
    from aefast import _C

    if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert _C.build_info()["intra_op_parallel"]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _C.parallel_for_threads(64) == 2
        torch.set_num_threads(1)  # the thread count follows torch's setting (one OpenMP runtime)
        assert _C.parallel_for_threads(64) == 1
    finally:
        torch.set_num_threads(before)
    # Our _C needs the soname libgomp.so.1, which the loader resolves to the libgomp.so.1 that
    # libtorch_cpu already loaded (torch/lib): no second copy of that runtime (e.g. the system's)
    # is mapped. (Other packages may vendor theirs under other sonames: scikit-learn does.)
    with open("/proc/self/maps") as f:
        gomps = {line.split()[-1] for line in f if os.path.basename(line.split()[-1]).startswith("libgomp.so")}
    assert len(gomps) <= 1, gomps


def test_default_table_triton_for_conv_families_on_cuda_tensors():
    """One table of defaults: the conv families go to triton on CUDA tensors (when triton is
    installed), the rest to the cuda backend (or the reference without a CUDA build); CPU tensors
    always to cpu. The dispatcher asks per op family, and aefast info prints the table."""
    from aefast._extension import BUILD_INFO

    assert B.family_of("unpool_conv_transpose2d") == "unpool_deconv"
    assert B.family_of("conv_transpose2d") == "unpool_deconv"
    assert B.family_of("conv_pool2d_forward") == "conv_pool"
    assert B.family_of("max_unpool2d") == "pooling"
    assert B.family_of("recon_loss") == "recon_loss"
    compiled = "cuda" if BUILD_INFO["cuda"] else "reference"
    conv = "triton" if B._TRITON_INSTALLED else compiled
    for family in ("conv_pool", "unpool_deconv"):
        assert B._automatic(False, True, family) == conv
        assert B._automatic(True, False, family) == "cpu"
    for family in ("pooling", "recon_loss", None):
        assert B._automatic(False, True, family) == compiled
    from aefast._info import format_info

    table = aefast.info()["default_backends"]
    assert table["table"]["unpool_deconv"] == {"cuda": "triton", "cpu": "cpu"}
    assert "unpool_deconv  triton / cpu" in format_info(aefast.info())
