#!/usr/bin/env python
"""Ahead-of-time compile of every Triton kernel specialization the tests launch, for sm_80 and sm_90.

Usage (CI, .ci/run):
    AEFAST_RECORD_TRITON_SPECS=/tmp/specs.jsonl ./dev test     # records launches (any number of workers)
    python scripts/check_triton_aot.py --specs /tmp/specs.jsonl --out out/triton_aot.md
or, recording with a pytest run of its own:
    python scripts/check_triton_aot.py --pytest tests/test_conv_pool.py -k triton

Each recorded specialization (kernel, argument types, constexprs; see aefast/triton/_specs.py) is
compiled with triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)). A kernel that its
module autotunes (listed in the module's GPU_CONFIGS, per config variant "name:ieee" / "name:fp64"
when the module has config_variant()) is compiled with each of those configs (their warps, stages
and maxnreg), since any of them may run on a GPU. Records that give the same compile input (kernel, signature, constexprs, launch
options) once the GPU configs replace the interpreter's are compiled once per arch. Fails (exit 1)
unless, for every compile:
  * it compiles;
  * a conv-family kernel (every kernel of aefast/triton/conv_pool.py and unpool_deconv.py except
    those a module lists in NO_TENSOR_CORE_KERNELS, and except IEEE fp32, which has no tensor-core
    instruction by definition, and fp64, which the encoder reduces with tl.sum) has `mma` in its
    sm_80 PTX and `wgmma` or `mma` in its sm_90 PTX;
  * it does not spill: 0 bytes of spill stores and loads in the `ptxas -v` report of the ptxas run
    Triton itself makes (its flags; kept in Triton's cache beside the kernel, so a warm cache
    needs no ptxas at all);
  * its shared memory (Triton's dynamic plus ptxas's static) is within the arch's per-block limit
    (sm_80 163 KB, sm_90 227 KB).
Fails too when no specialization was recorded. Writes the table to --out (default
bench/results/triton_aot_<date>.md). --list prints it and exits 0 whatever failed.
Cost: one Triton compile per distinct input and arch, --jobs at a time (default: all cores), the
conv-family kernels (the slow compiles) first so that no long compile is left alone at the end.

Known results (--known FILE, what .ci/run passes: .ci/triton_aot_known.jsonl): a compile whose Triton
cache hash is in FILE takes its registers, spills, shared memory and tensor-core instruction from there
instead of compiling again. The hash is the one triton.compile files the kernel under in its own cache
(get_cache_key: Triton's own sources and bundled ptxas, the kernel's source and every JIT function it
calls, the signature, the constexprs, the target arch and the launch options), so an entry answers
exactly the compile that produced it, as a warm Triton cache would; any change to a kernel, a tile
config, a constexpr or Triton itself gives a new hash, compiled here. --recheck N compiles N randomly
chosen known compiles again and fails unless each matches its entry and Triton's hash equals the one
computed here (a stale or wrong file, or a Triton whose key this script no longer reproduces, fails CI
instead of passing it). Compile errors are never stored. --write-known FILE writes this run's results
(kept and new) to FILE, one JSON line per hash, sorted: after a change to a kernel, run the gate on a
full recording with --write-known and commit the file, and CI compiles only what the recording has
that the file has not. A cold gate over the full suite's recording: ~3000 compiles, ~0.65 CPU-s each
(~18 min on 2 cores, measured 2026-12-07); answered from the file: seconds.
Nothing more can be deduped without weakening the gate: on the CI suite's recording (2026-12-07, 628
specializations, 1065 distinct compile inputs) every input gave a different TTIR after Triton's own
inlining/CSE/DCE (make_ttir; locations and the kernel's name aside), so no two compiles were one kernel.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import functools
import hashlib
import importlib
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONV_FAMILY_MODULES = ("aefast.triton.conv_pool", "aefast.triton.unpool_deconv")
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
ARCHS = (80, 90)


def load_specs(paths):
    seen = {}
    for path in paths:
        if not Path(path).exists():  # no launch recorded (the file is created on the first one)
            continue
        for line in Path(path).read_text().splitlines():
            if line.strip():
                spec = json.loads(line)
                seen[json.dumps(spec, sort_keys=True)] = spec
    return list(seen.values())


def dedup_jobs(jobs):
    """One job per distinct compile input (kernel, signature, constexprs, launch options): records
    that differ only in what the GPU configs or _gpu_variants overwrite compile once."""
    seen = {}
    for job in jobs:
        key = json.dumps({k: job[k] for k in ("kernel", "args", "constexprs", "options")}, sort_keys=True)
        seen.setdefault(key, job)
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
    UPCAST (the interpreter's bf16 workaround) and INTERPRETED (the interpreter's own code paths,
    e.g. conv_pool's vectorized argmax) off, and fp32 with PRECISION both "tf32" (the default,
    torch.backends.cudnn.allow_tf32) and "ieee" (allow_tf32 off: no tensor cores by definition)."""
    c = dict(spec["constexprs"])
    for interpreter_only in ("UPCAST", "INTERPRETED"):
        if interpreter_only in c:
            c[interpreter_only] = False
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
        warps, stages = spec["options"].get("num_warps", 4), spec["options"].get("num_stages", 3)
        return [dict(spec, options={"num_warps": warps, "num_stages": stages}, config=f"w{warps}")]
    jobs = []
    for cfg in configs:
        constexprs = dict(spec["constexprs"], **cfg.kwargs)
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        label = ",".join(f"{k}={v}" for k, v in cfg.kwargs.items()) + f",w{cfg.num_warps},s{cfg.num_stages}"
        if getattr(cfg, "maxnreg", None):  # the launch's .maxnreg: it changes ptxas's register budget
            options["maxnreg"] = cfg.maxnreg
            label += f",r{cfg.maxnreg}"
        jobs.append(dict(spec, constexprs=constexprs, options=options, config=label))
    return jobs


