"""recon_loss family, losses: every drop-in against torch.nn.functional (value and gradient,
every reduction, every dtype) on each backend, per_sample, extremes, gradcheck, opcheck,
bad inputs and the fallback accounting."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import aefast
import aefast.functional as AF
from aefast.nn import ReconstructionLoss
from conftest import TOLERANCES, backend_device

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "mean", "sum"]
DROP_INS = {
    "mse_loss": (F.mse_loss, {}),
    "l1_loss": (F.l1_loss, {}),
    "huber_loss": (F.huber_loss, {"delta": 0.7}),
    "binary_cross_entropy": (F.binary_cross_entropy, {}),
    "binary_cross_entropy_with_logits": (F.binary_cross_entropy_with_logits, {}),
}
KIND_OF = {"mse_loss": "mse", "l1_loss": "l1", "huber_loss": "huber", "binary_cross_entropy": "bce",
           "binary_cross_entropy_with_logits": "bce_logits"}
TORCH_OF_KIND = {v: k for k, v in KIND_OF.items()}


def make_pair(name_or_kind, shape, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    kind = KIND_OF.get(name_or_kind, name_or_kind)
    if kind == "bce":
        x = torch.rand(shape, generator=g, dtype=torch.float64) * 0.9 + 0.05
        t = torch.rand(shape, generator=g, dtype=torch.float64)
    elif kind == "bce_logits":
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
        t = torch.rand(shape, generator=g, dtype=torch.float64)
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        t = torch.randn(shape, generator=g, dtype=torch.float64)
    return x.to(dtype).to(device), t.to(dtype).to(device)


def value_and_grads(fn, x, t, grad_seed=1, **kw):
    x = x.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out = fn(x, t, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    out.backward(g.to(out.dtype).to(out.device))
    return out, x.grad, t.grad


def truth(name, x, t, **kw):
    """torch's own function in fp64 on the same (rounded) inputs: the value every dtype aims at."""
    fn, _ = DROP_INS[name]
    out, gx, gt = value_and_grads(fn, x.double(), t.double(), **kw)
    return out, gx, gt


def assert_close(actual, expected, dtype, **extra):
    tol = dict(TOLERANCES[dtype])
    tol.update(extra)
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), equal_nan=True, **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(DROP_INS))
def test_drop_in_matches_torch(backend, device, name, reduction, dtype):
    x, t = make_pair(name, (3, 17, 5), dtype, device)
    _, kw = DROP_INS[name]
    out, gx, gt = value_and_grads(getattr(AF, name), x, t, reduction=reduction, **kw)
    ref_out, ref_gx, ref_gt = truth(name, x, t, reduction=reduction, **kw)
    assert out.dtype == dtype and out.shape == ref_out.shape
    assert_close(out, ref_out, dtype)
    # bce's gradient is (x-t)/(x(1-x)): values up to ~20 here, so fp16/bf16 need their relative tolerance.
    assert_close(gx, ref_gx, dtype)
    assert_close(gt, ref_gt, dtype)
    if backend != "reference":
        assert not aefast.info()["fallbacks"], aefast.info()["fallbacks"]


