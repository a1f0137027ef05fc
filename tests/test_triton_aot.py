"""The Triton specialization recorder and the ahead-of-time compile check (scripts/check_triton_aot.py).

A tiny fp16 encoder forward is recorded under the interpreter; the script then compiles that
specialization with each GPU tile config for sm_80 and sm_90 (in a subprocess: the compile needs
the real JIT functions, not the interpreter's) and must find tensor-core instructions, no spills and
shared memory within limits.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aefast
import aefast.functional as AF
from aefast import backend as _backend

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def triton_interpreter():
    ok, why = _backend.availability()["triton"]
    if not ok or torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip(why if not ok else "records under the interpreter only")
    from aefast.triton import _specs
    return _specs


def _record_encoder_forward(specs, path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 6, 5, generator=g).half()
    w = torch.randn(4, 3, 3, 3, generator=g).half()
    with specs.recording(path), aefast.set_backend("triton"):
        AF.conv_pool2d(x, w, None, 1, 1, "relu", 2, index_format="window")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_recorder_writes_the_launched_specialization(triton_interpreter, tmp_path):
    path = tmp_path / "specs.jsonl"
    records = _record_encoder_forward(triton_interpreter, path)
    fwd = [r for r in records if r["kernel"] == "aefast.triton.conv_pool._conv_pool_fwd_kernel"]
    assert len(fwd) == 1, records
    spec = fwd[0]
    assert spec["args"]["x_ptr"] == "*fp16" and spec["args"]["win_ptr"] == "*u8" and spec["args"]["M"] == "i32"
    c = spec["constexprs"]
    assert (c["KH"], c["KW"], c["PKH"], c["PKW"], c["NW"], c["ACT"], c["HAS_BIAS"]) == (3, 3, 2, 2, 4, 1, False)
    assert c["ACC"] == {"tl_dtype": "fp32"} and c["DOT"] is True and c["CIN_INNER"] is False
    assert {"BLOCK_M", "BLOCK_N", "BLOCK_K"} <= set(c) and "num_warps" in spec["options"]
    assert c["INTERPRETED"] is True  # the interpreter's own argmax path (the AOT gate compiles the GPU one)
    # recording stops with the block
    AF.conv_pool2d(torch.randn(1, 3, 6, 5).half(), torch.randn(4, 3, 3, 3).half(), None, 1, 1, "relu", 2)
    assert len(path.read_text().splitlines()) == len(records)


def test_recorder_keeps_only_aefasts_own_kernels(triton_interpreter, tmp_path):
    """A kernel a test defines (both_scans, below) is launched but not recorded: the AOT gate imports
    every recorded kernel by name, and a test module is not importable there."""
    if triton is None:
        pytest.skip("triton is not installed")
    path = tmp_path / "specs.jsonl"
    a = torch.zeros(1, 1, 1)
    with triton_interpreter.recording(path):
        both_scans[(1,)](a, a.clone(), torch.empty(3, 1, 1), 1, 1, 1, False, tl.float32)
    assert not path.exists() or path.read_text() == ""
    records = _record_encoder_forward(triton_interpreter, path)
    assert records and all(r["kernel"].startswith("aefast.") for r in records)


def test_aot_script_compiles_the_recorded_encoder_for_sm80_and_sm90(triton_interpreter, tmp_path):
    path = tmp_path / "specs.jsonl"
    _record_encoder_forward(triton_interpreter, path)
    out = tmp_path / "aot.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_triton_aot.py"), "--specs", str(path),
                           "--out", str(out), "--jobs", "1"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = out.read_text()
    rows = [line for line in table.splitlines() if line.startswith("| _conv_pool_fwd_kernel |")]
    from aefast.triton.conv_pool import GPU_CONFIGS
    assert len(rows) == 2 * len(GPU_CONFIGS["_conv_pool_fwd_kernel"])  # every GPU config, two archs
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        kernel, dtype, arch, config, regs, spills, shared, tc, problems = cells
        assert dtype == "fp16" and problems == "ok" and spills == "0" and int(regs) <= 255
        assert tc == ("mma" if arch == "sm_80" else "wgmma") or (arch == "sm_90" and tc == "mma")


def test_aot_script_compiles_each_config_with_its_maxnreg(triton_interpreter, tmp_path):
    """A GPU config's .maxnreg changes ptxas's register budget (and so its spills): the compile job
    of each config must carry the config's warps, stages and maxnreg."""
    import importlib.util

    from aefast.triton.conv_pool import GPU_CONFIGS

    spec = _record_encoder_forward(triton_interpreter, tmp_path / "specs.jsonl")
    fwd = next(r for r in spec if r["kernel"].endswith("._conv_pool_fwd_kernel"))
    loader = importlib.util.spec_from_file_location("check_triton_aot", ROOT / "scripts" / "check_triton_aot.py")
    script = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(script)
    jobs = script.expand(fwd)
    configs = GPU_CONFIGS["_conv_pool_fwd_kernel"]
    assert any(c.maxnreg for c in configs)
    assert [(j["options"]["num_warps"], j["options"]["num_stages"], j["options"].get("maxnreg")) for j in jobs] == \
        [(c.num_warps, c.num_stages, c.maxnreg) for c in configs]
    assert all(j["constexprs"]["BLOCK_M"] == c.kwargs["BLOCK_M"] for j, c in zip(jobs, configs))
    # what a GPU launch compiles: tl.reduce(..., _scan_max), not the interpreter's vectorized argmax
    assert all(j["constexprs"]["INTERPRETED"] is False and j["constexprs"]["UPCAST"] is False for j in jobs)


