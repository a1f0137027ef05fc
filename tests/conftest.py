"""Backend parametrization shared by every test file.

The Triton backend runs CPU tensors under the interpreter (TRITON_INTERPRET=1), set here
before anything imports triton, unless a GPU is present (then Triton compiles for it).
"""
import contextlib
import os

import pytest
import torch
from hypothesis import settings

# AEFAST_HYPOTHESIS_PROFILE=ci (.ci/run): every CI run draws the same fuzz examples. Random draws would
# launch new Triton specializations in each run, which the AOT gate then compiles cold (~400 compiles,
# ~2 min on 2 cores), and a failure would depend on the run. Without it (./dev test) each run draws anew.
settings.register_profile("ci", derandomize=True, database=None)
settings.load_profile(os.environ.get("AEFAST_HYPOTHESIS_PROFILE", "default"))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import aefast  # noqa: E402
from aefast.triton import _specs as _triton_specs  # noqa: E402

# AEFAST_RECORD_TRITON_SPECS=path: log every Triton launch's specialization for
# scripts/check_triton_aot.py (see aefast/triton/_specs.py).
_triton_specs.install_from_env()
from aefast import backend as _backend  # noqa: E402

HAS_CUDA_BACKEND = _backend.availability()["cuda"][0]

# Under pytest-xdist (`./dev test` runs two workers) each worker gets its share of the cores,
# so the workers do not oversubscribe them. Tests that exercise thread counts set their own.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def backend_device(name: str) -> str:
    """The device a backend's tests put their tensors on."""
    if name == "cuda" or (name == "triton" and torch.cuda.is_available()):
        return "cuda"
    return "cpu"


def _backend_marks(name):
    if name == "cuda":
        return [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA_BACKEND, reason="no CUDA backend here")]
    if name == "triton":
        marks = [pytest.mark.gpu_triton] if torch.cuda.is_available() else []
        ok, why = _backend.availability()["triton"]
        return marks + [pytest.mark.skipif(not ok, reason=why)]
    return []


def _backend_params(names):
    return [pytest.param(name, marks=_backend_marks(name), id=name) for name in names]


ALL_BACKENDS = _backend_params(["cpu", "triton", "reference", "cuda"])
KERNEL_BACKENDS = _backend_params(["cpu", "triton", "cuda"])

# The Triton interpreter runs a kernel as numpy, one program at a time: a case costs it seconds where the
# other backends take milliseconds.
TRITON_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def backend_grid(cases, interpreted_cases, ids, backends=("cpu", "triton", "reference", "cuda")):
    """Rows for ``@pytest.mark.parametrize("backend,<case fields>", ..., indirect=["backend"])`` (the
    `backend` fixture then sets each row's backend): every backend runs every case of the grid, except
    the Triton interpreter, which runs ``interpreted_cases``, a covering subset (each value of each
    field still meets each value of the others that matters, and every kernel specialization the full
    grid launches is still launched, so the Triton AOT gate compiles the same set). On a GPU, Triton
    runs the whole grid. ids(case) names a case."""
    rows = []
    for name in backends:
        for case in interpreted_cases if name == "triton" and TRITON_INTERPRETED else cases:
            rows.append(pytest.param(name, *case, marks=_backend_marks(name), id=f"{name}-{ids(case)}"))
    return rows


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """Runs the test once per backend, with that backend forced; yields its name."""
    with aefast.set_backend(request.param):
        yield request.param


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    with aefast.set_backend(request.param):
        yield request.param


@pytest.fixture
def device(backend):
    return backend_device(backend)


@pytest.fixture(autouse=True)
def _fresh_fallback_counts():
    _backend.reset_fallback_counts()
    yield


@pytest.fixture(autouse=True)
def _no_tf32_on_gpu(request):
    """fp32 on a GPU means fp32 in these tests. cuDNN runs fp32 convolutions in TF32 by default
    (torch.backends.cudnn.allow_tf32, ~1e-3 relative), and cuBLAS matmuls may too, which would
    make eager's fp32 results -- the reference the CUDA and GPU-Triton tests compare with at 1e-5
    and with exact indices -- wrong by far more than the tolerance. So TF32 is off for every
    cuda / gpu_triton test; the TF32 behaviour has its own tests (tests/test_tf32.py, marked tf32),
    which keep it on and state tolerances derived from its 10-bit mantissa."""
    node = request.node
    gpu = node.get_closest_marker("cuda") is not None or node.get_closest_marker("gpu_triton") is not None
    if not (gpu and torch.cuda.is_available()) or node.get_closest_marker("tf32") is not None:
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# Tolerances per dtype for values computed in a different order than the reference
# (fp32 accumulation in every case).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


_FLAGS = _cpu_flags()
# The SIMD variants of the CPU kernels (aefast/cpu_isa.h), for tests that set AEFAST_CPU_ISA to hold
# each to the spec; the ones this CPU lacks are skipped.
CPU_ISAS = [
    pytest.param("generic", id="generic"),
    pytest.param("avx2", id="avx2", marks=pytest.mark.skipif(not {"avx2", "fma"} <= _FLAGS, reason="no AVX2/FMA")),
    pytest.param("avx512", id="avx512", marks=pytest.mark.skipif(
        not {"avx512f", "avx512vl", "avx512bw", "avx512dq"} <= _FLAGS, reason="no AVX-512")),
]


def formula_path(fn):
    """Run ``fn`` with the registered (Python) autograd formulas: the C++ eager autograd entries
    (csrc/*_autograd.cpp) serve only plain eager calls, and are turned off here."""
    from aefast.ops import _registry

    original = _registry.eager_autograd_entry_serves
    _registry.eager_autograd_entry_serves = lambda *tensors: False
    try:
        return fn()
    finally:
        _registry.eager_autograd_entry_serves = original


@pytest.fixture
def index_checks(monkeypatch):
    """Counts the one-pass index checks (aefast::first_bad_unpool_index) that run."""
    from aefast.ops import unpool_deconv as unpool_ops

    calls = []
    real = unpool_ops.first_bad_index

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(unpool_ops, "first_bad_index", counted)
    return calls


@contextlib.contextmanager
def aefast_strides_cross_checked():
    """torch's CrossRefFakeMode over the aefast ops only: each aefast op of the block also runs on
    fake tensors and its output strides must equal the kernel's (Inductor asserts them). Yields the
    list of the aefast op names it checked."""
    from torch._subclasses.fake_utils import CrossRefFakeMode

    checked = []

    def aefast_only(func):
        if func.namespace != "aefast":
            return True
        checked.append(func.name())
        return False

    with CrossRefFakeMode(ignore_op_fn=aefast_only, check_strides=True, only_check_ops_with_meta=False):
        yield checked
