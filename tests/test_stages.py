"""The stages of the block loop: GPTQ and the clipping search against independent computations,
packed == fake-quant for every stage composition, recipes as data (files equal flags, bad recipes
refused), resume of a recipe with GPTQ."""

import pytest
import torch

from affinequant.models.adapters import get_adapter
from affinequant.pipeline.calibrate import quantize_blocks
from affinequant.config import ConfigError, QuantConfig
from affinequant.stages.gptq import GPTQ, Hessian
from affinequant.quant.packing import PackedLinear
from affinequant.quant.quantizer import WeightQuantizer
from affinequant.recipe import parse_recipe, resolve
from affinequant.stages.clip_search import search_clip_ratio
from affinequant.pipeline.stats import collect_act_stats

from conftest import tiny_model

CPU = torch.device("cpu")


def _layer_case(seed=0, out_f=12, in_f=40, n=400):
    """A weight and correlated inputs with a few outlier channels (a realistic, well-posed H)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5 + torch.eye(in_f)
    x = torch.randn(n, in_f, generator=g) @ mix
    x[:, 3] *= 8
    w = torch.randn(out_f, in_f, generator=g)
    return w, x


def reference_gptq(W, X, bits, gs, up, low, percdamp, act_order, static_groups):
    """GPTQ written out column by column, in float64, with the OBS update of the explicit inverse
    Hessian instead of GPTQ's Cholesky form and lazy blocks: the same algorithm, computed otherwise."""
    W = W.double().clone()
    out_f, n = W.shape
    H = 2 * X.double().T @ X.double() / X.shape[0]
    dead = H.diag() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    gs = gs or n
    maxq = 2 ** bits - 1

    def grid(cols, g):
        xmax = torch.sigmoid(up[:, g, 0]).double() * cols.max(1).values
        xmin = torch.sigmoid(low[:, g, 0]).double() * cols.min(1).values
        xmax, xmin = xmax.clamp(min=0), xmin.clamp(max=0)
        scale = ((xmax - xmin) / maxq).clamp(1e-5, 1e4)
        zero = (-xmin / scale).round().clamp(0, maxq)
        return scale.half().double(), zero

    n_groups = -(-n // gs)
    scale, zero = torch.zeros(out_f, n_groups, dtype=torch.double), torch.zeros(out_f, n_groups, dtype=torch.double)
    order = torch.argsort(H.diag(), descending=True).tolist() if act_order else list(range(n))
    if static_groups:
        for g in range(n_groups):
            scale[:, g], zero[:, g] = grid(W[:, g * gs:(g + 1) * gs], g)
    H += percdamp * H.diag().mean() * torch.eye(n, dtype=torch.double)
    Hinv = torch.linalg.inv(H)
    codes = torch.zeros(out_f, n, dtype=torch.int32)
    for idx, col in enumerate(order):
        g = col // gs
        if not static_groups and col % gs == 0:
            scale[:, g], zero[:, g] = grid(W[:, col:col + gs], g)
        q = (W[:, col] / scale[:, g]).round().add(zero[:, g]).clamp(0, maxq)
        codes[:, col] = q.int()
        err = (W[:, col] - (q - zero[:, g]) * scale[:, g]) / Hinv[col, col]
        rest = order[idx + 1:]
        W[:, rest] -= err[:, None] * Hinv[col, rest][None, :]
        Hinv = Hinv - Hinv[:, col:col + 1] @ Hinv[col:col + 1, :] / Hinv[col, col]
    return codes, scale.float(), zero.float()


@pytest.mark.parametrize("group_size, act_order, static_groups", [
    (8, False, True), (8, False, False), (8, True, True), (None, False, False), (16, False, False), (12, True, True),
    (12, False, False)])
def test_gptq_equals_an_independent_gptq(group_size, act_order, static_groups):
    w, x = _layer_case()
    wq = WeightQuantizer(tuple(w.shape), 3, group_size, lwc=True)
    with torch.no_grad():                      # learned clipping, different per row and group
        wq.upbound_factor.copy_(torch.rand(wq.upbound_factor.shape, generator=torch.Generator().manual_seed(1)) * 3)
        wq.lowbound_factor.copy_(torch.rand(wq.lowbound_factor.shape, generator=torch.Generator().manual_seed(2)) * 3)
    h = Hessian(w.shape[1])
    for chunk in x.split(64):
        h.add_batch(chunk)
    codes, scale, zero = GPTQ(h, 0.01, act_order, blocksize=16, static_groups=static_groups).quantize(w, wq)
    ref_codes, ref_scale, ref_zero = reference_gptq(w, x, 3, group_size, wq.upbound_factor, wq.lowbound_factor,
                                                    0.01, act_order, static_groups)
    assert torch.equal(zero, ref_zero)
    assert torch.allclose(scale, ref_scale, rtol=1e-3)
    assert (codes == ref_codes).float().mean() >= 0.99      # float32 vs float64 may flip a rare tie
    assert codes.min() >= 0 and codes.max() <= 7


def test_gptq_output_error_is_below_round_to_nearest():
    w, x = _layer_case(seed=3)
    wq = WeightQuantizer(tuple(w.shape), 3, 8)
    h = Hessian(w.shape[1])
    h.add_batch(x)
    from affinequant.quant.packing import dequantize
    codes, scale, zero = GPTQ(h).quantize(w, wq)
    gptq_w = dequantize(codes, scale, zero, 8, torch.float32)
    rtn_w = wq(w)
    err = lambda v: (x @ (v - w).T).pow(2).sum().item()  # noqa: E731
    assert err(gptq_w) < 0.8 * err(rtn_w)


def test_clip_search_equals_a_brute_force_search():
    w, x = _layer_case(seed=4)
    for metric_h in (None, "output"):
        wq = WeightQuantizer(tuple(w.shape), 3, 8)
        H = None if metric_h is None else 2 * x.T @ x / x.shape[0]
        got = search_clip_ratio(w, wq, H, grid=11, min_ratio=0.5)
        ratios = torch.linspace(1.0, 0.5, 11).tolist()
        for row in range(w.shape[0]):
            for g in range(w.shape[1] // 8):
                cols = slice(8 * g, 8 * g + 8)
                errs = []
                for r in ratios:
                    one = WeightQuantizer((1, 8), 3, 8)
                    one.clip_ratio = torch.full((1, 1, 1), r)
                    d = one(w[row:row + 1, cols]) - w[row:row + 1, cols]
                    errs.append(d.pow(2).sum().item() if H is None else (x[:, cols] @ d.T).pow(2).sum().item())
                assert got[row, g, 0].item() == pytest.approx(ratios[min(range(len(errs)), key=errs.__getitem__)])
        assert (got < 1).any()


def _quantized(recipe, real_quant, tokens, family="llama", abits=16, epochs=1):
    model = tiny_model(family)
    adapter = get_adapter(model.config)
    cfg = QuantConfig(wbits=3, abits=abits, group_size=16, epochs=epochs, recipe=recipe, real_quant=real_quant,
                      nsamples=tokens.shape[0])
    stats = collect_act_stats(model, adapter, tokens, CPU) if cfg.needs_statistics else (None, None)
    torch.manual_seed(0)
    reports = quantize_blocks(model, adapter, tokens, cfg, CPU, *stats)
    return model, reports


COMPOSITIONS = [
    ["rtn"], ["clip_search"], ["gptq"], ["lwc"], [{"let": {"ln_matrix": True}}, "lwc"],
    [{"let": {"ln_matrix": True}}, "lwc", "gptq"], ["clip_search", "gptq"],
    [{"let": {"qk_matrix": True}}, "clip_search", "lwc", {"gptq": {"act_order": True}}],
    ["let", "compensation", "lwc", "gptq"],
]


@pytest.mark.parametrize("recipe", COMPOSITIONS, ids=lambda r: "+".join(e if isinstance(e, str) else next(iter(e))
                                                                         for e in r))
def test_every_composition_packs_to_its_fake_quant_weights(recipe, tokens):
    epochs = 2 if any("lwc" in str(e) or "let" in str(e) or "compensation" in str(e) for e in recipe) else 0
    fake, _ = _quantized(recipe, False, tokens, epochs=epochs)
    packed, _ = _quantized(recipe, True, tokens, epochs=epochs)
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 14
    fake_modules = dict(fake.named_modules())
    for name, m in packed.named_modules():
        if isinstance(m, PackedLinear):
            assert torch.equal(m.weight(torch.float32), fake_modules[name].weight), name


def test_gptq_after_the_transforms_beats_both(tokens):
    """On the tiny model too, the composition's output error is below its parts' (the bench's claim)."""
    err = {}
    for key, recipe, epochs in [("rtn", ["rtn"], 0), ("gptq", ["gptq"], 0), ("let+lwc", ["let", "lwc"], 3),
                                ("let+lwc+gptq", ["let", "lwc", "gptq"], 3)]:
        _, reports = _quantized(recipe, False, tokens, epochs=epochs)
        err[key] = reports[-1].final_mse
    assert err["gptq"] < err["rtn"] and err["let+lwc+gptq"] < err["let+lwc"]


def test_recipes_refuse_what_cannot_run():
    with pytest.raises(ConfigError, match="unknown stage 'quarot'"):
        parse_recipe(["quarot"])
    with pytest.raises(ConfigError, match="has no option 'learning_rate'; its options: lr, schedule"):
        parse_recipe([{"lwc": {"learning_rate": 1}}])
    with pytest.raises(ConfigError, match="keep one rounder, last"):
        resolve(QuantConfig(recipe=["gptq", "lwc"]))
    with pytest.raises(ConfigError, match="keep one rounder, last"):
        resolve(QuantConfig(recipe=["gptq", "rtn"]))
    with pytest.raises(ConfigError, match="appears 2 times"):
        resolve(QuantConfig(recipe=["lwc", "lwc"]))
    with pytest.raises(ConfigError, match="recipe version 2 is not supported"):
        parse_recipe({"version": 2, "stages": ["lwc"]})
    with pytest.raises(ConfigError, match="would be ignored"):
        QuantConfig(recipe=["lwc"], lwc=True).validate()
    with pytest.raises(ConfigError, match="metric 'mse' is not known"):
        parse_recipe([{"clip_search": {"metric": "mse"}}])
    assert [s.name for s in resolve(QuantConfig(recipe=["lwc"]))] == ["lwc", "rtn"]


def test_flags_map_onto_the_recipe_in_one_place():
    cfg = QuantConfig(wbits=3, lwc=True, let=True, use_ln_matrix=True, clip_search=True, gptq=True, act_order=True,
                      lwc_lr=0.05, sf=0.5, epochs=2)
    data = cfg.validate().recipe_data()
    assert [e["stage"] for e in data] == ["let", "clip_search", "lwc", "gptq"]
    assert data[0]["ln_matrix"] and data[0]["sf"] == 0.5 and data[2]["lr"] == 0.05 and data[3]["act_order"]
    # --flatquant: its stage, then LWC on the same cosine schedule; the shipped recipe says the same
    from pathlib import Path
    from affinequant.recipe import load_recipe_file
    flat = QuantConfig(wbits=4, abits=4, flatquant=True, lwc_lr=0.05, gptq=True, act_order=True, epochs=1).validate()
    shipped = load_recipe_file(Path(__file__).resolve().parents[1] / "recipes" / "flatquant-gptq.yaml")
    assert flat.recipe_data() == shipped and shipped[1]["schedule"] == "cosine"


def test_sequential_groups_follow_gptq_true_sequential():
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    adapter = get_adapter(tiny_model("llama").config)
    assert adapter.sequential_groups(names) == [names[:3], names[3:4], names[4:6], names[6:]]
    opt = get_adapter(tiny_model("opt").config)
    opt_names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]
    assert opt.sequential_groups(opt_names) == [opt_names[:3], opt_names[3:4], ["fc1"], ["fc2"]]


def test_the_shipped_recipes_parse():
    from pathlib import Path
    from affinequant.recipe import load_recipe_file
    files = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert files
    for path in files:
        stages = [e["stage"] for e in load_recipe_file(path) if e["stage"] != "e2e"]   # e2e: after the block loop
        assert stages[-1] in ("rtn", "gptq", "tesseraq"), path