@pytest.mark.parametrize("name", list(DROP_INS))
def test_drop_in_matches_torch_same_dtype_fp32(kernel_backend, name):
    """Against torch's own fp32 result (not only the fp64 truth), input and target grads."""
    device = backend_device(kernel_backend)
    x, t = make_pair(name, (2, 3, 9, 7), torch.float32, device, seed=5)
    fn, kw = DROP_INS[name]
    for reduction in REDUCTIONS:
        a = value_and_grads(getattr(AF, name), x, t, reduction=reduction, **kw)
        b = value_and_grads(fn, x, t, reduction=reduction, **kw)
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("weighted", ["weight", "pos_weight", "both"])
def test_bce_logits_weights(backend, device, weighted):
    x, t = make_pair("bce_logits", (4, 6), torch.float32, device)
    g = torch.Generator().manual_seed(2)
    w = torch.rand((4, 6), generator=g).to(device) if weighted in ("weight", "both") else None
    pw = (torch.rand((4, 6), generator=g) * 3).to(device) if weighted in ("pos_weight", "both") else None
    for reduction in REDUCTIONS:
        a = value_and_grads(AF.binary_cross_entropy_with_logits, x, t, weight=w, pos_weight=pw, reduction=reduction)
        b = value_and_grads(F.binary_cross_entropy_with_logits, x, t, weight=w, pos_weight=pw, reduction=reduction)
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    if backend != "reference":
        assert not aefast.info()["fallbacks"]


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "huber_loss", "binary_cross_entropy"])
def test_elementwise_weight(backend, device, name):
    x, t = make_pair(name, (5, 7), torch.float32, device)
    w = torch.rand((5, 7), generator=torch.Generator().manual_seed(4)).to(device)
    fn, kw = DROP_INS[name]
    for reduction in REDUCTIONS:
        a = value_and_grads(getattr(AF, name), x, t, weight=w, reduction=reduction, **kw)
        b = value_and_grads(fn, x, t, weight=w, reduction=reduction, **kw)
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_broadcast_weights_fall_back_counted():
    """Broadcast weights and pos_weight (per class) are served by the reference, and counted."""
    x, t = make_pair("bce_logits", (4, 6), torch.float32)
    pw = torch.rand(6) * 3
    w = torch.rand(6)
    a = value_and_grads(AF.binary_cross_entropy_with_logits, x, t, weight=w, pos_weight=pw)
    b = value_and_grads(F.binary_cross_entropy_with_logits, x, t, weight=w, pos_weight=pw)
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q)
    fallbacks = aefast.info()["fallbacks"]
    assert any("binary_cross_entropy_with_logits: weight broadcasts" in k for k in fallbacks), fallbacks


def test_weight_requiring_grad_falls_back_with_right_grad():
    x, t = make_pair("mse", (3, 4), torch.float64)
    w = torch.rand(3, 4, dtype=torch.float64, requires_grad=True)
    AF.mse_loss(x, t, weight=w).backward()
    gw = w.grad.clone()
    w.grad = None
    F.mse_loss(x, t, weight=w).backward()
    torch.testing.assert_close(gw, w.grad)
    assert any("weight requires grad" in k for k in aefast.info()["fallbacks"])


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "huber_loss"])
def test_broadcast_target_warns_like_torch(name):
    x = torch.randn(4, 5, requires_grad=True)
    t = torch.randn(5)
    fn, kw = DROP_INS[name]
    with pytest.warns(UserWarning, match="different to the input size"):
        a = getattr(AF, name)(x, t, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = fn(x, t, **kw)
    torch.testing.assert_close(a, b)
    assert any("target broadcasts" in k for k in aefast.info()["fallbacks"])


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "binary_cross_entropy"])
def test_legacy_size_average_reduce(name):
    x, t = make_pair(name, (3, 4), torch.float32)
    fn, _ = DROP_INS[name]
    for size_average, reduce in [(False, None), (None, False), (True, True), (False, True)]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = getattr(AF, name)(x, t, size_average=size_average, reduce=reduce)
            b = fn(x, t, size_average=size_average, reduce=reduce)
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- extremes

def test_extreme_logits(backend, device):
    x = torch.tensor([[-100.0, 100.0, -100.0, 100.0, 0.0, 30.0, -30.0, 88.0]], device=device)
    t = torch.tensor([[0.0, 1.0, 1.0, 0.0, 0.5, 1.0, 0.0, 0.3]], device=device)
    pw = torch.full_like(x, 2.5)
    for kw in ({}, {"pos_weight": pw}):
        for reduction in REDUCTIONS:
            a = value_and_grads(AF.binary_cross_entropy_with_logits, x, t, reduction=reduction, **kw)
            b = value_and_grads(F.binary_cross_entropy_with_logits, x.double(), t.double(), reduction=reduction,
                                **{k: v.double() for k, v in kw.items()})
            for p, q in zip(a, b):
                assert torch.isfinite(p).all()
                torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-5)