PTXAS_LOG = "aefast_ptxas_v.log"  # kept beside each compiled kernel in Triton's cache


def _capture_ptxas_logs():
    """Keeps the `ptxas -v` report of the ptxas run that Triton itself makes for each kernel (its
    flags, its ptxas) in Triton's cache, beside the kernel: one ptxas run per compile, and a warm
    cache answers without any."""
    from triton import knobs
    from triton.backends.nvidia import compiler as nvidia
    from triton.runtime.cache import get_cache_manager

    if getattr(nvidia.CUDABackend.make_cubin, "_aefast_capture", False):
        return
    original = nvidia.CUDABackend.make_cubin

    def make_cubin(self, src, metadata, opt, capability):
        log = io.StringIO()
        knobs.nvidia.dump_ptxas_log = True  # Triton prints the log it already asks ptxas for
        with contextlib.redirect_stdout(log):
            cubin = original(self, src, metadata, opt, capability)
        get_cache_manager(metadata["hash"]).put(log.getvalue(), PTXAS_LOG, binary=False)
        return cubin

    make_cubin._aefast_capture = True
    nvidia.CUDABackend.make_cubin = make_cubin


def _ptxas_report(cc, target, options):
    """registers, spill bytes (stores + loads) and static shared memory from `ptxas -v`. Spills
    are ptxas's, not cuobjdump's STACK: the stack also holds local arrays that the PTX itself
    declares (libdevice's sin/cos argument reduction behind tl.randn keeps a 28-byte one)."""
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_manager

    cache = get_cache_manager(cc.hash)
    path = cache.get_file(PTXAS_LOG)
    if path is None:  # compiled (and cached) before the capture: run Triton's ptxas step again
        backend = make_backend(target)
        backend.make_cubin(cc.asm["ptx"], {"hash": cc.hash}, backend.parse_options(options), target.arch)
        path = cache.get_file(PTXAS_LOG)
    text = Path(path).read_text()
    registers = re.findall(r"Used (\d+) registers", text)
    if not registers:
        raise OSError("no register count in the ptxas -v report")
    smem = re.findall(r"(\d+) bytes smem", text)
    spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", text))
    return max(int(r) for r in registers), spills, max((int(b) for b in smem), default=0)


def _compile_input(job, arch):
    """The kernel's name and triton.compile's source and target for one job."""
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
    return name, ASTSource(fn=fn, signature=signature, constexprs=constexprs), GPUTarget("cuda", arch, 32)


