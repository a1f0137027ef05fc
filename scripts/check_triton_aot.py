#!/usr/bin/env python
"""Ahead-of-time compile of every Triton kernel specialization the tests launch, for sm_80 and sm_90.

Usage (CI):
    AEFAST_RECORD_TRITON_SPECS=/tmp/specs.jsonl python -m pytest -q tests/...   # records launches
    python scripts/check_triton_aot.py --specs /tmp/specs.jsonl
or, recording with a pytest run of its own:
    python scripts/check_triton_aot.py --pytest tests/test_conv_pool.py -k triton

Each recorded specialization (kernel, argument types, constexprs; see aefast/triton/_specs.py) is
compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)). A kernel that its
module autotunes (listed in the module's GPU_CONFIGS) is compiled with each of those configs, since
any of them may run on a GPU. Fails (exit 1) unless, for every compile:
  * it compiles;
  * a conv-family kernel (every kernel of aefast/triton/conv_pool.py and unpool_deconv.py except
    those a module lists in NO_TENSOR_CORE_KERNELS, and except fp64 specializations: there is no
    fp64 tensor-core dot) has `mma` in its sm_80 PTX and `wgmma` or `mma` in its sm_90 PTX;
  * it does not spill (ptxas -v: 0 bytes spill stores and loads; cuobjdump --dump-resource-usage gives
    the registers and the stack, which also holds local arrays that are not spills);
  * its shared memory is within the arch's per-block limit (sm_80 163 KB, sm_90 227 KB).
Writes the table to bench/results/triton_aot_<date>.md. --list prints it and exits 0 whatever
failed.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONV_FAMILY_MODULES = ("aefast.triton.conv_pool", "aefast.triton.unpool_deconv")
# Elementwise and reduction kernels of the conv-family modules, for modules that do not list their
# own NO_TENSOR_CORE_KERNELS yet (the decoder's before its tensor-core rewrite).
DEFAULT_NO_TENSOR_CORE = {
    "aefast.triton.unpool_deconv": {"_gpre_kernel", "_grad_bias_kernel", "_claim_kernel", "_unpool_write_kernel",
                                    "_unpool_grad_kernel"},
}
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)


def load_specs(paths):
    seen = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            if line.strip():
                spec = json.loads(line)
                seen[json.dumps(spec, sort_keys=True)] = spec
    return list(seen.values())


def _resolve(qualname):
    module_name, _, name = qualname.rpartition(".")
    module = importlib.import_module(module_name)
    return module, name, getattr(module, name)


def _constexpr(value):
    import triton.language as tl

    if isinstance(value, dict) and "tl_dtype" in value:
        return getattr(tl, {"fp32": "float32", "fp64": "float64", "fp16": "float16", "bf16": "bfloat16"}
                       .get(value["tl_dtype"], value["tl_dtype"]))
    return value


def _gpu_variants(spec):
    """The recorded constexprs as a GPU launch sets them (aefast.triton._common.mma_acc's knobs):
    UPCAST (the interpreter's bf16 workaround) off, and fp32 with PRECISION both "tf32" (the default,
    torch.backends.cudnn.allow_tf32) and "ieee" (allow_tf32 off: no tensor cores by definition)."""
    c = dict(spec["constexprs"])
    if "UPCAST" in c:
        c["UPCAST"] = False
    if "PRECISION" in c and c.get("DOT", True) and "*fp32" in spec["args"].values() and not any(
            t in ("*fp16", "*bf16") for t in spec["args"].values()):
        return [dict(spec, constexprs=dict(c, PRECISION=p)) for p in ("tf32", "ieee")]
    return [dict(spec, constexprs=c)]


def expand(spec):
    """The compile jobs of one recorded specialization: one per GPU config of an autotuned kernel."""
    return [job for variant in _gpu_variants(spec) for job in _expand_configs(variant)]


def _expand_configs(spec):
    module, name, _ = _resolve(spec["kernel"])
    tuned = getattr(module, "GPU_CONFIGS", {})
    configs = tuned.get(name)
    if hasattr(module, "config_variant"):  # per-dtype/precision tile sets: "name:variant"
        floats = [t[1:] for t in spec["args"].values() if t in ("*fp32", "*fp16", "*bf16", "*fp64")]
        operand = spec["args"].get("x_ptr", "*" + (floats[0] if floats else ""))[1:]
        variant = module.config_variant(operand, spec["constexprs"].get("PRECISION"))
        configs = tuned.get(f"{name}:{variant}", configs) if variant else configs
    if not configs:
        return [dict(spec, options={"num_warps": spec["options"].get("num_warps", 4),
                                    "num_stages": spec["options"].get("num_stages", 3)}, config="")]
    jobs = []
    for cfg in configs:
        constexprs = dict(spec["constexprs"], **cfg.kwargs)
        label = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f",w{cfg.num_warps},s{cfg.num_stages}"
        jobs.append(dict(spec, constexprs=constexprs, options={"num_warps": cfg.num_warps,
                                                                "num_stages": cfg.num_stages}, config=label))
    return jobs


def _resource_usage(cubin, kernel_name):
    cuobjdump = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(cuobjdump), "--dump-resource-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    usage = {}
    for line in text.splitlines():
        if "REG:" in line:
            usage = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
    return usage


def _spill_bytes(ptx, arch):
    """Register spill stores + loads as ptxas -v reports them. Not cuobjdump's STACK: that also
    counts local arrays the PTX itself declares (libdevice's sin/cos argument reduction behind
    tl.randn keeps a 28-byte one), which are not spills."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path  # the ptxas Triton itself runs for this arch
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        text = subprocess.run([str(ptxas), "-v", "--gpu-name", f"sm_{arch}{'a' if arch >= 90 else ''}", str(src),
                               "-o", str(Path(d) / "k.o")], capture_output=True, text=True, check=True).stderr
    return sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))


