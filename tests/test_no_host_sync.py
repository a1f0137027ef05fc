"""No host sync on the CUDA path, shown without a GPU.

Every public op of aefast.functional, and a ConvAutoencoder training step (forward, loss,
backward, optimizer step), runs on FakeTensorMode tensors placed on device "cuda", with the
backend resolving to cuda or triton as on a GPU machine (availability is faked here; the fake
functions registered for every aefast op, and for its aefast_triton twin, stand in for the
kernels). A fake tensor has no data: anything that reads a value back to the host (.item(),
int(), bool(), nonzero(), a data-dependent shape) raises there, so each test fails on any host
sync. Index validation stays at its default (on): a user's indices are checked on the device
(torch._assert_async), and the indices of aefast's own encoder are trusted, never checked.
"""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import aefast
import aefast.functional as AF
from aefast import backend as _backend
from aefast import validation
from aefast._extension import BUILD_INFO


# A CPU-only torch has no CUDA device guard, and autograd asks one for the stream of every CUDA
# tensor it records (the process aborts without it). A no-op guard (c10's own NoOpDeviceGuardImpl,
# one device, one stream) stands in; nothing else about the tensors is real anyway. (It stays
# registered for the rest of the process: nothing else on a CPU-only torch uses CUDA devices.)
_NO_OP_CUDA_GUARD = """
#include <c10/core/impl/DeviceGuardImplInterface.h>
namespace {
C10_REGISTER_GUARD_IMPL(CUDA, c10::impl::NoOpDeviceGuardImpl<c10::DeviceType::CUDA>);
}
"""


@pytest.fixture(scope="module", autouse=True)
def _cuda_device_guard(tmp_path_factory):
    if torch.version.cuda is not None:
        if not torch.cuda.is_available():
            pytest.skip("a CUDA build of torch without a GPU: its CUDA guard cannot run fake CUDA autograd")
        return  # a real GPU: fake CUDA tensors work as they are
    from torch.utils import cpp_extension

    src = tmp_path_factory.mktemp("guard") / "no_op_cuda_guard.cpp"
    src.write_text(_NO_OP_CUDA_GUARD)
    cpp_extension.load(name="aefast_test_no_op_cuda_guard", sources=[str(src)], is_python_module=False,
                       verbose=False)


def _backward(loss):
    """loss.backward(), walking the graph here: each node's backward (torch's, and aefast's
    registered formulas) is called once all of its incoming gradients have arrived, and leaf
    gradients accumulate into .grad. The autograd engine itself cannot run a CUDA graph in a
    CPU-only torch (it stashes the accelerator's streams, and such a build has no accelerator);
    the functions it would call are exactly these."""
    root = loss.grad_fn
    deps, stack, seen = {}, [root], {root}
    while stack:
        node = stack.pop()
        for nxt, _ in node.next_functions:
            if nxt is not None:
                deps[nxt] = deps.get(nxt, 0) + 1
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append(nxt)
    pending = {root: [None] * len(root._input_metadata)}
    pending[root][loss.output_nr] = torch.ones_like(loss)
    ready = [root]
    with torch.no_grad():  # as the engine without create_graph
        _run_nodes(pending, ready, deps)


def _run_nodes(pending, ready, deps):
    while ready:
        node = ready.pop()
        grads = pending.pop(node)
        if hasattr(node, "variable"):  # AccumulateGrad: a leaf
            leaf = node.variable
            leaf.grad = grads[0] if leaf.grad is None else leaf.grad + grads[0]
            continue
        # (a Python autograd.Function's node -- torch.library's register_autograd -- runs via .apply)
        outs = node.apply(*grads) if hasattr(node, "_forward_cls") else node(*grads)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for (nxt, slot), g in zip(node.next_functions, outs):
            if nxt is None:
                continue
            inbox = pending.setdefault(nxt, [None] * (1 if hasattr(nxt, "variable") else len(nxt._input_metadata)))
            if g is not None:
                inbox[slot] = g if inbox[slot] is None else inbox[slot] + g
            deps[nxt] -= 1
            if deps[nxt] == 0:
                ready.append(nxt)


class _FakeCudaGenerator:
    """torch.cuda.default_generators[0] stand-in: seed and Philox offset, no device."""

    device = torch.device("cuda")

    def __init__(self):
        self.offset = 0

    def initial_seed(self):
        return 1234

    def get_offset(self):
        return self.offset

    def set_offset(self, offset):
        self.offset = offset


