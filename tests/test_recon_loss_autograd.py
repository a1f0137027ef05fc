"""The eager C++ autograd entry of the fused loss (csrc/recon_loss_autograd.cpp).

Eager calls on plain tensors go through aefast._C.recon_loss_autograd, whose backward node is
C++; torch.compile and tensor subclasses go through the formula registered in Python. Both must
give torch's gradients, for every incoming-gradient shape, and stay safe where the node returns
its saved buffer without a copy (grad_output == 1)."""
import pytest
import torch
import torch.nn.functional as F

import aefast
import aefast.functional as AF
from aefast import _C
from conftest import backend_device

KINDS = {
    "mse": lambda x, t, r: F.mse_loss(x, t, reduction=r),
    "l1": lambda x, t, r: F.l1_loss(x, t, reduction=r),
    "huber": lambda x, t, r: F.huber_loss(x, t, reduction=r),
    "bce": lambda x, t, r: F.binary_cross_entropy(x, t, reduction=r),
    "bce_logits": lambda x, t, r: F.binary_cross_entropy_with_logits(x, t, reduction=r),
}


def torch_loss(kind, x, t, reduction):
    if reduction == "per_sample":
        return KINDS[kind](x, t, "none").reshape(x.shape[0], -1).mean(1)
    return KINDS[kind](x, t, reduction)


def pair(kind, shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "bce":
        x = torch.rand(shape, generator=g) * 0.9 + 0.05
    else:
        x = torch.randn(shape, generator=g)
    t = torch.rand(shape, generator=g)
    return x.to(device), t.to(device)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "per_sample"])
@pytest.mark.parametrize("wrt", ["input", "target", "both"])
def test_gradients_for_any_incoming_gradient(kernel_backend, kind, reduction, wrt):
    """A non-unit incoming gradient (scalar, per sample or elementwise) takes the scaling or
    recompute path of the node, never the returned-as-is buffer."""
    device = backend_device(kernel_backend)
    x0, t0 = pair(kind, (3, 2, 5), device)
    grads = {}
    for name, fn in (("aefast", lambda x, t: AF.reconstruction_loss(x, t, kind, reduction)),
                     ("torch", lambda x, t: torch_loss(kind, x, t, reduction))):
        x = x0.clone().requires_grad_(wrt in ("input", "both"))
        t = t0.clone().requires_grad_(wrt in ("target", "both"))
        loss = fn(x, t)
        g = torch.linspace(-1.5, 2.0, loss.numel(), device=device).reshape(loss.shape)
        leaves = [v for v in (x, t) if v.requires_grad]
        grads[name] = torch.autograd.grad(loss, leaves, g)
    for a, b in zip(grads["aefast"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_eager_calls_use_the_cpp_node():
    x, t = pair("mse", (4, 5), "cpu")
    x.requires_grad_()
    assert AF.mse_loss(x, t).grad_fn.name() == "aefast::ReconLossBackward"
    with torch.no_grad():
        assert AF.mse_loss(x, t).grad_fn is None
    assert AF.mse_loss(x.detach(), t).grad_fn is None


def test_repeated_backward_through_a_retained_graph_accumulates_exactly():
    """The first backward may hand the saved buffer itself to x.grad; later ones must still add
    the unmodified gradient (AccumulateGrad must not have accumulated into the saved buffer)."""
    x, t = pair("mse", (4, 5), "cpu")
    x.requires_grad_()
    loss = AF.mse_loss(x, t)
    for _ in range(3):
        loss.backward(retain_graph=True)
    torch.testing.assert_close(x.grad, 3 * 2 * (x - t).detach() / x.numel())


def test_modified_returned_gradient_is_detected_not_reused():
    x, t = pair("l1", (4, 5), "cpu")
    x.requires_grad_()
    loss = AF.l1_loss(x, t)
    (g,) = torch.autograd.grad(loss, x, retain_graph=True)
    g.mul_(5)  # the caller owns the returned gradient; the graph's copy is version-checked
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, x)


def test_graph_is_freed_after_backward():
    x, t = pair("mse", (4, 5), "cpu")
    x.requires_grad_()
    loss = AF.mse_loss(x, t)
    loss.backward()
    with pytest.raises(RuntimeError, match="second time|already been freed"):
        loss.backward()


def test_double_backward_refused():
    x, t = pair("huber", (3, 4), "cpu")
    x = x.double().requires_grad_()
    loss = AF.huber_loss(x, t.double(), reduction="sum")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, x, create_graph=True)