def compile_one(job, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, name, fn = _resolve(job["kernel"])
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    signature = {}
    constexprs = {}
    for p in fn.arg_names:
        if p in job["constexprs"]:
            signature[p] = "constexpr"
            constexprs[p] = _constexpr(job["constexprs"][p])
        else:
            signature[p] = job["args"][p]
    prec = job["constexprs"].get("PRECISION")
    config = ",".join(x for x in (prec if prec in ("tf32", "ieee") and "*fp32" in job["args"].values() else "",
                                  job["config"]) if x)
    result = dict(kernel=job["kernel"], name=name, arch=arch, config=config,
                  dtype=[t[1:] for p, t in ((p, signature[p]) for p in fn.arg_names)
                         if t in ("*fp32", "*fp16", "*bf16", "*fp64")][:1] or ["-"], error="")
    try:
        cc = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", arch, 32), options=job["options"])
    except Exception as e:  # noqa: BLE001  (reported per kernel)
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        return result
    ptx = cc.asm["ptx"]
    try:
        usage = _resource_usage(cc.asm["cubin"], name)
        spills = _spill_bytes(ptx, arch)
    except (subprocess.CalledProcessError, OSError) as e:
        result["error"] = f"resource usage unreadable: {e}"[:200]
        return result
    result.update(registers=usage.get("REG", -1), spills=spills, stack=usage.get("STACK", 0),
                  shared=max(int(cc.metadata.shared), usage.get("SHARED", 0)),
                  tensor_core="wgmma" if re.search(r"\bwgmma\.", ptx) else ("mma" if re.search(r"\bmma\.", ptx)
                                                                            else "-"))
    return result


def _needs_tensor_cores(job):
    module, name, _ = _resolve(job["kernel"])
    if module.__name__ not in CONV_FAMILY_MODULES:
        return False
    exempt = getattr(module, "NO_TENSOR_CORE_KERNELS", DEFAULT_NO_TENSOR_CORE.get(module.__name__, set()))
    if name in exempt:
        return False
    if job["constexprs"].get("PRECISION") == "ieee" and "*fp32" in job["args"].values() and not any(
            t in ("*fp16", "*bf16") for t in job["args"].values()):
        return False  # IEEE fp32 (allow_tf32 off) has no tensor-core instruction
    return not any(t == "*fp64" for t in job["args"].values())


def judge(result, needs_tc):
    problems = []
    if result["error"]:
        return ["does not compile: " + result["error"]]
    if needs_tc:
        ok = result["tensor_core"] == "mma" if result["arch"] == 80 else result["tensor_core"] in ("mma", "wgmma")
        if not ok:
            problems.append("no tensor-core instruction")
    if result["spills"]:
        problems.append(f"spills {result['spills']} B")
    if result["shared"] > SHARED_LIMIT[result["arch"]]:
        problems.append(f"shared {result['shared']} B > {SHARED_LIMIT[result['arch']]}")
    return problems


def _run_job(args):
    job, arch = args
    return job, compile_one(job, arch)


def record_with_pytest(pytest_args):
    path = Path(tempfile.mkstemp(prefix="triton_specs_", suffix=".jsonl")[1])
    env = dict(os.environ, AEFAST_RECORD_TRITON_SPECS=str(path), TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args], env=env,
                          cwd=ROOT)
    if proc.returncode not in (0, 5):
        sys.exit(f"pytest failed ({proc.returncode}) while recording specializations")
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--specs", nargs="*", default=[], help="JSONL files written under AEFAST_RECORD_TRITON_SPECS")
    ap.add_argument("--pytest", nargs=argparse.REMAINDER, default=None,
                    help="record by running pytest with these arguments (the rest of the command line)")
    ap.add_argument("--list", action="store_true", help="print the table and exit 0 even when checks fail")
    ap.add_argument("--jobs", type=int, default=2, help="parallel compiles")
    ap.add_argument("--kernels", default=None, help="only kernels whose qualified name matches this regex")
    ap.add_argument("--out", default=None, help="markdown table path (default bench/results/triton_aot_<date>.md)")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real GPU targets
    paths = list(args.specs)
    if args.pytest is not None:
        paths.append(record_with_pytest(args.pytest))
    if not paths:
        ap.error("give --specs FILE... or --pytest ARGS...")
    specs = load_specs(paths)
    if args.kernels:
        specs = [s for s in specs if re.search(args.kernels, s["kernel"])]
    jobs = [job for spec in specs for job in expand(spec)]
    work = [(job, arch) for job in jobs for arch in ARCHS]
    print(f"{len(specs)} specializations, {len(jobs)} configs, {len(work)} compiles", flush=True)
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = []
        for job, res in pool.map(_run_job, work):
            results.append((job, res))
            print(f"  [{len(results)}/{len(work)}] {res['name']} {','.join(res['dtype'])} sm_{res['arch']} "
                  f"{res['config']}: regs {res.get('registers', '-')} spills {res.get('spills', '-')} "
                  f"{res.get('tensor_core', '-')} {res['error']}", flush=True)
    rows = []
    failed = 0
    for job, res in results:
        problems = judge(res, _needs_tensor_cores(job))
        failed += bool(problems)
        rows.append((res, problems))
    rows.sort(key=lambda r: (r[0]["kernel"], ",".join(r[0]["dtype"]), r[0]["config"], r[0]["arch"]))
    lines = [f"# Triton AOT check ({datetime.date.today().isoformat()})", "",
             f"triton {__import__('triton').__version__}; {len(specs)} recorded specializations, {len(work)} "
             "compiles; `registers` per thread, `spills` = ptxas spill store+load bytes, `shared` bytes per block.", "",
             "| kernel | dtype | arch | config | registers | spills | shared | tensor core | problems |",
             "|---|---|---|---|---|---|---|---|---|"]
    for res, problems in rows:
        lines.append(f"| {res['name']} | {','.join(res['dtype'])} | sm_{res['arch']} | {res['config'] or '-'} | "
                     f"{res.get('registers', '-')} | {res.get('spills', '-')} | {res.get('shared', '-')} | "
                     f"{res.get('tensor_core', '-')} | {'; '.join(problems) or 'ok'} |")
    # one summary line per kernel and arch: worst case over its specializations
    summary = {}
    for res, problems in rows:
        key = (res["kernel"], res["arch"])
        s = summary.setdefault(key, dict(n=0, regs=0, spills=0, shared=0, tc=set(), bad=0))
        s["n"] += 1
        s["regs"] = max(s["regs"], res.get("registers", 0) or 0)
        s["spills"] = max(s["spills"], res.get("spills", 0) or 0)
        s["shared"] = max(s["shared"], res.get("shared", 0) or 0)
        s["tc"].add(res.get("tensor_core", "-"))
        s["bad"] += bool(problems)
    lines += ["", "## Per kernel (worst case over specializations)", "",
              "| kernel | arch | compiles | max registers | max spills | max shared | tensor core | failing |",
              "|---|---|---|---|---|---|---|---|"]
    for (kernel, arch), s in sorted(summary.items()):
        lines.append(f"| {kernel} | sm_{arch} | {s['n']} | {s['regs']} | {s['spills']} | {s['shared']} | "
                     f"{'/'.join(sorted(s['tc']))} | {s['bad']} |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out) if args.out else ROOT / "bench" / "results" / f"triton_aot_{datetime.date.today()}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print("\n".join(lines[lines.index("## Per kernel (worst case over specializations)"):]))
    print(f"\n{failed} of {len(rows)} compiles fail the checks; table in {out}")
    if failed and not args.list:
        for res, problems in rows:
            if problems:
                print(f"FAIL {res['kernel']} {','.join(res['dtype'])} sm_{res['arch']} {res['config']}: "
                      f"{'; '.join(problems)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