@pytest.fixture(params=["cuda", "triton"])
def fake_gpu(request, monkeypatch):
    """A FakeTensorMode on which aefast picks its GPU backend for "cuda" tensors."""
    monkeypatch.setitem(BUILD_INFO, "cuda", True)
    real = _backend.availability
    monkeypatch.setattr(_backend, "availability",
                        lambda: {**real(), "cuda": (True, "faked for the sync test"),
                                 "triton": (True, "faked for the sync test")})
    monkeypatch.setattr(AF, "_cuda_generator", lambda device: _FakeCudaGenerator())
    monkeypatch.delenv(validation.ENV_VAR, raising=False)
    assert validation.index_validation()  # the default
    with aefast.set_backend(request.param), FakeTensorMode():
        yield request.param


def _cuda(*shape, low=None):
    t = torch.rand(*shape, device="cuda") if low is not None else torch.randn(*shape, device="cuda")
    return t


def _grad(*shape):
    return torch.randn(*shape, device="cuda").requires_grad_()


def test_a_host_sync_raises_under_the_fake_mode(fake_gpu):
    """The harness catches a sync: reading any value of a fake CUDA tensor raises."""
    from torch._subclasses.fake_tensor import DataDependentOutputException

    t = _cuda(4, 4)
    assert t.device.type == "cuda"
    for read in (lambda: t.sum().item(), lambda: int(t.sum()), lambda: bool((t > 0).any()),
                 lambda: float(t.amax())):
        with pytest.raises(DataDependentOutputException):
            read()


def test_the_old_host_side_index_check_would_be_caught(fake_gpu, monkeypatch):
    """Route the CUDA index check to the host-side one (the code before this fix): the test sees it."""
    monkeypatch.setattr(validation, "reports_on_host", lambda t: True)
    z, idx = _cuda(2, 3, 4, 4), torch.zeros(2, 3, 4, 4, dtype=torch.uint8, device="cuda")
    w = _cuda(3, 2, 3, 3)
    with pytest.raises(Exception, match="(?i)data.?dependent|_local_scalar_dense"):
        AF.unpool_conv_transpose2d(z, idx, w, None, 2, (8, 8), padding=1, index_format="window")


def test_pooling_and_transposed_conv_drop_ins(fake_gpu, index_checks):
    x = _grad(2, 3, 8, 8)
    y, idx = AF.max_pool2d(x, 2, return_indices=True)
    _backward(AF.max_pool2d(x, 3, stride=2, padding=1, ceil_mode=True).sum())
    up = AF.max_unpool2d(y, idx, 2, output_size=(8, 8))  # a user's indices: validated on the device
    _backward(up.sum())
    assert up.shape == (2, 3, 8, 8) and x.grad is not None
    w = _grad(3, 5, 3, 3)
    out = AF.conv_transpose2d(y, w, _grad(5), stride=2, padding=1, output_padding=1)
    _backward(out.sum())
    assert out.shape == (2, 5, 8, 8) and w.grad is not None


@pytest.mark.parametrize("index_format", ["flat", "window"])
def test_fused_encoder_and_decoder(fake_gpu, index_checks, index_format):
    x, w, b = _grad(2, 3, 8, 8), _grad(4, 3, 3, 3), _grad(4)
    pooled, idx = AF.conv_pool2d(x, w, b, padding=1, index_format=index_format)
    _backward(AF.conv_pool2d(x, w, b, padding=1, corruption=("masking", 0.2))[0].sum())
    wd, bd = _grad(4, 3, 3, 3), _grad(3)
    y = AF.unpool_conv_transpose2d(pooled, idx, wd, bd, 2, (8, 8), padding=1, activation="sigmoid",
                                   index_format=index_format)
    _backward(y.sum())
    assert y.shape == (2, 3, 8, 8) and wd.grad is not None and x.grad is not None
    assert index_checks == []  # the encoder's own indices are trusted: no check at all
    user = idx.clone()  # a copy is a user's indices: checked, on the device
    AF.unpool_conv_transpose2d(pooled, user, wd, bd, 2, (8, 8), padding=1, index_format=index_format)
    assert len(index_checks) == 1