def test_weight_requiring_grad_is_refused_by_the_entry():
    x, t = pair("mse", (3, 4), "cpu")
    w = torch.rand(3, 4, requires_grad=True)
    with pytest.raises(RuntimeError, match="does not differentiate weight"):
        _C.recon_loss_autograd("aefast", x.requires_grad_(), t, w, None, "mse", "sum", 1.0)


def test_loss_used_twice_gets_the_summed_incoming_gradient():
    x, t = pair("mse", (3, 4), "cpu")
    x.requires_grad_()
    loss = AF.mse_loss(x, t)
    (2 * loss + loss).backward()  # incoming gradient 3: the scaling path
    torch.testing.assert_close(x.grad, 3 * 2 * (x - t).detach() / x.numel())


def test_hooks_and_anomaly_mode_see_the_node():
    x, t = pair("bce_logits", (3, 4), "cpu")
    x.requires_grad_()
    seen = []
    loss = AF.binary_cross_entropy_with_logits(x, t)
    loss.grad_fn.register_hook(lambda grad_inputs, grad_outputs: seen.append(grad_inputs[0].shape))
    with torch.autograd.detect_anomaly(check_nan=True):
        loss.backward()
    assert seen == [x.shape]
    torch.testing.assert_close(x.grad, torch.autograd.grad(
        F.binary_cross_entropy_with_logits(x, t), x)[0])


def test_module_in_a_training_step_matches_torch():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 6)
    twin = torch.nn.Linear(6, 6)
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(8, 6)
    aefast.nn.ReconstructionLoss("mse")(layer(x), x).backward()
    F.mse_loss(twin(x), x).backward()
    torch.testing.assert_close(layer.weight.grad, twin.weight.grad)
    torch.testing.assert_close(layer.bias.grad, twin.bias.grad)


def test_forward_mode_ad_raises_instead_of_dropping_the_tangent():
    import torch.autograd.forward_ad as fwAD

    x, t = pair("mse", (3, 4), "cpu")
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            AF.mse_loss(dual, t)


def test_torch_func_grad_is_right_or_refused():
    """torch.func transforms take the registered op (the C++ entry is for plain eager calls);
    whatever that path supports must agree with torch, anything else must raise."""
    x, t = pair("l1", (3, 4), "cpu")
    try:
        got = torch.func.grad(lambda v: AF.l1_loss(v, t))(x)
    except RuntimeError as err:
        assert "functorch" in str(err) or "aefast" in str(err)
    else:
        torch.testing.assert_close(got, torch.func.grad(lambda v: F.l1_loss(v, t))(x))


def test_concurrent_python_threads(kernel_backend):
    """The entry releases the GIL around the kernel (the Triton twins take it back): threads
    running losses and backwards at once each get their own right answer."""
    import threading

    device = backend_device(kernel_backend)
    results, errors = {}, []

    def work(i):
        try:
            x, t = pair("huber", (4, 3, 9), device, seed=i)
            x.requires_grad_()
            for _ in range(5):
                (g,) = torch.autograd.grad(AF.huber_loss(x, t, reduction="sum"), x)
            results[i] = (g, torch.autograd.grad(F.huber_loss(x, t, reduction="sum"), x)[0])
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert len(results) == 4
    for got, want in results.values():
        torch.testing.assert_close(got, want)
