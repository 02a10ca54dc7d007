import math

import numpy as np
import pytest
import torch

from affinequant.quant.quantizer import ActQuantizer, WeightQuantizer


def reference_rtn(w: np.ndarray, bits: int, group: int | None, symmetric: bool, fp16_scales: bool = False) -> np.ndarray:
    """Min-max round-to-nearest written out element by element, independently of the library.
    fp16_scales: codes from the exact scale, weights rebuilt with the scale rounded to fp16 (what a
    checkpoint stores, and what the pipeline's stored weights use)."""
    out = np.empty_like(w)
    rows, cols = w.shape
    gs = group or cols
    qmax = 2**bits - 1
    for r in range(rows):
        for start in range(0, cols, gs):
            g = w[r, start:start + gs]
            lo, hi = min(g.min(), 0.0), max(g.max(), 0.0)
            if symmetric:
                scale = max(max(abs(lo), abs(hi)) / (2 ** (bits - 1) - 1), 1e-5)
                zero = 2 ** (bits - 1)
            else:
                scale = max((hi - lo) / qmax, 1e-5)
                zero = min(max(np.round(-lo / scale), 0), qmax)
            q = np.clip(np.round(g / scale) + zero, 0, qmax)
            stored = np.float32(np.float16(scale)) if fp16_scales else scale
            out[r, start:start + gs] = (q - zero) * stored
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 16, 24])      # 24 does not divide 40: a shorter last group
@pytest.mark.parametrize("symmetric", [False, True])
def test_rtn_matches_minmax_formula(bits, group, symmetric):
    torch.manual_seed(0)
    w = torch.randn(6, 40, dtype=torch.float64)
    got = WeightQuantizer(tuple(w.shape), bits, group, symmetric)(w).numpy()
    np.testing.assert_allclose(got, reference_rtn(w.numpy(), bits, group, symmetric), rtol=0, atol=1e-12)


def test_ragged_last_group_uses_only_its_own_columns():
    w = torch.full((1, 10), -100.0)
    w[0, 8:] = torch.tensor([5.0, 7.0])        # the last group (columns 8, 9) at group size 4
    q = WeightQuantizer((1, 10), 4, 4)(w)
    # its own range [0, 7] gives steps of 7/15; mixed with the -100 columns it would be 107/15
    assert (q[0, 8:] - w[0, 8:]).abs().max() <= 7 / 15 / 2 + 1e-6
    assert torch.all(q[0, :8] == -100)


def test_constant_group_is_finite():
    w = torch.full((4, 32), 0.25)
    for sym in (False, True):
        q = WeightQuantizer((4, 32), 3, 16, sym, lwc=True)(w)
        assert torch.isfinite(q).all()
    x = torch.ones(2, 5, 8)
    assert torch.isfinite(ActQuantizer(4)(x)).all()


def test_integer_codes_reproduce_fake_quant():
    torch.manual_seed(0)
    w = torch.randn(8, 40)
    wq = WeightQuantizer((8, 40), 3, 16, lwc=True)
    with torch.no_grad():
        wq.upbound_factor.uniform_(-1, 3)
    codes, scale, zero = wq.integer_codes(w)
    assert codes.min() >= 0 and codes.max() <= 7
    group = torch.arange(40) // 16
    deq = (codes - zero[:, group]) * scale[:, group]
    assert torch.equal(deq, wq(w).detach())


def test_lwc_gradient_flows_and_clips():
    w = torch.randn(4, 32)
    wq = WeightQuantizer((4, 32), 2, None, lwc=True)
    loss = (wq(w) - w).pow(2).sum()
    loss.backward()
    assert wq.upbound_factor.grad is not None and wq.upbound_factor.grad.abs().sum() > 0
    assert math.isclose(torch.sigmoid(wq.upbound_factor[0, 0, 0]).item(), 0.982, abs_tol=1e-3)


def test_activation_quantizer_is_per_token():
    x = torch.stack([torch.linspace(-1, 1, 16), torch.linspace(-100, 100, 16)])[None]
    q = ActQuantizer(4)(x)
    # each token gets its own grid: a shared grid would crush the small token to a few levels
    assert (q[0, 0] - x[0, 0]).abs().max() < 2 / 15
    assert (q[0, 1] - x[0, 1]).abs().max() < 200 / 15
    assert torch.equal(ActQuantizer(16)(x), x)


def _unfused_fake_quant(x, scale, zero, qmax):
    """The fake quantizer as separate autograd operations (the formula before the fused node)."""
    v = x / scale
    q = ((v.round() - v).detach() + v + zero).clamp(0, qmax)
    return (q - zero) * scale


@pytest.fixture(params=["eager", "compiled"])
def quant_kernels(request):
    """Each fused-quantizer test runs on the eager kernels and on the torch.compile'd ones."""
    from affinequant.quant.quantizer import KERNELS, compile_available
    if request.param == "compiled" and not compile_available():
        pytest.skip("no C++ compiler for torch.compile")
    assert KERNELS.use(request.param) == request.param
    if request.param == "compiled":                  # a compiler that is there but cannot build: fell back
        x = torch.randn(4, 8, requires_grad=True)
        ActQuantizer(4)(x).sum().backward()
        if KERNELS.mode != "compiled":
            pytest.skip("torch.compile cannot build kernels here (the fallback is tested on its own)")
    yield request.param
    assert KERNELS.mode == request.param          # not fallen back to eager on the way
    KERNELS.use("eager")


