"""Mixed precision (--target_bpw, pipeline/allocate.py): the Lagrangian allocation is optimal against brute force
among allocations of no more bits; the budget holds; the run quantizes each linear at its allocated bits, exports
them (GPTQModel's per-module overrides) and reads them back; a resumed run keeps its allocation; bad input is
refused before any weight is read."""
import itertools
import json
import random

import pytest
import torch

from affinequant.cli import run
from affinequant.config import ConfigError, QuantConfig
from affinequant.formats.export import load_quantized
from affinequant.pipeline.allocate import allocate, bits_per_weight, lagrangian_pick
from affinequant.quant.packing import PackedLinear

from conftest import save_tiny, write_text
from test_cli import _run_keeping_model


def _instance(seed, layers=5, choices=(2, 3, 4)):
    rng = random.Random(seed)
    sizes = {f"l{i}": rng.choice([64, 128, 256, 512]) for i in range(layers)}
    cost = {n: {b: bits_per_weight(b, 16, False, 64) for b in choices} for n in sizes}
    sens = {}
    for n in sizes:           # falls with the bits, at a layer-dependent rate (not necessarily convex)
        base = rng.uniform(0.1, 10)
        sens[n] = {b: base * rng.uniform(0.2, 1.0) ** (b - 2) * 4.0 ** -(b - 2) for b in choices}
    return sizes, cost, sens


def _bits(sizes, cost, choice):
    return sum(sizes[n] * cost[n][choice[n]] for n in sizes)


def _brute_best(sizes, cost, sens, budget):
    names = sorted(sizes)
    best = None
    for combo in itertools.product(*[sorted(cost[n]) for n in names]):
        choice = dict(zip(names, combo))
        if _bits(sizes, cost, choice) <= budget + 1e-9:
            value = sum(sens[n][choice[n]] for n in names)
            best = value if best is None else min(best, value)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_lagrangian_pick_is_optimal_among_allocations_of_no_more_bits(seed):
    sizes, cost, sens = _instance(seed)
    for lam in (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 1e-1):
        choice = lagrangian_pick(sizes, cost, sens, lam)
        value = sum(sens[n][choice[n]] for n in sizes)
        # for any allocation x: s(x) + λ·bits(x) >= s(pick) + λ·bits(pick), so bits(x) <= bits(pick) => s(x) >= s(pick)
        assert value <= _brute_best(sizes, cost, sens, _bits(sizes, cost, choice)) + 1e-9


@pytest.mark.parametrize("seed", range(6))
def test_allocation_meets_the_budget_and_comes_near_the_optimum(seed):
    sizes, cost, sens = _instance(seed)
    n = sum(sizes.values())
    for target in (2.5, 3.0, 3.4, 4.0):
        budget = (target + 18 / 16) * n
        choice = allocate(sizes, cost, sens, budget)
        assert _bits(sizes, cost, choice) <= budget + 1e-9
        best = _brute_best(sizes, cost, sens, budget)
        value = sum(sens[n][choice[n]] for n in sizes)
        assert value >= best - 1e-12
        # not exact (a knapsack): the greedy fill after the Lagrangian leaves at most one layer's step on the table
        assert value <= best + max(abs(sens[m][2] - sens[m][4]) for m in sizes)


def test_allocation_refuses_an_impossible_budget():
    sizes, cost, sens = _instance(0)
    with pytest.raises(ConfigError, match="fewest bits"):
        allocate(sizes, cost, sens, 1.0 * sum(sizes.values()))


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model_dir = save_tiny(tmp_path / "tiny-llama")
    return tmp_path, ["--model", model_dir, "--calib_dataset", write_text(tmp_path / "c.txt"), "--wbits", "3",
                      "--group_size", "16", "--nsamples", "4", "--seqlen", "32"]