def test_probabilities_exactly_zero_and_one(backend, device):
    """Values (each log clamped at -100) and torch's gradient formulas at p = 0 and 1: input
    grad (x-t)/max(x(1-x), 1e-12), target grad -logit(x) (±inf). The reference twin is plain
    autograd over the clamped logs, whose subgradients differ there, so it is held to values."""
    x = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.5, 1e-30], dtype=torch.float64, device=device)
    t = torch.tensor([0.0, 1.0, 1.0, 0.0, 0.5, 1.0], dtype=torch.float64, device=device)
    for reduction in REDUCTIONS:
        a = value_and_grads(AF.binary_cross_entropy, x, t, reduction=reduction)
        b = value_and_grads(F.binary_cross_entropy, x, t, reduction=reduction)
        for p, q in zip(a, b) if backend != "reference" else [(a[0], b[0])]:
            # gradients of about 1e12 (torch's 1e-12 floor): rounding order gives ~1e-9 relative
            torch.testing.assert_close(p, q, rtol=1e-7, atol=1e-10)
        assert a[0].max() <= 100 * 6  # every log is clamped at -100


@pytest.mark.parametrize("name", ["mse_loss", "l1_loss", "huber_loss", "binary_cross_entropy_with_logits"])
def test_nan_propagates_like_torch(backend, device, name):
    x, t = make_pair(name, (2, 5), torch.float32, device)
    x[0, 1] = math.nan
    t[1, 3] = math.nan
    fn, kw = DROP_INS[name]
    for reduction in REDUCTIONS:
        a = value_and_grads(getattr(AF, name), x, t, reduction=reduction, **kw)
        b = value_and_grads(fn, x, t, reduction=reduction, **kw)
        for p, q in zip(a, b):
            torch.testing.assert_close(p, q, equal_nan=True)


def test_bce_nan_and_out_of_range_rejected():
    for bad in (math.nan, -0.1, 1.5):
        x = torch.tensor([0.2, bad])
        with pytest.raises(ValueError, match="between 0 and 1"):
            AF.binary_cross_entropy(x, torch.zeros(2))
        with pytest.raises(RuntimeError, match="between 0 and 1"):  # torch agrees that it is an error
            F.binary_cross_entropy(x, torch.zeros(2))
        with pytest.raises(ValueError, match="bce_logits"):
            AF.reconstruction_loss(x, torch.zeros(2), kind="bce")


def test_empty_input_like_torch(backend, device):
    x = torch.empty(0, 3, device=device)
    for name in ("mse_loss", "binary_cross_entropy_with_logits"):
        for reduction in REDUCTIONS:
            a = getattr(AF, name)(x, x, reduction=reduction)
            b = DROP_INS[name][0](x, x, reduction=reduction)
            torch.testing.assert_close(a, b, equal_nan=True)


# ---------------------------------------------------------------- reconstruction_loss / per_sample

KINDS = ["mse", "l1", "huber", "bce", "bce_logits"]


