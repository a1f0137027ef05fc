"""fp32 on a GPU with TF32 on (PyTorch's default for cuDNN convolutions): the fused encoder and
decoder, and eager's own convolution, against an fp64 reference with error bounds derived from
TF32's format. Every other GPU test runs with TF32 off (tests/conftest.py).

The bound. TF32 keeps fp32's exponent and 10 of its 23 mantissa bits, so each operand of a
product is off by a relative u = 2^-10 at most (rounded or truncated; 2^-11 when rounded to
nearest), and the product by (1+u)^2 - 1 <= 2.01 u. Summing K products in fp32 adds at most
K * 2^-24 of the sum of magnitudes (the textbook gamma_K bound). So for one output element

    |y - y_exact| <= (2.01 * 2^-10 + K * 2^-24) * sum_k |x_k| |w_k|  +  2^-24 |b|,

computed here in fp64 as a convolution of |x| with |w|. ReLU and max-pooling are 1-Lipschitz,
so the pooled values stay within the max of the bound over their window. The argmax may pick a
different element only where the two candidates' exact activated values are within the sum of
their bounds (a near tie that TF32 cannot resolve); any other index difference is a bug.
"""
import pytest
import torch
import torch.nn.functional as F

import aefast
import aefast.functional as AF
from conftest import HAS_CUDA_BACKEND

TF32_UNIT = 2.0 ** -10
FP32_UNIT = 2.0 ** -24


def tf32_bound(magnitude_sum: torch.Tensor, terms: int, bias=None) -> torch.Tensor:
    """The per-element bound above, from sum_k |x_k| |w_k| (fp64) and the number of terms."""
    bound = (2.01 * TF32_UNIT + terms * FP32_UNIT) * magnitude_sum
    if bias is not None:
        bound = bound + FP32_UNIT * bias.abs().view(1, -1, 1, 1)
    return bound


def argmax_mismatches_beyond_ties(idx, idx_ref, act_ref, bound):
    """Positions where two pooling index maps differ although the two candidates' exact values
    ``act_ref`` (N, C, H, W) differ by more than the sum of their error bounds; flat indices in
    each (N, C) plane, as torch's. Returns a bool mask of idx's shape."""
    planes_ref = act_ref.flatten(2)
    planes_bound = bound.flatten(2)
    i, j = idx.flatten(2).to(act_ref.device), idx_ref.flatten(2).to(act_ref.device)
    gap = (planes_ref.gather(2, i) - planes_ref.gather(2, j)).abs()
    slack = planes_bound.gather(2, i) + planes_bound.gather(2, j)
    return ((i != j) & (gap > slack)).view(idx.shape)


def test_near_tie_rule_accepts_ties_and_rejects_real_differences():
    """The comparison itself, on CPU: an index may differ only inside the error bound."""
    act = torch.tensor([[[[1.0, 1.0005], [0.5, 0.0]]]], dtype=torch.float64)
    bound = torch.full_like(act, 1e-3)
    ref_idx = torch.tensor([[[[1]]]])
    assert not argmax_mismatches_beyond_ties(torch.tensor([[[[0]]]]), ref_idx, act, bound).any()  # 5e-4 apart
    assert argmax_mismatches_beyond_ties(torch.tensor([[[[2]]]]), ref_idx, act, bound).all()  # 0.5 apart
    assert not argmax_mismatches_beyond_ties(ref_idx, ref_idx, act, bound).any()


def test_bound_covers_an_fp32_rounding_of_the_operands():
    """The bound holds for operands truncated to 10 mantissa bits (TF32's worst case), on CPU."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 17, 9, 9, generator=g, dtype=torch.float64)
    w = torch.randn(5, 17, 3, 3, generator=g, dtype=torch.float64)

    def truncate_to_tf32(t):
        bits = t.float().view(torch.int32) & ~((1 << 13) - 1)  # keep 10 of the 23 mantissa bits
        return bits.view(torch.float32).double()

    exact = F.conv2d(x, w, padding=1)
    tf32_like = F.conv2d(truncate_to_tf32(x), truncate_to_tf32(w), padding=1)
    bound = tf32_bound(F.conv2d(x.abs(), w.abs(), padding=1), 17 * 9)
    assert ((tf32_like - exact).abs() <= bound).all()
    assert ((tf32_like - exact).abs() > bound / 100).any()  # and it is not vacuous


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="TF32 exists on CUDA GPUs only")
GPU_BACKENDS = [pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA_BACKEND,
                                                                                 reason="no CUDA backend here")]),
                pytest.param("triton", marks=[pytest.mark.gpu_triton])]


def _conv_pool_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 17, 15, 13, generator=g, dtype=torch.float64)
    w = torch.randn(8, 17, 3, 3, generator=g, dtype=torch.float64) * 0.2
    b = torch.randn(8, generator=g, dtype=torch.float64) * 0.1
    pre = F.conv2d(x, w, b, padding=1)
    bound = tf32_bound(F.conv2d(x.abs(), w.abs(), padding=1), 17 * 9 + 1, b)
    return x, w, b, pre, bound


@pytest.mark.tf32
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_conv_pool2d_fp32_with_tf32_within_the_tf32_bound(backend):
    assert torch.backends.cudnn.allow_tf32  # this file keeps torch's default
    x, w, b, pre, bound = _conv_pool_case()
    act = F.relu(pre)
    pooled_ref, idx_ref = F.max_pool2d(act, 2, return_indices=True)
    with aefast.set_backend(backend):
        pooled, idx = AF.conv_pool2d(*(t.float().cuda() for t in (x, w, b)), padding=1, activation="relu")
    err = (pooled.double().cpu() - pooled_ref).abs()
    assert (err <= F.max_pool2d(bound, 2)).all(), f"max error {err.max():.3g}"
    bad = argmax_mismatches_beyond_ties(idx.cpu(), idx_ref, act, bound)
    assert not bad.any(), f"{int(bad.sum())} argmax choices differ beyond a TF32 near-tie"


@pytest.mark.tf32
@needs_gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_unpool_conv_transpose2d_fp32_with_tf32_within_the_tf32_bound(backend):
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 17, 5, 6, generator=g, dtype=torch.float64)
    idx = F.max_pool2d(torch.randn(2, 17, 10, 12, generator=g, dtype=torch.float64), 2, return_indices=True)[1]
    w = torch.randn(17, 3, 3, 3, generator=g, dtype=torch.float64) * 0.2
    b = torch.randn(3, generator=g, dtype=torch.float64) * 0.1
    unpooled = F.max_unpool2d(z, idx, 2, output_size=(10, 12))
    exact = F.conv_transpose2d(unpooled, w, b, padding=1)
    bound = tf32_bound(F.conv_transpose2d(unpooled.abs(), w.abs(), padding=1), 17 * 9 + 1, b)
    with aefast.set_backend(backend):
        y = AF.unpool_conv_transpose2d(z.float().cuda(), idx.cuda(), w.float().cuda(), b.float().cuda(), 2, (10, 12),
                                       padding=1)
    err = (y.double().cpu() - exact).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g} beyond the TF32 bound"


@pytest.mark.tf32
@pytest.mark.cuda
@needs_gpu
def test_eager_cudnn_with_tf32_within_the_same_bound():
    """The bound is the one cuDNN's own TF32 convolution meets: it is no looser for aefast."""
    x, w, b, pre, bound = _conv_pool_case(seed=2)
    y = F.conv2d(x.float().cuda(), w.float().cuda(), b.float().cuda(), padding=1)
    err = (y.double().cpu() - pre).abs()
    assert (err <= bound).all(), f"max error {err.max():.3g}"