_APPEND_WORKER = """
import importlib.util, json, sys
# the recorder module alone (importing the aefast package would load the extension in every process)
spec = importlib.util.spec_from_file_location("_specs", "aefast/triton/_specs.py")
_specs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(_specs)
path, worker, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pad = "x" * 5000  # records are ~1-2 KB; 5 KB lines would tear if written in pieces
for i in range(count):
    _specs.append_record(path, json.dumps({"worker": worker, "i": i, "pad": pad}))
    _specs.append_record(path, json.dumps({"worker": worker, "i": i, "pad": pad}))  # once per process
"""


def test_recorder_appends_whole_lines_from_concurrent_processes(tmp_path):
    """pytest-xdist workers all record into one file: every line must arrive whole, once per
    process and record."""
    path = tmp_path / "specs.jsonl"
    workers, count = 4, 100
    procs = [subprocess.Popen([sys.executable, "-c", _APPEND_WORKER, str(path), str(w), str(count)], cwd=ROOT)
             for w in range(workers)]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # a torn or interleaved line would not parse
    assert sorted((r["worker"], r["i"]) for r in records) == [(w, i) for w in range(workers) for i in range(count)]


def test_roofline_models_the_encoder_with_its_own_tiles_and_split():
    """bench/roofline_h100.py predicts the encoder with conv_pool's tensor-core tiles and split-K
    rule (inlined there so that it runs without triton): they must not drift apart."""
    ok, why = _backend.availability()["triton"]
    if not ok:
        pytest.skip(why)
    import importlib.util

    from aefast.triton import conv_pool

    path = ROOT / "bench" / "roofline_h100.py"
    spec = importlib.util.spec_from_file_location("roofline_h100", path)
    roofline = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = roofline  # (dataclasses look their module up)
    try:
        spec.loader.exec_module(roofline)
    finally:
        del sys.modules[spec.name]
    blocks = {"fwd": ("BLOCK_M", "BLOCK_N", "BLOCK_K"), "wgrad": ("BLOCK_CO", "BLOCK_K", "BLOCK_R")}
    for kind, name in (("fwd", "_conv_pool_fwd_kernel"), ("wgrad", "_conv_pool_wgrad_kernel")):
        tiles = [tuple(c.kwargs[b] for b in blocks[kind]) + (c.num_warps, c.num_stages)
                 for c in conv_pool.GPU_CONFIGS[name]]
        assert roofline.ENCODER_CONFIGS[kind] == tiles
    for positions in (1, 511, 512, 5000, 10**6, 4 * 10**6):
        for c_out, k in ((64, 27), (64, 576), (128, 576), (512, 4608), (1, 9)):
            assert roofline.encoder_wgrad_splits(positions, c_out, k) == \
                conv_pool.wgrad_splits(positions, c_out, k, gpu=True)


try:  # (the kernel below needs triton's JIT at import time; without triton its test skips)
    import triton
    import triton.language as tl

    from aefast.triton.conv_pool import _scan_max, _scan_max_vectorized
except ImportError:
    triton = None

