"""Stacked denoising autoencoder: greedy layer-wise pretraining as in Vincent et al. 2010."""
import pytest
import torch

import aefast
from aefast.data import load_digits
from aefast.models import StackedDenoisingAutoencoder
from aefast.reference import models as R


@pytest.fixture(scope="module")
def digits():
    d = load_digits(seed=0)
    return d.train.images.flatten(1), d.test.images.flatten(1)


def _sdae(seed=0):
    torch.manual_seed(seed)
    return StackedDenoisingAutoencoder(64, hidden=(48, 24, 12), corruption="masking", level=0.25)


def test_each_layer_trains_on_clean_codes_with_only_its_own_corruption(digits):
    train, _ = digits
    model = _sdae()
    log = []   # (event, layer, input, output) in call order, while `recording`
    recording = [False]

    def record(event, k, inp, out=None):
        if recording[0]:
            log.append((event, k, inp.detach().clone(), None if out is None else out.detach().clone()))

    for k in range(model.depth):
        model.corruptions[k].register_forward_hook(lambda m, inp, out, k=k: record("corrupt", k, inp[0], out))
        model.encoders[k].register_forward_pre_hook(lambda m, inp, k=k: record("encode", k, inp[0]))
    snapshots = []
    for k in range(model.depth):
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        log.clear()
        recording[0] = True
        history = model.pretrain(train, epochs=1, batch_size=128, seed=0, layers=[k])
        recording[0] = False
        assert len(history) == 1
        # the clean codes of the layers below, computed with the final (frozen) lower layers
        with torch.no_grad():
            model.eval()
            clean = model.encode(train, depth=k)
        corrupt_calls = [e for e in log if e[0] == "corrupt"]
        assert corrupt_calls, "layer k's corruption never ran"
        assert {e[1] for e in corrupt_calls} == {k}, "only layer k's own input may be corrupted"
        for _, _, inp, out in corrupt_calls:
            # every input of the corruption is a batch of CLEAN codes: each row is a row of `clean`
            d = torch.cdist(inp, clean, compute_mode="donot_use_mm_for_euclid_dist").min(dim=1).values
            assert d.max() < 1e-5
            assert not torch.equal(out, inp), "the corruption changed nothing"
        # layer k's encoder sees the corrupted codes (training) or clean ones (the loss at init, no_grad)
        enc_inputs = [e[2] for e in log if e[0] == "encode" and e[1] == k]
        corrupted = [e[3] for e in corrupt_calls]
        assert any(torch.equal(a, b) for a in enc_inputs for b in corrupted)
        # lower layers ran only to produce codes: no encoder below k saw a corrupted tensor
        with torch.no_grad():
            lower_inputs = [train] + [model.encode(train, depth=i) for i in range(1, k)]
        for _, j, inp, _ in (e for e in log if e[0] == "encode" and e[1] < k):
            assert torch.equal(inp, lower_inputs[j])
        # only layer k's parameters moved
        for n, p in model.named_parameters():
            moved = not torch.equal(p, before[n])
            mine = n.startswith((f"encoders.{k}.", f"decoders.{k}."))
            assert moved == mine, f"{n} {'moved' if moved else 'did not move'} while pretraining layer {k}"
        snapshots.append(k)
    assert snapshots == [0, 1, 2]


def test_each_layers_denoising_error_falls(digits):
    train, _ = digits
    model = _sdae()
    with aefast.set_backend("cpu"):
        history = model.pretrain(train, epochs=4, batch_size=64, lr=3e-3, seed=0)
    assert len(history) == model.depth
    for k, losses in enumerate(history):
        assert len(losses) == 5                         # at init, then after each epoch
        assert losses[-1] < 0.8 * losses[0], (k, losses)   # a clear fall from init
        assert losses[-1] < losses[1], (k, losses)         # and it keeps falling after the first epoch


def test_pretrained_stack_beats_random_init_on_held_out_digits(digits):
    train, test = digits
    pretrained, random_init = _sdae(0), _sdae(0)
    with aefast.set_backend("cpu"):
        pretrained.pretrain(train, epochs=4, batch_size=64, lr=3e-3, seed=0)
    pretrained.eval()
    random_init.eval()
    with torch.no_grad():
        mse_pre = float(((pretrained(test) - test) ** 2).mean())
        mse_rand = float(((random_init(test) - test) ** 2).mean())
    assert mse_pre < 0.7 * mse_rand, (mse_pre, mse_rand)


def test_pretraining_procedure_matches_twin_under_reference(digits):
    """The fused model's pretrain() is the twin's procedure: same seed, same per-epoch losses."""
    train, _ = digits
    model = _sdae(1)
    twin = R.StackedDenoisingAutoencoder(64, hidden=(48, 24, 12), corruption="masking", level=0.25)
    twin.load_state_dict(model.state_dict())
    with aefast.set_backend("reference"):
        torch.manual_seed(5)
        h_m = model.pretrain(train[:256], epochs=1, batch_size=64, seed=2)
    torch.manual_seed(5)
    h_t = twin.pretrain(train[:256], epochs=1, batch_size=64, seed=2)
    assert [v for h in h_m for v in h] == pytest.approx([v for h in h_t for v in h], rel=1e-5)
    for (n, a), (_, b) in zip(model.state_dict().items(), twin.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)