@functools.cache
def _backend(arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


def triton_cache_hash(job, arch):
    """The hash triton.compile files this compile under (triton/compiler/compiler.py, compile():
    sha256 of get_cache_key(src, backend, options, env_vars)), computed without compiling."""
    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.runtime.cache import get_cache_key

    _, src, _ = _compile_input(job, arch)
    backend = _backend(arch)
    options = backend.parse_options(dict(job["options"], **src.parse_options()))
    key = get_cache_key(src, backend, options, env_vars=get_cache_invalidating_env_vars())
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def describe(job, arch):
    """The table row's identity of one compile (kernel, arch, config, dtype), without its results."""
    module, name, fn = _resolve(job["kernel"])
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    types = [job["args"][p] for p in fn.arg_names if p in job["args"] and p not in job["constexprs"]]
    dtype = [t[1:] for t in types if t in ("*fp32", "*fp16", "*bf16", "*fp64")][:1]
    prec = job["constexprs"].get("PRECISION")  # named where it decides: fp32 operands (TF32 or IEEE)
    config = ",".join(x for x in (prec if prec in ("tf32", "ieee") and dtype == ["fp32"] else "", job["config"]) if x)
    return dict(kernel=job["kernel"], name=name, arch=arch, config=config, dtype=dtype or ["-"], error="")


RESULT_FIELDS = ("registers", "spills", "shared", "tensor_core")


def compile_one(job, arch):
    import triton

    _capture_ptxas_logs()
    result = describe(job, arch)
    _, src, target = _compile_input(job, arch)
    try:
        cc = triton.compile(src, target=target, options=job["options"])
    except Exception as e:  # noqa: BLE001  (reported per kernel)
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        return result
    ptx = cc.asm["ptx"]
    try:
        registers, spills, static_shared = _ptxas_report(cc, target, job["options"])
    except Exception as e:  # noqa: BLE001  (reported per kernel)
        result["error"] = f"resource usage unreadable: {e}"[:200]
        return result
    result.update(hash=cc.hash, registers=registers, spills=spills, shared=int(cc.metadata.shared) + static_shared,
                  tensor_core="wgmma" if re.search(r"\bwgmma\.", ptx) else ("mma" if re.search(r"\bmma\.", ptx)
                                                                            else "-"))
    return result


def load_known(path):
    """hash -> {registers, spills, shared, tensor_core} from a --write-known file (none: empty)."""
    if not path or not Path(path).exists():
        return {}
    known = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            known[entry["hash"]] = {f: entry[f] for f in RESULT_FIELDS}
    return known


def write_known(path, results):
    entries = {res["hash"]: {f: res[f] for f in RESULT_FIELDS} for res in results
               if not res["error"] and res.get("hash")}
    lines = [json.dumps(dict(hash=h, **entries[h])) for h in sorted(entries)]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + ("\n" if lines else ""))
    return len(lines)


def recheck_problems(result, expected_hash, entry):
    """Why a fresh compile of a known entry disagrees with it (empty: it agrees)."""
    if result["error"]:
        return []  # judge() reports the compile error itself
    problems = []
    if result["hash"] != expected_hash:
        problems.append(f"Triton filed it under {result['hash'][:12]}, not the {expected_hash[:12]} computed "
                        "here (triton_cache_hash no longer reproduces Triton's key)")
    differing = [f"{f} {entry[f]} known, {result[f]} now" for f in RESULT_FIELDS if entry[f] != result[f]]
    if differing:
        problems.append("differs from the known result: " + ", ".join(differing))
    return problems


