"""Recording the Triton kernel specializations that a run launches, for the ahead-of-time check.

With AEFAST_RECORD_TRITON_SPECS=path set before the first launch (tests/conftest.py calls
install_from_env()), every launch under TRITON_INTERPRET=1 appends one JSON line to path:

    {"kernel": "aefast.triton.conv_pool._conv_pool_fwd_kernel",
     "args": {"x_ptr": "*fp32", "M": "i32", "nlevel": "fp32", ...},       # Triton signature types
     "constexprs": {"KH": 3, "ACC": {"tl_dtype": "fp32"}, "PRECISION": "ieee", ...},
     "options": {"num_warps": 4, "num_stages": 3}}                      # the autotune config, if any

scripts/check_triton_aot.py reads the file, dedups it and compiles each specialization for sm_80
and sm_90 (an autotuned kernel: each of its module's GPU_CONFIGS instead of the interpreter's).

Several processes may record into one file at once (pytest-xdist workers, each importing
tests/conftest.py): each record is one os.write() of one whole line to a descriptor opened with
O_APPEND, which Linux performs as one atomic append on a local file, so lines never interleave.
Each process writes a given record once (a set of the lines it wrote), so the file holds at most
one copy per worker of each specialization, not one per launch.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import threading

ENV = "AEFAST_RECORD_TRITON_SPECS"
# torch dtype name -> Triton's type name (names, so that appending records needs no torch import:
# tests/test_triton_aot.py starts several recorder processes)
_TORCH_TO_TRITON = {
    "float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64",
    "int64": "i64", "int32": "i32", "int16": "i16", "int8": "i8", "uint8": "u8", "bool": "i1",
}
_lock = threading.Lock()
_installed = None
_written = set()  # (path, line) this process has appended already


def append_record(path, line):
    """Appends line + newline to path as one write: atomic among concurrent appenders."""
    data = (line + "\n").encode()
    with _lock:
        if (path, line) in _written:
            return
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            written = os.write(fd, data)
        finally:
            os.close(fd)
        if written != len(data):  # a regular file takes the whole line or the disk is full
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
        _written.add((path, line))


def _arg_type(value):
    import torch

    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[str(value.dtype).removeprefix("torch.")]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unrecorded Triton argument type {type(value).__name__}")


def _constexpr_value(value):
    import triton.language as tl

    if isinstance(value, tl.dtype):
        return {"tl_dtype": str(value)}
    if isinstance(value, tl.constexpr):
        value = value.value
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"unrecorded constexpr type {type(value).__name__}")


def spec_of(fn, args, kwargs):
    """The JSON record of one launch of the Python kernel function fn."""
    params = list(inspect.signature(fn).parameters.values())
    bound = dict(zip([p.name for p in params], args))
    bound.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
    constexprs = {p.name for p in params if "constexpr" in str(p.annotation)}
    record = {"kernel": f"{fn.__module__}.{fn.__qualname__}", "args": {}, "constexprs": {}, "options": {}}
    for p in params:
        if p.name not in bound:
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{record['kernel']}: argument {p.name} not given")
            value = p.default
        else:
            value = bound[p.name]
        if p.name in constexprs:
            record["constexprs"][p.name] = _constexpr_value(value)
        else:
            record["args"][p.name] = _arg_type(value)
    for key in ("num_warps", "num_stages"):
        if key in kwargs:
            record["options"][key] = kwargs[key]
    return record


def install(path):
    """Wraps the interpreter's launch so that each launch appends its specialization to path."""
    global _installed
    if _installed == path:
        return
    from triton.runtime.interpreter import InterpretedFunction

    original = getattr(InterpretedFunction.run, "_aefast_original", InterpretedFunction.run)

    def run(self, *args, grid, warmup, **kwargs):
        # aefast's own kernels only: a kernel a test defines for itself (tests/test_triton_aot.py's
        # scan comparison) ships nowhere, and the AOT gate could not import it.
        if self.fn.__module__.startswith("aefast."):
            append_record(path, json.dumps(spec_of(self.fn, args, kwargs), sort_keys=True))
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    run._aefast_original = original
    InterpretedFunction.run = run
    _installed = path


@contextlib.contextmanager
def recording(path):
    """Records the launches inside the block to path (whatever install() was done before)."""
    from triton.runtime.interpreter import InterpretedFunction

    global _installed
    saved, saved_path = InterpretedFunction.run, _installed
    _installed = None
    install(path)
    try:
        yield
    finally:
        InterpretedFunction.run, _installed = saved, saved_path


def install_from_env():
    path = os.environ.get(ENV)
    if path and os.environ.get("TRITON_INTERPRET") == "1":
        install(path)
