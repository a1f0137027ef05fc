"""The fused ops under the tools training code uses: torch.compile(fullgraph=True), autocast,
channels_last and torch.export, inside the models as well as alone."""
import pytest
import torch
import torch.nn.functional as F

import aefast
from aefast import functional as AF
from aefast import models as M
from aefast.models import VAEOutput
from aefast.reference import models as R
from test_models import CASES, _output


def _model_and_input(name, seed=0):
    kwargs, shape = CASES[name]
    torch.manual_seed(seed)
    model = M.MODELS[name](**kwargs).eval()  # eval: no corruption / sampling noise to compare
    torch.manual_seed(seed + 1)
    return model, torch.rand(shape)


def _loss(out):
    if isinstance(out, VAEOutput):
        return out.recon.square().mean() + out.mu.square().mean() + out.logvar.exp().mean()
    return out.square().mean()


@pytest.mark.parametrize("name", list(CASES))
def test_compile_fullgraph_every_model(name):
    """aot_eager runs dynamo (fullgraph: any graph break fails) and AOT autograd over the fake
    and autograd registrations of every op; inductor's codegen is exercised below."""
    model, x = _model_and_input(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got = compiled(x)
    _loss(got).backward()
    got_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    want = model(x)
    _loss(want).backward()
    torch.testing.assert_close(_output(got), _output(want), rtol=1e-5, atol=1e-6)
    for k, p in model.named_parameters():
        torch.testing.assert_close(got_grads[k], p.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("name", ["conv", "conv_vae"])
def test_compile_inductor(name):
    model, x = _model_and_input(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    got = compiled(x)
    _loss(got).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    _loss(model(x)).backward()
    for k, p in model.named_parameters():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["dae", "conv_dae", "vae", "conv_vae"])
def test_compile_fullgraph_train_mode_randomness(name):
    """Corruption and VAE sampling in train mode compile without a graph break."""
    model, x = _model_and_input(name)
    model.train()
    torch._dynamo.reset()
    out = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    _loss(out).backward()
    assert all(p.grad is not None for p in model.parameters())


AUTOCAST_CASES = list(CASES)


@pytest.mark.parametrize("name", AUTOCAST_CASES)
def test_autocast_bf16_matches_twin(name):
    """Casting policy (documented in aefast.functional): the encoder and decoder blocks run in
    the autocast dtype, like conv2d; losses and the VAE terms run in fp32, like mse_loss."""
    model, x = _model_and_input(name)
    twin = R.MODELS[name](**CASES[name][0]).eval()
    twin.load_state_dict(model.state_dict())
    outs, grads = [], []
    for m in (model, twin):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
            loss = _loss(out)
        loss.backward()
        outs.append(_output(out))
        grads.append({k: p.grad for k, p in m.named_parameters()})
    assert outs[0].dtype == outs[1].dtype
    torch.testing.assert_close(outs[0].float(), outs[1].float(), rtol=4e-2, atol=4e-2)
    for k in grads[1]:
        g0, g1 = grads[0][k].float(), grads[1][k].float()
        scale = g1.abs().max().clamp(min=1e-3)
        torch.testing.assert_close(g0 / scale, g1 / scale, rtol=0, atol=6e-2, msg=lambda m: f"{k}: {m}")


def test_losses_run_in_fp32_under_autocast():
    x = torch.rand(2, 3, 4, 4, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = AF.reconstruction_loss(x, torch.rand(2, 3, 4, 4, dtype=torch.bfloat16))
    assert loss.dtype == torch.float32


def test_blocks_run_in_autocast_dtype():
    x, w = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, idx = AF.conv_pool2d(x, w)
        z = AF.unpool_conv_transpose2d(y, idx, torch.randn(4, 3, 3, 3), output_size=(7, 7))
    assert y.dtype == torch.bfloat16 and z.dtype == torch.bfloat16 and idx.dtype == torch.int64


@pytest.mark.parametrize("index_format", ["flat", "window"])
def test_channels_last_in_channels_last_out(index_format):
    x = torch.randn(2, 3, 10, 9).to(memory_format=torch.channels_last)
    w = torch.randn(5, 3, 3, 3)
    y, idx = AF.conv_pool2d(x, w, padding=1, index_format=index_format)
    want_y, want_idx = F.max_pool2d(F.relu(F.conv2d(x, w, padding=1)), 2, return_indices=True)
    assert y.is_contiguous(memory_format=torch.channels_last) == want_y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    wd = torch.randn(5, 3, 3, 3)
    z = AF.unpool_conv_transpose2d(y, idx, wd, padding=1, output_size=(10, 9), index_format=index_format)
    want_z = F.conv_transpose2d(F.max_unpool2d(want_y, want_idx, 2, output_size=(10, 9)), wd, padding=1)
    assert z.is_contiguous(memory_format=torch.channels_last) == want_z.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(z, want_z, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["conv", "segnet"])
def test_export_inference(name):
    model, x = _model_and_input(name)
    program = torch.export.export(model, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any(t.startswith("aefast.") for t in targets), targets  # the fused ops are in the graph
    x2 = torch.rand_like(x)
    torch.testing.assert_close(program.module()(x2), model(x2), rtol=1e-5, atol=1e-6)
