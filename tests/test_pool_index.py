"""pool_index family: flat <-> window index conversion, the op contract end to end."""
import pytest
import torch
import torch.nn.functional as F

import aefast
from aefast import functional as AF
from aefast.ops import _registry

# (input H, W, kernel, stride, padding, dilation, ceil_mode): odd shapes, 1x1 planes,
# overlapping windows, padding, dilation and ceil_mode windows that hang over the edge.
GEOMETRIES = [
    (7, 9, 2, 2, 0, 1, False),
    (7, 9, 2, 2, 0, 1, True),
    (9, 11, 3, 2, 1, 1, True),
    (13, 5, 3, 3, 0, 1, True),
    (1, 1, 1, 1, 0, 1, False),
    (8, 8, (2, 3), (1, 2), (1, 0), (2, 1), False),
    (10, 9, 3, 1, 1, 2, True),
    (5, 5, 5, 1, 2, 1, False),
]


def expected_window_offsets(flat, in_w, kernel, stride, padding, dilation):
    """An independent pure-PyTorch computation of the offsets: the (i, j) cell of each window."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    sh, sw = (stride, stride) if isinstance(stride, int) else stride
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    dh, dw = (dilation, dilation) if isinstance(dilation, int) else dilation
    oh = torch.arange(flat.shape[-2]).view(-1, 1)
    ow = torch.arange(flat.shape[-1]).view(1, -1)
    i = (flat // in_w - (oh * sh - ph)) // dh
    j = (flat % in_w - (ow * sw - pw)) // dw
    return (i * kw + j).to(torch.uint8)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=lambda g: "x".join(map(str, g)))
@pytest.mark.parametrize("batch, channels", [(1, 3), (2, 17)])
def test_roundtrip_matches_torch_pooling(backend, device, geometry, batch, channels):
    H, W, k, s, p, d, ceil = geometry
    x = torch.randn(batch, channels, H, W)
    _, flat = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil, return_indices=True)
    flat = flat.to(device)
    window = AF.flat_to_window(flat, (H, W), k, s, p, d)
    assert window.dtype == torch.uint8 and window.shape == flat.shape and window.device == flat.device
    assert torch.equal(window.cpu(), expected_window_offsets(flat.cpu(), W, k, s, p, d))
    back = AF.window_to_flat(window, (H, W), k, s, p, d)
    assert back.dtype == torch.int64
    assert torch.equal(back, flat)
    assert not aefast.info()["fallbacks"], "a backend fell back to the reference"


def test_every_window_offset_roundtrips(backend, device):
    # All offsets of a 3x3 window at every position of a padded, ceil_mode pool of a 7x8 plane:
    # those that land in the padding map to -1 and are reported, the rest round-trip.
    H, W, k, s, p = 7, 8, 3, 2, 1
    out_hw = (4, 4)
    ref = aefast.reference.functional
    for off in range(9):
        window = torch.full((2, *out_hw), off, dtype=torch.uint8, device=device)
        with aefast.set_backend(backend):
            flat = ref.window_to_flat(window, (H, W), k, s, p) if backend == "reference" else \
                _registry.op(backend, "window_to_flat")(window, [H, W], [k, k], [s, s], [p, p], [1, 1])
        expect = ref.window_to_flat(window.cpu(), (H, W), k, s, p)
        assert torch.equal(flat.cpu(), expect)
        inside = expect >= 0
        again = ref.flat_to_window(expect.clamp(min=0), (H, W), k, s, p)
        assert torch.equal(again[inside], window.cpu()[inside])


def test_channels_last_and_3d_inputs(backend, device):
    x = torch.randn(2, 5, 9, 7).to(memory_format=torch.channels_last)
    _, flat = F.max_pool2d(x, 2, return_indices=True)
    flat = flat.to(device)
    window = AF.flat_to_window(flat, x.shape, 2)
    assert torch.equal(AF.window_to_flat(window, x.shape, 2), flat)
    window3 = AF.flat_to_window(flat[0], x.shape[-2:], 2)
    assert torch.equal(window3, window[0])


def test_empty_batch(backend, device):
    flat = torch.empty(0, 3, 4, 4, dtype=torch.int64, device=device)
    assert AF.flat_to_window(flat, (8, 8), 2).shape == flat.shape


def test_outputs_carry_no_grad_and_do_not_break_autograd(backend, device):
    x = torch.randn(1, 2, 6, 6, requires_grad=True)
    y, flat = F.max_pool2d(x, 2, return_indices=True)
    window = AF.flat_to_window(flat.to(device), x.shape, 2)
    assert not window.requires_grad and window.grad_fn is None
    y.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("op_name", ["flat_to_window", "window_to_flat"])
@pytest.mark.parametrize("namespace", ["aefast", "aefast_triton"])
def test_opcheck(op_name, namespace):
    if namespace == "aefast_triton" and not aefast.backend.availability()["triton"][0]:
        pytest.skip("triton unavailable")
    op = getattr(getattr(torch.ops, namespace), op_name).default
    x = torch.randn(2, 3, 9, 7)
    _, flat = F.max_pool2d(x, 3, 2, 1, ceil_mode=True, return_indices=True)
    arg = flat if op_name == "flat_to_window" else AF.flat_to_window(flat, x.shape, 3, 2, 1)
    torch.library.opcheck(op, (arg, [9, 7], [3, 3], [2, 2], [1, 1], [1, 1]))


def test_compiles_fullgraph():
    x = torch.randn(2, 3, 9, 7)
    _, flat = F.max_pool2d(x, 2, return_indices=True)

    def roundtrip(idx):
        w = torch.ops.aefast.flat_to_window(idx, [9, 7], [2, 2], [2, 2], [0, 0], [1, 1])
        return torch.ops.aefast.window_to_flat(w, [9, 7], [2, 2], [2, 2], [0, 0], [1, 1])

    assert torch.equal(torch.compile(roundtrip, fullgraph=True, backend="aot_eager")(flat), flat)


# ---------------------------------------------------------------- bad input, before any kernel runs

def _flat(device="cpu"):
    _, flat = F.max_pool2d(torch.randn(1, 2, 6, 6), 2, return_indices=True)
    return flat.to(device)


def test_rejects_wrong_dtype(backend, device):
    with pytest.raises(TypeError, match="indices must have dtype int64"):
        AF.flat_to_window(_flat(device).int(), (6, 6), 2)
    with pytest.raises(TypeError, match="window must have dtype uint8"):
        AF.window_to_flat(_flat(device), (6, 6), 2)


def test_rejects_out_of_range_indices(backend, device):
    flat = _flat(device)
    flat[0, 1, 2, 2] = 36
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 36\)"):
        AF.flat_to_window(flat, (6, 6), 2)
    flat[0, 1, 2, 2] = -1
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 36\)"):
        AF.flat_to_window(flat, (6, 6), 2)


def test_rejects_index_outside_its_window(backend, device):
    flat = _flat(device)
    flat[0, 0, 0, 0] = 5 * 6 + 5  # a valid position of the plane, but in window (2, 2)
    with pytest.raises(ValueError, match=r"index 35 at position \(0, 0, 0, 0\) is not inside its own pooling window"):
        AF.flat_to_window(flat, (6, 6), 2)


def test_rejects_bad_window_offsets(backend, device):
    window = torch.zeros(1, 1, 3, 3, dtype=torch.uint8, device=device)
    window[0, 0, 1, 1] = 4
    with pytest.raises(ValueError, match=r"window offsets must lie in \[0, 4\)"):
        AF.window_to_flat(window, (6, 6), 2)
    # offset 0 of window (0, 0) with padding 1 is the padding corner, not an element
    with pytest.raises(ValueError, match="points into the padding"):
        AF.window_to_flat(torch.zeros(1, 1, 4, 4, dtype=torch.uint8, device=device), (6, 6), 3, 2, 1)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kernel_size=0), ValueError, "kernel_size must be >= 1"),
    (dict(kernel_size=2, stride=0), ValueError, "stride must be >= 1"),
    (dict(kernel_size=2, padding=2), ValueError, "padding should be at most half"),
    (dict(kernel_size=16), ValueError, "at most 255 elements"),
    (dict(kernel_size="2"), TypeError, "kernel_size must be an int or a pair"),
    (dict(kernel_size=(2, 2, 2)), TypeError, "kernel_size must be an int or a pair"),
])
def test_rejects_bad_geometry(kwargs, error, match):
    with pytest.raises(error, match=match):
        AF.flat_to_window(_flat(), (64, 64), **kwargs)


def test_rejects_bad_shapes_and_types():
    with pytest.raises(ValueError, match="at least 2 dims"):
        AF.flat_to_window(torch.zeros(4, dtype=torch.int64), (6, 6), 2)
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        AF.flat_to_window([1, 2], (6, 6), 2)
    with pytest.raises(TypeError, match="input_size must be a tuple"):
        AF.flat_to_window(_flat(), torch.tensor([6, 6]), 2)