def test_mixed_run_quantizes_exports_and_reads_back_at_the_allocated_bits(setup):
    tmp_path, common = setup
    out = tmp_path / "o"
    model = _run_keeping_model(common + ["--target_bpw", "3.2", "--real_quant", "--output_dir", str(out),
                                         "--save_dir", str(tmp_path / "saved")])
    res = json.loads((out / "results.json").read_text())
    alloc = res["mixed_precision"]
    assert alloc["bits_per_weight"] <= 3.2 and len(set(alloc["layer_bits"].values())) > 1
    for i in range(2):           # q/k/v and gate/up share a width (engines fuse them)
        b = alloc["layer_bits"]
        assert len({b[f"model.layers.{i}.self_attn.{p}_proj"] for p in "qkv"}) == 1
        assert b[f"model.layers.{i}.mlp.gate_proj"] == b[f"model.layers.{i}.mlp.up_proj"]
    packed = {n: m for n, m in model.named_modules() if isinstance(m, PackedLinear)}
    assert {n: m.bits for n, m in packed.items()} == alloc["layer_bits"]
    # the file's real bits per weight: codes, zero points and float16 scales as stored
    stored = sum(m.qweight.numel() * 32 + m.qzeros.numel() * 32 + m.scales.numel() * 16 for m in packed.values())
    weights = sum(m.in_features * m.out_features for m in packed.values())
    assert stored / weights == pytest.approx(alloc["bits_per_weight"], abs=0.05)
    config = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    overrides = {k[3:-1].replace("\\", ""): v["bits"] for k, v in config["dynamic"].items()}
    assert all(alloc["layer_bits"][n] == b for n, b in overrides.items())
    assert all(b == config["bits"] for n, b in alloc["layer_bits"].items() if n not in overrides)
    back = load_quantized(str(tmp_path / "saved"))
    ids = torch.randint(0, 96, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_resumed_mixed_run_keeps_its_allocation(setup, monkeypatch):
    tmp_path, common = setup
    flags = common + ["--target_bpw", "3.2", "--output_dir", str(tmp_path / "o")]
    first = run(flags)
    from affinequant.pipeline import allocate as allocate_module
    monkeypatch.setattr(allocate_module, "fisher_diagonal", lambda *a, **k: pytest.fail("measured again"))
    second = run(flags + ["--resume"])
    assert second["mixed_precision"]["layer_bits"] == first["mixed_precision"]["layer_bits"]


def test_mixed_gguf_writes_each_linear_in_the_type_of_its_width_exactly(setup):
    gguf = pytest.importorskip("gguf")
    from affinequant.formats.gguf import TYPE_OF_BITS, check_gguf_target, dequantized_state, save_gguf
    from test_gguf import _source
    tmp_path, common = setup
    common = [c for c in common]
    common[common.index("--group_size") + 1] = "32"
    flags = ["--target_bpw", "5.6", "--mixed_bits", "4,5,8", "--symmetric", "--wbits", "4"]
    model = _run_keeping_model(common + flags + ["--output_dir", str(tmp_path / "o")])
    layer_bits = json.loads((tmp_path / "o" / "results.json").read_text())["mixed_precision"]["layer_bits"]
    assert len(set(layer_bits.values())) > 1
    widths = list(layer_bits.values())
    most = TYPE_OF_BITS[max(set(widths), key=widths.count)]
    other = next(t for t in TYPE_OF_BITS.values() if t != most)        # the file is named by its linears, not this
    report = save_gguf(model, _source(tmp_path / "src.gguf"), str(tmp_path / "m.gguf"), other, layer_bits)
    assert report["requantized_blocks"] == 0 and report["max_abs_diff"] == 0.0
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up"}
    back = dequantized_state(str(tmp_path / "m.gguf"))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    for module, bits in layer_bits.items():
        block, _, rest = module.removeprefix("model.layers.").partition(".")
        if rest in names:           # (q and k are written in llama.cpp's rotary row order: test_gguf checks them)
            name = f"blk.{block}.{names[rest]}.weight"
            assert types[name] == TYPE_OF_BITS[bits]
            assert torch.equal(back[name], model.get_submodule(module).weight.float())
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["general.file_type"].contents() == \
        {"Q4_0": 2, "Q5_0": 8, "Q8_0": 7}[most]
    cfg = QuantConfig(wbits=3, group_size=32, symmetric=True, target_bpw=3.0, mixed_bits=(2, 3, 4))
    with pytest.raises(ConfigError, match="--mixed_bits among 4,5,8"):
        check_gguf_target(str(tmp_path / "x.gguf"), "Q4_0", cfg, "model.gguf")


@pytest.mark.parametrize("extra, expected", [
    (["--target_bpw", "1.5"], "below the fewest bits"),
    (["--target_bpw", "3", "--abits", "8"], "weight-only"),
    (["--target_bpw", "3", "--stream"], "does not work with --stream"),
    (["--target_bpw", "3", "--mixed_bits", "2,x"], "--mixed_bits"),
])
def test_bad_mixed_precision_input_is_refused(setup, capsys, extra, expected):
    tmp_path, common = setup
    with pytest.raises(SystemExit):
        run(common + extra + ["--output_dir", str(tmp_path / "o")])
    assert expected in capsys.readouterr().err
