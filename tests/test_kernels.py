"""The launch wrappers on their own: tiling, very large vocabularies, 64-bit offsets."""

from __future__ import annotations

import pytest
import torch

from fusedce import LossSpec
from fusedce.kernels import ce_bwd, ce_fwd, launch_config
from fusedce.kernels import tiling as kernel_tiling
from fusedce.testing import make_logits, make_targets, reference_cross_entropy, rel_err


@pytest.mark.parametrize("n_rows", [1, 3, 31, 32, 4096])
@pytest.mark.parametrize("n_cols", [2, 1000, 8192, 8193, 128256, 262144, 1_048_583])
def test_launch_config_covers_every_column(n_rows, n_cols):
    cfg = launch_config(n_rows, n_cols, torch.device("cpu"))
    assert cfg.block_size & (cfg.block_size - 1) == 0
    assert cfg.cols_per_split % cfg.block_size == 0
    assert cfg.n_splits * cfg.cols_per_split >= n_cols  # every column has a program
    assert (cfg.n_splits - 1) * cfg.cols_per_split < n_cols  # and no program is empty
    assert 4 <= cfg.num_warps <= 32
    if n_rows >= 32:  # 4 rows per SM or more (8 SMs assumed off-GPU): no split
        assert cfg.n_splits == 1


def test_launch_config_splits_few_long_rows():
    cfg = launch_config(1, 1_048_583, torch.device("cpu"))
    assert cfg.n_splits > 1
    forced = launch_config(2, 4099, torch.device("cpu"), block_size=256, n_splits=100)
    assert forced.n_splits == 17  # never more programs than blocks
    with pytest.raises(ValueError, match="power of two"):
        launch_config(2, 10, torch.device("cpu"), block_size=100)


def _run(logits, target, weight=None, smoothing=0.0, **tiling):
    grad = torch.full_like(logits, float("nan"))
    scale = torch.ones(1, device=logits.device)
    weight_sum = weight.sum().reshape(1) if weight is not None else None
    spec = LossSpec(label_smoothing=smoothing, impl="triton")
    with kernel_tiling(**tiling):
        loss, lse, *_ = ce_fwd(logits, target, weight, weight_sum, scale, spec, grad)
    return loss, lse, grad


def test_million_class_vocabulary(device):
    """C above 2**20 with the default tiling (split across programs), no per-row ceiling."""
    n_rows, n_cols = 2, 1_048_583
    logits = make_logits(n_rows, n_cols, torch.float32, device)
    target = torch.tensor([0, n_cols - 1], device=device)
    loss, lse, grad = _run(logits, target, smoothing=0.1)
    ref_loss, ref_grad = reference_cross_entropy(logits, target, reduction="none",
                                                 label_smoothing=0.1, grad_output=torch.ones(2))
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-5
    assert rel_err(lse, torch.logsumexp(logits.double().cpu(), dim=1)) <= 1e-6


def test_forward_only_writes_nothing_logits_sized(device):
    logits = make_logits(4, 700, torch.float32, device)
    target = make_targets(4, 700, device)
    before = logits.clone()
    loss, lse, z_loss, correct, *_ = ce_fwd(logits, target, None, None, None, LossSpec(), None)
    assert z_loss.numel() == 0 and correct.numel() == 0
    assert torch.equal(logits, before)
    ref, _ = reference_cross_entropy(logits, target, reduction="none")
    assert rel_err(loss, ref) <= 1e-5


def test_split_and_unsplit_agree(device):
    logits = make_logits(3, 5000, torch.bfloat16, device)
    target = make_targets(3, 5000, device)
    weight = torch.rand(5000, device=device)
    one = _run(logits, target, weight, 0.2, block_size=256, n_splits=1)
    many = _run(logits, target, weight, 0.2, block_size=256, n_splits=5)
    for a, b in zip(one, many):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("per_row", [False, True])
def test_backward_scaling(per_row, device):
    grad = make_logits(5, 1300, torch.bfloat16, device)
    # Powers of two scale bf16 exactly, so the result is exact whatever the rounding mode; the
    # row whose factor is 1 must be left alone.
    factor = torch.tensor([-0.25, 2.0, 1.0, 0.5, -4.0], device=device)
    if not per_row:
        factor = factor[0]
    expected = (grad.float() * (factor[:, None] if per_row else factor)).to(grad.dtype)
    ce_bwd(grad, factor, block_size=256)
    assert torch.equal(grad, expected)
    untouched = grad.clone()
    ce_bwd(grad, torch.tensor(1.0, device=device))  # a factor of 1 is a no-op
    assert torch.equal(grad, untouched)