@pytest.mark.parametrize("group, symmetric, lwc, let", [(None, False, True, False), (16, False, True, True),
                                                        (16, True, True, True), (24, False, False, True)])
def test_fused_fake_quant_equals_the_unfused_formula(group, symmetric, lwc, let, quant_kernels):
    """Same values bit for bit; the same gradients, to float rounding, for the weight (through LET's scale) and
    LWC's factors: the fused node's closed form sums in another order than autograd's chain of operations."""
    from affinequant.quant import quantizer as qz
    torch.manual_seed(0)
    weight = torch.randn(32, 48)
    grad_out = torch.randn(32, 48)
    results = []
    for fused in (True, False):
        wq = WeightQuantizer((32, 48), 3, group, symmetric, lwc=lwc)
        if lwc:
            with torch.no_grad():      # factors away from their start, some groups clipped hard
                wq.upbound_factor.copy_(torch.linspace(-1, 5, wq.upbound_factor.numel()).view_as(wq.upbound_factor))
                wq.lowbound_factor.copy_(torch.linspace(4, -2, wq.lowbound_factor.numel()).view_as(wq.lowbound_factor))
        smooth = torch.linspace(0.5, 2, 48).requires_grad_(let)
        original = qz.fake_quant
        if not fused:
            qz.fake_quant = _unfused_fake_quant
        try:
            out = wq(weight * smooth)
        finally:
            qz.fake_quant = original
        params = [p for p in (smooth, wq.upbound_factor, wq.lowbound_factor) if p is not None and p.requires_grad]
        grads = torch.autograd.grad(out, params, grad_out)
        results.append((out.detach(), grads))
    (out_f, grads_f), (out_u, grads_u) = results
    assert torch.equal(out_f, out_u)
    for g_f, g_u in zip(grads_f, grads_u):
        assert torch.allclose(g_f, g_u, rtol=1e-5, atol=1e-6 * g_u.abs().max()), (g_f - g_u).abs().max()
        assert g_u.abs().sum() > 0


def test_fused_activation_quantizer_gradients_match(quant_kernels):
    """LAC's clipping factors and the input get the unfused formula's gradients through the per-token grid."""
    from affinequant.quant import quantizer as qz
    torch.manual_seed(1)
    x0 = torch.randn(2, 5, 16)
    grads = []
    for fused in (True, False):
        aq = ActQuantizer(4)
        aq.enable_lac()
        x = x0.clone().requires_grad_(True)
        original = qz.fake_quant
        if not fused:
            qz.fake_quant = _unfused_fake_quant
        try:
            out = aq(x)
        finally:
            qz.fake_quant = original
        grads.append((out.detach(), *torch.autograd.grad(out.square().sum(), [x, aq.clip_upper, aq.clip_lower])))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_kernels_that_cannot_build_fall_back_to_eager(monkeypatch, caplog):
    """A backend that fails (no compiler, no Triton) costs one warning: the same values from the eager kernels."""
    from affinequant.quant import quantizer as qz

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return call
    monkeypatch.setattr(torch, "compile", broken_compile)
    monkeypatch.setattr(qz, "_COMPILED", {})          # not the wrappers earlier tests made
    try:
        assert qz.KERNELS.use("compiled") == "compiled"
        w = torch.randn(8, 32)
        wq = WeightQuantizer((8, 32), 3, 16, lwc=True)
        with caplog.at_level("WARNING"):
            out = wq(w)
        assert qz.KERNELS.mode == "eager" and "InvalidCxxCompiler" in caplog.text
        qz.KERNELS.use("eager")
        assert torch.equal(out, wq(w))
    finally:
        qz.KERNELS.use("eager")
    with pytest.raises(ValueError, match="auto, compiled or eager"):
        qz.KERNELS.use("inductor")


def test_range_gradients_equal_autograds_over_ties(quant_kernels):
    """last_dim_range's one-kernel backward gives what autograd gives amin/amax: each extreme's gradient split
    over every entry that attains it (ties are common on weights dequantized from a coarse grid)."""
    from affinequant.quant.quantizer import last_dim_range
    torch.manual_seed(0)
    x0 = torch.randint(-3, 4, (6, 4, 16)).float()          # few levels: several entries per group tie
    g_low, g_high = torch.randn(6, 4, 1), torch.randn(6, 4, 1)
    x = x0.clone().requires_grad_(True)
    low, high = last_dim_range(x)
    ours, = torch.autograd.grad((low * g_low).sum() + (high * g_high).sum(), x)
    x = x0.clone().requires_grad_(True)
    theirs, = torch.autograd.grad((x.amin(-1, keepdim=True) * g_low).sum() + (x.amax(-1, keepdim=True) * g_high).sum(), x)
    assert torch.equal(low, x0.amin(-1, keepdim=True)) and torch.equal(high, x0.amax(-1, keepdim=True))
    assert (x0 == x0.amax(-1, keepdim=True)).sum(-1).max() > 1           # the case is there
    assert torch.allclose(ours, theirs, rtol=1e-6, atol=1e-7), (ours - theirs).abs().max()