@pytest.mark.parametrize("kind", KINDS)
def test_reconstruction_loss_reductions(backend, device, kind):
    x, t = make_pair(kind, (5, 3, 4, 3), torch.float32, device)
    name = TORCH_OF_KIND[kind]
    kw = {"delta": 0.7} if kind == "huber" else {}
    none = AF.reconstruction_loss(x, t, kind, "none", **kw)
    torch.testing.assert_close(none, DROP_INS[name][0](x, t, reduction="none", **kw))
    per = AF.reconstruction_loss(x, t, kind, "per_sample", **kw)
    assert per.shape == (5,)
    torch.testing.assert_close(per, none.reshape(5, -1).mean(1))
    torch.testing.assert_close(AF.reconstruction_loss(x, t, kind, "mean", **kw), none.mean())
    torch.testing.assert_close(AF.reconstruction_loss(x, t, kind, "sum", **kw), none.sum(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_per_sample_half_accumulates_in_fp32(kernel_backend, dtype):
    device = backend_device(kernel_backend)
    x, t = make_pair("mse", (3, 4000), dtype, device)  # long rows: an fp16 running sum would drift
    per = AF.reconstruction_loss(x, t, "mse", "per_sample")
    exact = ((x.double() - t.double()) ** 2).mean(1)
    assert_close(per, exact, dtype)
    assert_close(AF.reconstruction_loss(x, t, "mse", "sum"), exact.sum() * 4000, dtype)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("reduction", ["per_sample", "mean", "sum", "none"])
def test_gradcheck_fp64(kind, reduction):
    x, t = make_pair(kind, (3, 2, 5), torch.float64, seed=3)
    x.requires_grad_()
    t.requires_grad_()
    kw = {"delta": 0.7} if kind == "huber" else {}
    with aefast.set_backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b: AF.reconstruction_loss(a, b, kind, reduction, **kw), (x, t))
    assert not aefast.info()["fallbacks"]


def test_gradcheck_bce_logits_weights_fp64():
    x, t = make_pair("bce_logits", (3, 4), torch.float64, seed=3)
    w = torch.rand(3, 4, dtype=torch.float64)
    pw = torch.rand(3, 4, dtype=torch.float64) * 3
    x.requires_grad_()
    t.requires_grad_()
    with aefast.set_backend("cpu"):
        for reduction in REDUCTIONS:
            assert torch.autograd.gradcheck(
                lambda a, b: AF.binary_cross_entropy_with_logits(a, b, w, reduction=reduction, pos_weight=pw), (x, t))
            assert torch.autograd.gradcheck(
                lambda a, b: AF.binary_cross_entropy(torch.sigmoid(a), b, w, reduction=reduction), (x, t))


def test_only_target_requires_grad(kernel_backend):
    device = backend_device(kernel_backend)
    for name in ("mse_loss", "binary_cross_entropy"):
        x, t = make_pair(name, (3, 4), torch.float32, device)
        t1 = t.clone().requires_grad_()
        getattr(AF, name)(x, t1).backward()
        t2 = t.clone().requires_grad_()
        DROP_INS[name][0](x, t2).backward()
        torch.testing.assert_close(t1.grad, t2.grad)


def test_no_grad_computes_no_gradient_buffer():
    x, t = make_pair("mse", (4, 5), torch.float32)
    loss, gx, gt = torch.ops.aefast.recon_loss(x, t, None, None, "mse", "mean", 1.0, False, False)
    assert gx.numel() == 0 and gt.numel() == 0
    loss2, gx2, _ = torch.ops.aefast.recon_loss(x, t, None, None, "mse", "mean", 1.0, True, False)
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(gx2, 2 * (x - t) / x.numel())


def test_backward_twice_with_retained_graph():
    """The saved gradient is returned as is for grad_output == 1; a retained graph must not
    see it modified by gradient accumulation."""
    x, t = make_pair("mse", (4, 5), torch.float32)
    x.requires_grad_()
    loss = AF.mse_loss(x, t)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    try:
        loss.backward()
    except RuntimeError as e:  # accumulated in place into the saved buffer: torch's version check
        assert "modified by an inplace operation" in str(e)
    else:
        torch.testing.assert_close(x.grad, 2 * first)


def test_deterministic_reduction_independent_of_threads():
    x, t = make_pair("mse", (7, 50001), torch.float32)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(AF.reconstruction_loss(x, t, "mse", "sum"))
            results.append(AF.reconstruction_loss(x, t, "mse", "per_sample"))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[2]) and torch.equal(results[1], results[3])