def test_row_offsets_beyond_two_to_the_31(device):
    """Rows 2**30 + 3 elements apart: the third row starts past element 2**31.

    The storage is 4 GiB of float16 allocated uninitialised; only the rows used are touched by
    the computation (the interpreter copies the storage back once).
    """
    n_cols, stride = 300, 2**30 + 3
    try:
        storage = torch.empty(2 * stride + n_cols, dtype=torch.float16, device=device)
    except (RuntimeError, MemoryError):
        pytest.skip("not enough memory for a 4 GiB tensor")
    logits = storage.as_strided((3, n_cols), (stride, 1))
    values = make_logits(3, n_cols, torch.float16, device)
    logits.copy_(values)
    target = torch.tensor([5, 299, 17], device=device)
    loss, _, _ = _run(logits, target)
    ref_loss, ref_grad = reference_cross_entropy(values, target, reduction="none",
                                                 grad_output=torch.ones(3))
    assert rel_err(loss, ref_loss) <= 2e-3
    # The gradient can be written through the same far-apart rows (in-place backward).
    grad_view = logits
    scale = torch.ones(1, device=device)
    ce_fwd(logits, target, None, None, scale, LossSpec(), grad_view)
    assert rel_err(grad_view, ref_grad) <= 2e-3
    del storage, logits, grad_view


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU with 20 GB free")
def test_more_than_two_to_the_31_elements_on_gpu():
    n_rows, n_cols = 16800, 128256  # 2.15e9 elements
    free, _ = torch.cuda.mem_get_info()
    if free < 2 * n_rows * n_cols * 2 + 2**30:
        pytest.skip("not enough GPU memory")
    logits = make_logits(n_rows, n_cols, torch.bfloat16, "cuda", scale=2.0)
    target = make_targets(n_rows, n_cols, "cuda")
    loss, _, grad = _run(logits, target)
    rows = torch.tensor([0, n_rows // 2, n_rows - 1])
    ref_loss, ref_grad = reference_cross_entropy(logits[rows], target[rows], reduction="none",
                                                 grad_output=torch.ones(3))
    assert rel_err(loss[rows], ref_loss) <= 1e-2
    assert rel_err(grad[rows], ref_grad) <= 1e-2


def test_scale_and_reduce_span_many_blocks(device):
    """The one-program reduction scale and loss sum over more rows than one block (1024)."""
    from fusedce.kernels import ce_reduce, ce_scale

    target = make_targets(2500, 50, device, ignore_fraction=0.3)
    weight = torch.rand(50, device=device) + 0.5
    spec = LossSpec(impl="triton")
    counted = target != -100
    scale = ce_scale(target, None, None, None, spec, 50)
    assert torch.allclose(scale, 1.0 / counted.sum().float().reshape(1))
    weighted = ce_scale(target, weight, None, None, spec, 50)
    denom = weight[target.clamp(0, 49)][counted].sum()
    assert torch.allclose(weighted, 1.0 / denom.reshape(1))
    items = ce_scale(target, None, None, torch.tensor([7], device=device), spec, 50)
    assert torch.allclose(items, torch.full((1,), 1 / 7, device=device))
    assert ce_scale(torch.full((3000,), -100, device=device), None, None, None, spec,
                    50).item() == 0.0
    rows = torch.randn(2500, device=device)
    assert torch.allclose(ce_reduce(rows, None, torch.float32), rows.sum(), rtol=1e-5)
    mean = ce_reduce(rows, scale, torch.bfloat16)
    assert mean.dtype == torch.bfloat16
    assert torch.allclose(mean.float(), (rows.sum() * scale[0]).bfloat16().float(), rtol=1e-2)
    negative = ce_reduce(-rows.abs(), torch.zeros(1, device=device), torch.float32)
    assert negative.item() == 0.0 and not torch.signbit(negative).item()


def test_backward_strides_rows_over_programs(device):
    """More rows than the backward launches programs (four per SM): each program scales
    several rows, and rows whose factor is 1 are left untouched."""
    grad = make_logits(70, 300, torch.bfloat16, device)
    factor = torch.tensor([2.0, 1.0, -0.5, 4.0, 0.25] * 14, device=device)
    expected = (grad.float() * factor[:, None]).to(grad.dtype)
    ce_bwd(grad, factor, block_size=128)
    assert torch.equal(grad, expected)
