"""The per-kernel breakdown of bench/bench_training.py (bench/_breakdown.py): its FLOP formulas
agree with torch.utils.flop_counter.FlopCounterMode where both count the same thing (eager's
dense convs and GEMMs), aefast's sparse kernels count 1/(pool window) of the dense work they
replace, the byte formulas match hand counts, and a profiled step gives non-empty rows. Tiny
shapes; no timing is asserted."""
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import _breakdown as B  # noqa: E402
import _harness as H  # noqa: E402
import workloads as W  # noqa: E402

LIMITS = dict(peak_gflops=100.0, peak_gbps=20.0)  # fixed: the tests check the arithmetic, not the machine
CONV_OPS = {"aten::conv2d", "aten::conv_transpose2d", "aten::convolution_backward", "aefast::conv_pool2d_forward",
            "aefast::conv_pool2d_backward_input", "aefast::conv_pool2d_backward_weight",
            "aefast::conv_pool2d_backward", "aefast::unpool_conv_transpose2d", "aefast::unpool_conv_transpose2d_backward",
            "aefast::conv_transpose_act2d", "aefast::conv_transpose_act2d_backward"}


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread: on a loaded machine the tiny eager steps otherwise stall for
    hundreds of ms in OpenMP barriers, and nothing here measures speed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _counted(fn):
    """FlopCounterMode's totals per aten op name ('convolution', 'convolution_backward', 'mm', ...)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return {str(op).split(".")[1]: n for op, n in counter.get_flop_counts()["Global"].items()}


def _rows(b):
    return {r.op: r for r in b.rows}


def _step(workload, variant):
    case, name, kwargs, shape = workload
    x, target = W.model_inputs(shape, "cpu")
    reference, fast = W.model_pair(name, kwargs, "cpu")
    model, loss = (reference, W.model_reference_loss) if variant == "eager" else (fast, W.model_aefast_loss)
    return W.make_model_step(model, loss, name, x, target)[0]


@pytest.mark.parametrize("workload", W.MODEL_QUICK_WORKLOADS, ids=[w[0] for w in W.MODEL_QUICK_WORKLOADS])
def test_eager_step_flops_match_flop_counter(workload):
    step = _step(workload, "eager")
    b = B.profile_breakdown(step, steps=1, **LIMITS)
    counted = _counted(step)
    rows = _rows(b)
    flops = {op: r.flops for op, r in rows.items()}
    assert flops.get("aten::conv2d", 0) + flops.get("aten::conv_transpose2d", 0) == counted["convolution"]
    assert flops["aten::convolution_backward"] == counted["convolution_backward"]
    assert flops.get("aten::linear", 0) + flops.get("aten::addmm", 0) == counted.get("addmm", 0)
    assert flops.get("aten::mm", 0) == counted.get("mm", 0)
    # Every row is a real op with a time; the shares add up to the step.
    assert b.rows and all(r.ms >= 0 and r.calls > 0 for r in b.rows)
    assert sum(r.share for r in b.rows) == pytest.approx(1.0, abs=0.02)
    conv = rows["aten::convolution_backward"]
    assert conv.modelled and conv.bytes > 0 and conv.binds in ("compute", "memory") and conv.gflops > 0


@pytest.mark.parametrize("workload", W.MODEL_QUICK_WORKLOADS, ids=[w[0] for w in W.MODEL_QUICK_WORKLOADS])
def test_aefast_step_counts_executed_sparse_flops(workload):
    """aefast's conv-family kernels replace eager's convs one for one: their dense equivalents add
    up to FlopCounterMode's count of the eager step, and they execute 1/(pool window) of it in the
    sparse parts (the encoder backward, the decoder with pool 2); the ConvVAE decoder has pool 1."""
    b = B.profile_breakdown(_step(workload, "aefast"), steps=1, **LIMITS)
    counted = _counted(_step(workload, "eager"))
    rows = _rows(b)
    # The ConvVAE decoder's blocks are conv_transpose_act2d, rows of their own: their forms (oneDNN,
    # GEMM + col2im, the gather kernel, the direct weight grad) do not all nest a modelled op.
    vae = workload[1] == "ConvVAE"
    decoder_ops = ({"aefast::conv_transpose_act2d", "aefast::conv_transpose_act2d_backward"} if vae else
                   {"aefast::unpool_conv_transpose2d", "aefast::unpool_conv_transpose2d_backward"})
    assert {"aefast::conv_pool2d_forward", "aefast::conv_pool2d_backward_weight"} | decoder_ops <= set(rows)
    dense = sum(r.dense_flops for op, r in rows.items() if op in CONV_OPS)
    assert dense == counted["convolution"] + counted["convolution_backward"]
    # The encoder forward is dense on these even shapes; its backward is sparse by the 2x2 window.
    fwd = rows["aefast::conv_pool2d_forward"]
    assert fwd.flops == fwd.dense_flops > 0
    for op in ("aefast::conv_pool2d_backward_weight", "aefast::conv_pool2d_backward_input",
               "aefast::conv_pool2d_backward"):
        if op in rows:
            assert rows[op].flops * 4 == rows[op].dense_flops
    for op in decoder_ops:  # the unpool decoder executes 1/4 of the dense MACs; the upsampler all
        assert rows[op].flops * (1 if vae else 4) == rows[op].dense_flops > 0
    # Not every op is modelled; those that are not carry a time and nothing else.
    for r in b.rows:
        if not r.modelled:
            assert r.flops == r.bytes == 0 and r.binds == ""


@pytest.mark.parametrize("transposed", [False, True])
def test_conv_formula_odd_geometry(transposed):
    """stride 2, padding 1/0, dilation 2, groups 2, output_padding 1, odd sizes: FLOPs as
    FlopCounterMode, bytes = inputs + output once."""
    x = torch.randn(3, 4, 11, 9)
    if transposed:
        w, b = torch.randn(4, 3, 3, 2), torch.randn(6)
        fn = lambda: F.conv_transpose2d(x, w, b, stride=2, padding=(1, 0), output_padding=1, groups=2, dilation=2)  # noqa: E731
        name = "aten::conv_transpose2d"
    else:
        w, b = torch.randn(6, 2, 3, 2), torch.randn(6)
        fn = lambda: F.conv2d(x, w, b, stride=2, padding=(1, 0), dilation=2, groups=2)  # noqa: E731
        name = "aten::conv2d"
    out = fn()
    bd = B.profile_breakdown(fn, steps=1, **LIMITS)
    row = _rows(bd)[name]
    assert row.flops == _counted(fn)["convolution"] > 0
    assert row.bytes == 4 * (x.numel() + w.numel() + b.numel() + out.numel())


def test_autocast_conv_counts_the_dtype_it_computes_in():
    """Under bf16 autocast the outer aten::conv2d gets fp32 arguments, casts them and calls
    conv2d again: one row, with the bf16 call's bytes and the whole call's time."""
    x, w, b = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3), torch.randn(4)

    def fn():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.conv2d(x, w, b, 1, 1)

    out = fn()
    assert out.dtype == torch.bfloat16
    row = _rows(B.profile_breakdown(fn, steps=1, **LIMITS))["aten::conv2d"]
    assert row.calls == 1 and row.flops == _counted(fn)["convolution"]
    assert row.bytes == 2 * (x.numel() + w.numel() + b.numel() + out.numel())


def test_sparse_kernel_formulas_by_hand():
    """The aefast formulas against hand counts on one encoder and one decoder call."""
    n, cin, cout, h, w, k = 2, 3, 5, 9, 7, 3  # odd: the conv row/col that feeds no window is skipped
    args = [None, None, None, [1, 1], [1, 1], 1, 0.01, [2, 2]]
    fwd = B.op_cost("aefast::conv_pool2d_forward", [[n, cin, h, w], [cout, cin, k, k], [cout]] + [[]] * 5,
                    ["float"] * 3 + ["ScalarList", "ScalarList", "Scalar", "Scalar", "ScalarList"], args)
    ho, wo = h // 2, w // 2
    assert fwd.flops == 2 * n * cout * (2 * ho) * (2 * wo) * cin * k * k
    assert fwd.dense_flops == 2 * n * cout * h * w * cin * k * k
    assert fwd.bytes == 4 * (n * cin * h * w + cout * cin * k * k + cout) + n * cout * ho * wo * (4 + 1 + 4)
    bwd = B.op_cost("aefast::conv_pool2d_backward_input",
                    [[n, cout, ho, wo], [n, cout, ho, wo], [n, cout, ho, wo], [cout, cin, k, k]] + [[]] * 6,
                    ["float", "unsigned char", "float", "float"] + ["ScalarList"] * 6,
                    [None] * 4 + [[h, w], [1, 1], [1, 1], 1, 0.01, [2, 2]])
    assert bwd.flops == 2 * n * cout * ho * wo * cin * k * k and bwd.dense_flops == 4 * bwd.flops
    assert bwd.bytes == n * cout * ho * wo * (4 + 1 + 4) + 4 * cout * cin * k * k + 4 * n * cin * h * w
    # Decoder: z (2, 5, 4, 3) with uint8 window offsets into an (8, 7) unpooled plane.
    z, unpooled = [n, cout, 4, 3], [8, 7]
    dec = B.op_cost("aefast::unpool_conv_transpose2d",
                    [z, z, [cout, cin, k, k], [cin]] + [[]] * 7,
                    ["float", "unsigned char", "float", "float"] + ["ScalarList"] * 7,
                    [None] * 4 + [[2, 2], unpooled, [1, 1], [1, 1], [0, 0], None, 0.01])
    zn = math.prod(z)
    assert dec.flops == 2 * zn * cin * k * k and dec.dense_flops == 4 * dec.flops
    assert dec.bytes == zn * (4 + 1) + 4 * (cout * cin * k * k + cin) + 4 * n * cin * 8 * 7


def test_unmodelled_ops_are_listed_with_time_only():
    """linalg_qr is not in the table: it is a row with its own time (what its nested modelled
    ops, a copy_, do not account for) and no FLOPs or bytes, marked so in the markdown."""
    x = torch.randn(64, 64)
    b = B.profile_breakdown(lambda: torch.linalg.qr(x), steps=1, **LIMITS)
    qr = _rows(b)["aten::linalg_qr"]
    assert not qr.modelled and qr.ms > 0 and qr.flops == qr.bytes == qr.gflops == 0 and qr.binds == ""
    assert sum(r.share for r in b.rows) == pytest.approx(1.0, abs=0.02)
    table = B.breakdown_table("qr", b, min_share=0)
    assert "| aten::linalg_qr |" in table and "not modelled (time only)" in table


def test_ratio_table_leaves_out_empty_columns():
    rows = [H.Row("c", "eager", 1e-3, 10, flops=1e6), H.Row("c", "aefast", 5e-4, 5, flops=1e6)]
    table = H.ratio_table(rows, "eager", peak_gflops=100.0)
    assert "GFLOP/s" in table and "GB/s" not in table
    rows = [H.Row("c", "eager", 1e-3, 10, bytes_moved=1e6)]
    table = H.ratio_table(rows, "eager", peak_gbps=10.0)
    assert "GB/s" in table and "GFLOP/s" not in table and "1.0 (10% of copy)" in table


def test_limits_are_measured_around_the_profile_when_not_given():
    x, w = torch.randn(2, 3, 8, 8), torch.randn(4, 3, 3, 3)
    b = B.profile_breakdown(lambda: F.conv2d(x, w), steps=1)
    assert b.peak_gflops > 0 and b.peak_gbps > 0 and b.peak_label == "GEMM peak (fp32)"
    row = _rows(b)["aten::conv2d"]
    assert row.pct_flops_peak == pytest.approx(100 * row.gflops / b.peak_gflops)
    assert f"GEMM peak (fp32) {b.peak_gflops:.1f} GFLOP/s" in B.breakdown_table("conv", b)