@pytest.mark.parametrize("kind", ["mse", "l1", "huber", "bce_logits"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_threads_do_not_change_any_bit(kind, dtype):
    """Every reduction, with and without weight, gives the same bits on 1, 2 and 3 threads: the
    chunk boundaries and the lane order are fixed (now that the loops do run in parallel)."""
    x, t = make_pair(kind, (5, 3 * 2048 + 77), dtype)
    w = torch.rand(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            run = []
            for reduction in ("sum", "per_sample", "none"):
                xr = x.clone().requires_grad_()
                out = AF.reconstruction_loss(xr, t, kind, reduction)
                run += [out, torch.autograd.grad(out.sum(), xr)[0]]
            for weight in (None, w):
                if kind != "bce_logits":
                    xr = x.clone().requires_grad_()
                    fn = {"mse": AF.mse_loss, "l1": AF.l1_loss, "huber": AF.huber_loss}[kind]
                    out = fn(xr, t, reduction="sum", weight=weight)
                    run += [out, torch.autograd.grad(out, xr)[0]]
            runs.append(run)
    finally:
        torch.set_num_threads(before)
    for other in runs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(runs[0], other))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_equals_general_path(monkeypatch, dtype):
    """The eager fast path of the losses (plain tensors, no weight, no autocast: functional.
    _fast_loss) is taken for such calls and gives the same bits as the general path."""
    calls = []
    fast = AF._fast_loss

    def spy(*args, **kwargs):
        out = fast(*args, **kwargs)
        calls.append(out is not None)
        return out

    cases = [(AF.mse_loss, "mse", r) for r in REDUCTIONS] + [(AF.l1_loss, "l1", r) for r in REDUCTIONS]
    cases += [(lambda a, b, reduction: AF.huber_loss(a, b, reduction, delta=0.7), "huber", r) for r in REDUCTIONS]
    cases += [(lambda a, b, reduction, k=k: AF.reconstruction_loss(a, b, k, reduction), k, r)
              for k in ("mse", "l1", "huber", "bce_logits") for r in REDUCTIONS + ["per_sample"]]

    def run_all():
        res = []
        for fn, kind, reduction in cases:
            x, t = make_pair(kind, (3, 5, 7), dtype)
            x.requires_grad_()
            t.requires_grad_()
            out = fn(x, t, reduction=reduction)
            res += [out, *torch.autograd.grad(out.sum(), (x, t))]
        return res

    monkeypatch.setattr(AF, "_fast_loss", spy)
    with aefast.set_backend("cpu"):
        via_fast = run_all()
        assert calls and all(calls)
        monkeypatch.setattr(AF, "_fast_loss", lambda *a, **k: None)
        general = run_all()
    assert all(torch.equal(a, b) for a, b in zip(via_fast, general))


def test_fast_path_leaves_autocast_and_reference_to_the_general_path():
    x, t = make_pair("mse", (4, 6), torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert AF._fast_loss("mse", x, t, "mean", REDUCTIONS) is None
        assert AF.mse_loss(x, t).dtype == F.mse_loss(x, t).dtype == torch.float32  # fp32 list, as torch
    with aefast.set_backend("reference"):
        assert AF._fast_loss("mse", x, t, "mean", REDUCTIONS) is None
    assert AF._fast_loss("mse", x, t.float(), "mean", REDUCTIONS) is None  # dtypes differ: the general path raises
    assert AF._fast_loss("mse", x, t, "avg", REDUCTIONS) is None
    with pytest.raises(TypeError, match="dtypes differ"):
        AF.mse_loss(x, t.float())


def test_module(backend, device):
    x, t = make_pair("bce_logits", (3, 5), torch.float32, device)
    m = ReconstructionLoss("bce_logits", "per_sample")
    torch.testing.assert_close(m(x, t), F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1))
    assert "bce_logits" in repr(m)
    with pytest.raises(ValueError, match="unknown loss kind"):
        ReconstructionLoss("cross_entropy")


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(KINDS), reduction=st.sampled_from(["none", "mean", "sum", "per_sample"]),
       shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), seed=st.integers(0, 1000),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_fuzz_cpu_against_reference(kind, reduction, shape, seed, dtype):
    x, t = make_pair(kind, tuple(shape), dtype, seed=seed)
    with aefast.set_backend("cpu"):
        a = value_and_grads(lambda p, q: AF.reconstruction_loss(p, q, kind, reduction), x, t)
    with aefast.set_backend("reference"):
        b = value_and_grads(lambda p, q: AF.reconstruction_loss(p, q, kind, reduction), x, t)
    for p, q in zip(a, b):
        assert_close(p, q, dtype, rtol=1e-5 if dtype == torch.float32 else 1e-9)


# ---------------------------------------------------------------- opcheck

OPCHECK_CASES = [("mse", "mean"), ("l1", "none"), ("huber", "sum"), ("bce", "per_sample"), ("bce_logits", "mean")]


@pytest.mark.parametrize("namespace", ["aefast", "aefast_triton"])
@pytest.mark.parametrize("kind,reduction", OPCHECK_CASES)
def test_opcheck_recon_loss(namespace, kind, reduction):
    if namespace == "aefast_triton" and not aefast.backend.availability()["triton"][0]:
        pytest.skip("triton unavailable")
    x, t = make_pair(kind, (3, 5), torch.float32)
    x.requires_grad_()
    t.requires_grad_()
    op = getattr(torch.ops, namespace).recon_loss.default
    w = torch.rand(3, 5) if kind in ("bce", "mse") else None
    pw = torch.rand(3, 5) + 0.5 if kind == "bce_logits" else None
    torch.library.opcheck(op, (x, t, w, pw, kind, reduction, 0.7, True, True))
    torch.library.opcheck(op, (x.detach(), t.detach(), w, pw, kind, reduction, 0.7, False, False))


@pytest.mark.parametrize("namespace", ["aefast", "aefast_triton"])
def test_opcheck_loss_grad_scale(namespace):
    if namespace == "aefast_triton" and not aefast.backend.availability()["triton"][0]:
        pytest.skip("triton unavailable")
    op = getattr(torch.ops, namespace).loss_grad_scale.default
    saved = torch.randn(3, 4, 2)
    for g in (torch.tensor(0.7), torch.randn(3), torch.randn(3, 4, 2)):
        torch.library.opcheck(op, (g.requires_grad_(), saved.clone().requires_grad_(), -1.0))
        expect = -saved * (g.reshape(3, 1, 1) if g.dim() == 1 else g)
        torch.testing.assert_close(op(g, saved, -1.0), expect)


# ---------------------------------------------------------------- bad inputs

def test_bad_inputs():
    x = torch.rand(3, 4)
    with pytest.raises(TypeError, match="torch.Tensor"):
        AF.mse_loss(x.tolist(), x)
    with pytest.raises(TypeError, match="dtype"):
        AF.mse_loss(x, x.long())
    with pytest.raises(TypeError, match="dtypes differ"):
        AF.l1_loss(x, x.double())
    with pytest.raises(ValueError, match="reduction"):
        AF.mse_loss(x, x, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        AF.mse_loss(x, x, reduction="per_sample")  # only reconstruction_loss has per_sample
    with pytest.raises(ValueError, match="does not broadcast"):
        AF.mse_loss(x, torch.rand(5))
    with pytest.raises(ValueError, match="delta"):
        AF.huber_loss(x, x, delta=0.0)
    with pytest.raises(TypeError, match="delta"):
        AF.huber_loss(x, x, delta="1")
    with pytest.raises(ValueError, match="target size"):
        AF.binary_cross_entropy(x, torch.rand(4))
    with pytest.raises(ValueError, match="does not broadcast"):
        AF.binary_cross_entropy(x, x, weight=torch.rand(5))
    with pytest.raises(ValueError, match="pos_weight"):
        AF.binary_cross_entropy_with_logits(x, x, pos_weight=torch.rand(7))
    with pytest.raises(ValueError, match="unknown loss kind"):
        AF.reconstruction_loss(x, x, kind="ce")
    with pytest.raises(ValueError, match="batch dim"):
        AF.reconstruction_loss(torch.tensor(0.5), torch.tensor(0.5), reduction="per_sample")
    with pytest.raises(ValueError, match="delta"):
        AF.reconstruction_loss(x, x, kind="huber", delta=-1.0)
    with pytest.raises(ValueError, match="target size"):
        AF.reconstruction_loss(x, x[:2])


def test_weight_must_have_input_size():
    x = torch.rand(3, 4)
    for name in ("mse_loss", "l1_loss", "huber_loss"):
        with pytest.raises(ValueError, match="same size"):
            getattr(AF, name)(x, x, weight=torch.rand(4))
        with pytest.raises(ValueError, match="same size"):
            DROP_INS[name][0](x, x, weight=torch.rand(4))


def test_double_backward_refused_not_wrong():
    x, t = make_pair("mse", (3, 4), torch.float64)
    x.requires_grad_()
    loss = AF.mse_loss(x, t)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_torch_compile_fullgraph():
    """The registered op (fake + autograd) path under torch.compile(fullgraph=True)."""
    x, t = make_pair("bce_logits", (4, 6), torch.float32)

    def f(a, b):
        return AF.reconstruction_loss(a, b, "bce_logits", "per_sample").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with aefast.set_backend("cpu"):
        xa = x.clone().requires_grad_()
        out = compiled(xa, t)
        out.backward()
    xb = x.clone().requires_grad_()
    F.binary_cross_entropy_with_logits(xb, t, reduction="none").mean(1).sum().backward()
    torch.testing.assert_close(out, F.binary_cross_entropy_with_logits(x, t, reduction="none").mean(1).sum())
    torch.testing.assert_close(xa.grad, xb.grad)


def test_fp32_transcendentals_sweep(kernel_backend):
    """The CPU kernels use their own vectorisable float exp/log (Cephes, ~1 ulp): sweep them
    over the whole range, subnormals and the exact 0/1 endpoints included, against fp64 torch."""
    device = backend_device(kernel_backend)
    x = torch.linspace(-100, 100, 20001, device=device)
    t = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)).to(device)
    a = value_and_grads(AF.binary_cross_entropy_with_logits, x, t, reduction="none")
    b = value_and_grads(F.binary_cross_entropy_with_logits, x.double(), t.double(), reduction="none")
    # |x| up to 100: fp32 rounding of (1-t)*x alone is ~1e-5 absolute (torch's own fp32 too)
    for p, q in zip(a, b):
        torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=2e-5)
    p = torch.cat([torch.logspace(-44, 0, 4001), 1 - torch.logspace(-7, -0.5, 1001),
                   torch.tensor([0.0, 1.0, 1e-45, 5e-39])]).to(device)
    t = torch.rand(p.shape, generator=torch.Generator().manual_seed(1)).to(device)
    a = value_and_grads(AF.binary_cross_entropy, p, t, reduction="none")
    b = value_and_grads(F.binary_cross_entropy, p.double(), t.double(), reduction="none")
    torch.testing.assert_close(a[0].double(), b[0], rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(a[1].double(), b[1], rtol=2e-6, atol=1e-6)
    # the target gradient -logit(p) is ±inf at 0 and 1, and torch's fp64 value for a p that
    # is exact in fp32
    torch.testing.assert_close(a[2].double(), b[2], rtol=2e-6, atol=1e-5)


def test_portable_baseline_kernels_match_torch(tmp_path):
    """The SSE2 baseline build of the loss kernels (the AVX2 one serves this machine): same
    results, checked in a fresh process with AEFAST_CPU_ISA=baseline."""
    import os
    import subprocess
    import sys

    script = tmp_path / "baseline.py"
    script.write_text(
        "import torch, torch.nn.functional as F, aefast, aefast.functional as AF\n"
        "aefast.set_backend('cpu')\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(7, 3001, generator=g) * 4\n"
        "p = torch.rand(7, 3001, generator=g)\n"
        "t = torch.rand(7, 3001, generator=g)\n"
        "for fn, a in ((F.mse_loss, x), (F.l1_loss, x), (F.huber_loss, x), (F.binary_cross_entropy, p),\n"
        "              (F.binary_cross_entropy_with_logits, x)):\n"
        "    for red in ('none', 'mean', 'sum'):\n"
        "        a1 = a.clone().requires_grad_(); a2 = a.clone().requires_grad_()\n"
        "        o1 = getattr(AF, fn.__name__)(a1, t, reduction=red); o2 = fn(a2, t, reduction=red)\n"
        "        torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)\n"
        "        torch.testing.assert_close(torch.autograd.grad(o1.sum(), a1)[0], torch.autograd.grad(o2.sum(), a2)[0],\n"
        "                                   rtol=1e-5, atol=1e-6)\n"
        "print('baseline ok')\n")
    env = dict(os.environ, AEFAST_CPU_ISA="baseline")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "baseline ok" in res.stdout, res.stderr[-3000:]