if triton is not None:
    @triton.jit
    def both_scans(a_ptr, z_ptr, out_ptr, P: tl.constexpr, NW: tl.constexpr, N: tl.constexpr,
                   VECTORIZED: tl.constexpr, ACC: tl.constexpr):
        i = (tl.arange(0, P)[:, None, None] * NW + tl.arange(0, NW)[None, :, None]) * N + tl.arange(0, N)[None, None, :]
        a = tl.load(a_ptr + i)
        z = tl.load(z_ptr + i)
        offs = tl.broadcast_to(tl.arange(0, NW)[None, :, None], (P, NW, N))
        if VECTORIZED:
            best, best_z, best_o = _scan_max_vectorized(a, z, offs, NW, ACC)
        else:
            best, best_z, best_o = tl.reduce((a, z, offs), 1, _scan_max)
        j = tl.arange(0, P)[:, None] * N + tl.arange(0, N)[None, :]
        tl.store(out_ptr + j, best)
        tl.store(out_ptr + P * N + j, best_z)
        tl.store(out_ptr + 2 * P * N + j, best_o.to(out_ptr.dtype.element_ty))


def test_interpreted_argmax_is_the_gpu_scan_bit_for_bit():
    """conv_pool's forward takes its window max/argmax with tl.reduce(..., _scan_max) on a GPU and with
    _scan_max_vectorized under the interpreter (INTERPRETED): both must give the same offsets and the
    same value bits on NaN (either sign), +-inf, +-0.0 ties, all-NaN and all--inf windows, in fp32
    and fp64, for every padded window size."""
    ok, why = _backend.availability()["triton"]
    if not ok:
        pytest.skip(why)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    inf, nan = float("inf"), float("nan")
    value_sets = [[nan, -nan, -inf, inf, 0.0, -0.0, 1.0, -1.0], [-inf, inf, 0.0, -0.0, 1.0, -1.0, 2.0],
                  [0.0, -0.0, -1.0, -inf]]
    for dtype, acc, bits in ((torch.float32, tl.float32, torch.int32), (torch.float64, tl.float64, torch.int64)):
        for values in value_sets:
            for nw in (1, 2, 4, 8, 16):
                p, n = 8, 4  # (the interpreter runs tl.reduce one element at a time)
                pick = torch.randint(0, len(values), (p, nw, n), generator=g)
                a = torch.tensor(values, dtype=dtype)[pick]
                a[0], a[1], a[2] = nan, -inf, -0.0  # all-NaN, all--inf, all--0.0 windows
                z = torch.randn(p, nw, n, generator=g, dtype=dtype)
                z[3] = -0.0
                results = []
                for vectorized in (False, True):
                    out = torch.empty(3, p, n, dtype=dtype, device=device)
                    both_scans[(1,)](a.to(device), z.to(device), out, p, nw, n, vectorized, acc)
                    results.append(out.cpu().view(bits))
                assert torch.equal(results[0], results[1]), (dtype, values, nw)


def test_aot_script_answers_from_known_results_and_rechecks_them(triton_interpreter, tmp_path):
    """--write-known stores each compile's results under Triton's cache hash; --known answers the same
    compiles from the file without compiling (an empty Triton cache stays empty); --recheck compiles
    known ones again and fails when an entry disagrees with the fresh compile."""
    path = tmp_path / "specs.jsonl"
    _record_encoder_forward(triton_interpreter, path)
    known = tmp_path / "known.jsonl"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}

    def gate(*args, cache=None):
        run_env = dict(env, TRITON_CACHE_DIR=str(cache)) if cache else env
        proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_triton_aot.py"), "--specs", str(path),
                               "--out", str(tmp_path / "aot.md"), "--jobs", "1", *args], capture_output=True,
                              text=True, env=run_env, cwd=ROOT, timeout=900)
        return proc.returncode, proc.stdout + proc.stderr

    rc, out = gate("--write-known", str(known))
    assert rc == 0, out[-3000:]
    entries = [json.loads(line) for line in known.read_text().splitlines()]
    n_compiles = sum(1 for line in (tmp_path / "aot.md").read_text().splitlines() if line.startswith("| _"))
    assert len(entries) == n_compiles and n_compiles >= 2
    assert all(len(e["hash"]) == 64 and e["registers"] > 0 for e in entries)

    empty = tmp_path / "triton_cache"
    rc, out = gate("--known", str(known), cache=empty)
    assert rc == 0, out[-3000:]
    assert f"{n_compiles} answered by" in out and "0 to compile" in out
    assert not empty.exists() or not any(empty.iterdir())  # nothing compiled

    rc, out = gate("--known", str(known), "--recheck", str(n_compiles))  # every entry compiled again: agrees
    assert rc == 0, out[-3000:]
    entries[0]["registers"] += 1
    known.write_text("".join(json.dumps(e) + "\n" for e in entries))
    rc, out = gate("--known", str(known), "--recheck", str(n_compiles))
    assert rc == 1 and "differs from the known result: registers" in out, out[-3000:]