def test_batch_norm_blocks_with_running_statistics(fake_gpu):
    """conv_bn_pool2d and batch_norm_act2d in training mode update running statistics (momentum
    None: the factor comes from num_batches_tracked) without reading a device value. Forward only:
    conv_bn_pool2d runs the reference twin on cuda/triton (counted fallbacks), whose backward is
    autograd's, which this file's engine stand-in does not reduce over broadcasts."""
    x, w, b = _grad(2, 3, 8, 8), _grad(4, 3, 3, 3), _grad(4)
    gamma, beta = _grad(4), _grad(4)
    rm, rv, calls = torch.zeros(4, device="cuda"), torch.ones(4, device="cuda"), torch.zeros((), dtype=torch.int64,
                                                                                             device="cuda")
    pooled, _ = AF.conv_bn_pool2d(x, w, b, gamma, beta, rm, rv, True, None, padding=1, num_batches_tracked=calls)
    out = AF.batch_norm_act2d(pooled, gamma, beta, rm, rv, True, 0.1, activation="leaky_relu",
                              num_batches_tracked=calls)
    assert out.shape == (2, 4, 4, 4) and out.requires_grad


def test_index_conversions(fake_gpu):
    x = _cuda(2, 3, 8, 8)
    _, flat = AF.max_pool2d(x, 2, return_indices=True)
    window = AF.flat_to_window(flat, (8, 8), 2)  # checked (the default), on the device
    back = AF.window_to_flat(window, (8, 8), 2)
    assert window.dtype == torch.uint8 and back.dtype == torch.int64 and back.shape == flat.shape


@pytest.mark.parametrize("kind", ["mse", "l1", "huber", "bce", "bce_logits"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "per_sample"])
def test_reconstruction_loss(fake_gpu, kind, reduction):
    x = torch.rand(2, 3, 4, 4, device="cuda").requires_grad_()
    t = torch.rand(2, 3, 4, 4, device="cuda")
    loss = AF.reconstruction_loss(x, t, kind, reduction)  # bce: the range check asserts on the device
    _backward(loss.sum())
    assert x.grad is not None and x.grad.dtype == x.dtype


def test_loss_drop_ins(fake_gpu):
    x = torch.rand(2, 3, 4, 4, device="cuda").requires_grad_()
    t = torch.rand(2, 3, 4, 4, device="cuda")
    weight = torch.rand(2, 3, 4, 4, device="cuda")
    losses = [AF.mse_loss(x, t), AF.l1_loss(x, t, reduction="sum"), AF.huber_loss(x, t, delta=0.5),
              AF.binary_cross_entropy(x, t), AF.binary_cross_entropy(x, t, weight=weight),
              AF.binary_cross_entropy_with_logits(x, t, pos_weight=weight), AF.mse_loss(x, t, weight=weight)]
    _backward(sum(loss.sum() for loss in losses))
    assert x.grad is not None


def test_corruption_and_vae_terms(fake_gpu):
    x = _grad(2, 3, 4, 4)
    for kind in ("gaussian", "masking", "salt_pepper"):
        _backward(AF.corrupt(x, kind, 0.2).sum())  # the noise key is drawn without a device read
    mu, logvar = _grad(4, 8), _grad(4, 8)
    z = AF.reparameterize(mu, logvar)
    _backward(z.sum() + AF.kl_divergence(mu, logvar))
    assert mu.grad is not None and logvar.grad is not None


@pytest.mark.parametrize("index_format", ["window", "flat"])
def test_conv_autoencoder_training_step(fake_gpu, index_checks, index_format):
    """forward, loss, backward and an optimizer step: no sync, and the encoder's indices reach
    the decoder unchecked (validation at its default)."""
    from aefast.models import ConvAutoencoder

    with torch.device("cuda"):  # (.to("cuda") would swap fake parameters, which weakrefs forbid)
        model = ConvAutoencoder(in_channels=1, channels=(4, 8), index_format=index_format)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # (Adam reads its step count back)
    x = torch.rand(2, 1, 8, 8, device="cuda")
    for _ in range(2):
        opt.zero_grad()
        loss = model.training_loss(x)
        _backward(loss)
        opt.step()
    assert loss.shape == () and loss.device.type == "cuda"
    assert all(p.grad is not None for p in model.parameters())
    assert index_checks == []


def test_cuda_noise_keys_come_from_the_generator_state_without_a_device_read(monkeypatch):
    """The CUDA key is a function of the generator's (seed, Philox offset): reproducible after a
    reseed (offset back to 0), distinct from draw to draw, and the offset moves in steps of 4."""
    gen = _FakeCudaGenerator()
    monkeypatch.setattr(AF, "_cuda_generator", lambda device: gen)
    cuda = torch.device("cuda")
    first, second = AF._draw_seed(None, cuda), AF._draw_seed(None, cuda)
    assert first != second and gen.offset == 8
    assert 0 <= first < 2**63 and 0 <= second < 2**63
    gen.offset = 0  # torch.manual_seed resets the offset
    assert AF._draw_seed(None, cuda) == first
    assert AF._draw_seed(gen, cuda) == second  # an explicit generator: the same rule