def _needs_tensor_cores(job):
    module, name, _ = _resolve(job["kernel"])
    if module.__name__ not in CONV_FAMILY_MODULES:
        return False
    exempt = module.NO_TENSOR_CORE_KERNELS
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
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: all cores)")
    ap.add_argument("--verbose", action="store_true", help="one progress line per compile")
    ap.add_argument("--source", default="", help="what recorded the specializations (one line in the table)")
    ap.add_argument("--kernels", default=None, help="only kernels whose qualified name matches this regex")
    ap.add_argument("--known", default=None, help="JSONL of known results by Triton cache hash (see above)")
    ap.add_argument("--recheck", type=int, default=0, help="compile this many known results again, at random")
    ap.add_argument("--write-known", default=None, help="write this run's results, by hash, to this JSONL file")
    ap.add_argument("--out", default=None, help="markdown table path (default bench/results/triton_aot_<date>.md)")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for real GPU targets
    paths = list(args.specs)
    if args.pytest is not None:
        paths.append(record_with_pytest(args.pytest))
    if not paths:
        ap.error("give --specs FILE... or --pytest ARGS...")
    specs = load_specs(paths)
    if not specs:  # the recorder did not reach the tests: a gate over nothing would pass silently
        print(f"no Triton specialization recorded in {', '.join(map(str, paths))} (the tests run under "
              "TRITON_INTERPRET=1 with AEFAST_RECORD_TRITON_SPECS set?)")
        return 1
    if args.kernels:
        specs = [s for s in specs if re.search(args.kernels, s["kernel"])]
    jobs = dedup_jobs(job for spec in specs for job in expand(spec))
    work = [(job, arch) for job in jobs for arch in ARCHS]
    work.sort(key=lambda w: _resolve(w[0]["kernel"])[0].__name__ not in CONV_FAMILY_MODULES)  # (stable)
    known = load_known(args.known)
    hashes = [triton_cache_hash(job, arch) for job, arch in work] if known else [None] * len(work)
    answered = [i for i, h in enumerate(hashes) if h in known]
    rechecked = set(random.sample(answered, min(args.recheck, len(answered))))
    to_compile = [i for i in range(len(work)) if i not in answered or i in rechecked]
    print(f"{len(specs)} specializations, {len(jobs)} distinct compile inputs, {len(work)} compiles: "
          f"{len(answered) - len(rechecked)} answered by {args.known or 'known results (none given)'}, "
          f"{len(to_compile)} to compile, "
          f"{len(rechecked)} of them known results rechecked ({args.jobs} at a time)", flush=True)
    results = [None] * len(work)
    for i in answered:
        if i not in rechecked:
            results[i] = dict(describe(*work[i]), hash=hashes[i], **known[hashes[i]])
    started = time.monotonic()
    recheck_failures = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for done, (i, (job, res)) in enumerate(zip(to_compile, pool.map(_run_job, (work[i] for i in to_compile))), 1):
            results[i] = res
            if i in rechecked:
                recheck_failures[i] = recheck_problems(res, hashes[i], known[hashes[i]])
            if args.verbose or done % 100 == 0 or done == len(to_compile):
                print(f"  [{done}/{len(to_compile)}, {time.monotonic() - started:.0f} s] {res['name']} "
                      f"{','.join(res['dtype'])} sm_{res['arch']} {res['config']}: regs {res.get('registers', '-')} "
                      f"spills {res.get('spills', '-')} {res.get('tensor_core', '-')} {res['error']}", flush=True)
    results = [(job, res) for (job, _), res in zip(work, results)]
    if args.write_known:
        n = write_known(args.write_known, [res for _, res in results])
        print(f"{n} known results written to {args.write_known}")
    elapsed = time.monotonic() - started
    rows = []
    failed = 0
    for i, (job, res) in enumerate(results):
        problems = judge(res, _needs_tensor_cores(job)) + recheck_failures.get(i, [])
        failed += bool(problems)
        rows.append((res, problems))
    rows.sort(key=lambda r: (r[0]["kernel"], ",".join(r[0]["dtype"]), r[0]["config"], r[0]["arch"]))
    lines = [f"# Triton AOT check ({datetime.date.today().isoformat()})", "",
             f"triton {__import__('triton').__version__}; {len(specs)} recorded specializations, {len(work)} "
             "compiles; `registers` per thread, `spills` = ptxas spill store+load bytes, `shared` bytes per block.", "",
             f"Compiled in this run: {len(to_compile)} ({len(rechecked)} of them rechecks of known results, "
             f"{sum(bool(p) for p in recheck_failures.values())} disagreeing); answered by the known results "
             f"({args.known or 'none given'}): {len(answered) - len(rechecked)}.", "",
             *([f"Recorded by: {args.source}", ""] if args.source else []),
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
    print(f"\n{failed} of {len(rows)} compiles fail the checks ({elapsed:.0f} s); table in {out}")
    if failed and not args.list:
        for res, problems in rows:
            if problems:
                print(f"FAIL {res['kernel']} {','.join(res['dtype'])} sm_{res['arch']} {res['config']}: "
                      f"{'; '.join(problems)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
