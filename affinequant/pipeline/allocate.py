"""Mixed precision at a stated average bits per weight (--target_bpw): each linear's sensitivity to each
candidate bit width, measured on the calibration data, and the allocation that minimises their sum under the
budget.

Sensitivity (the second-order term of the loss, with the empirical Fisher for the Hessian, as OBD and
SqueezeLLM): for a linear with weight W and candidate grid Q_b,
    s(b) = ½ Σ F ⊙ (W − Q_b(W))²,    F = Σ over samples of (∂ CE / ∂W)²
where CE is the FP model's next-token cross-entropy on one calibration sample and Q_b is round-to-nearest on
the run's grid (group size, symmetry) at b bits. It weighs a weight's rounding error by how much the loss
reacts to that weight, across the whole model: what a block-wise error cannot compare between layers.

Allocation, over units (the linears that read one norm share a width, as engines fuse them): a multiple-choice
knapsack, minimise Σ s_l(b_l) subject to Σ n_l·bpw(b_l) ≤ target·Σ n_l, solved
by its Lagrangian (each layer picks argmin s_l(b) + λ·n_l·bpw(b); λ by bisection, the smallest that meets the
budget), then the bits left over spent greedily on the best ratio of sensitivity saved per bit. A Lagrangian
solution is optimal among all allocations that use no more bits than it does (tests/test_allocate.py checks
that against brute force). bpw(b) counts what the GPTQ layout stores: b bits per weight, and per group a float16
scale and, asymmetric, a b-bit zero point.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError
from ..quant.packing import dequantize
from ..quant.quantizer import WeightQuantizer, fp16_scale

log = logging.getLogger("affinequant")


def bits_per_weight(bits: int, group_size: int | None, symmetric: bool, in_features: int) -> float:
    """What the GPTQ layout stores per weight: the code, and the group's float16 scale and zero point shared."""
    return bits + (16 + (0 if symmetric else bits)) / (group_size or in_features)


def quantized_linears(model: nn.Module, adapter) -> dict[str, nn.Linear]:
    """The block linears a run quantizes, by full module name."""
    out = {}
    for i, block in enumerate(adapter.layers(model)):
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear) and name not in adapter.skip:
                out[f"{adapter.layers_path}.{i}.{name}"] = module
    return out


def fisher_diagonal(model: nn.Module, linears: dict[str, nn.Linear], samples: torch.Tensor,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """Σ over samples of the squared gradient of each sample's mean next-token cross-entropy, per weight."""
    fisher = {n: torch.zeros_like(m.weight, dtype=torch.float32, device="cpu") for n, m in linears.items()}
    model.to(device)
    flags = {n: m.weight.requires_grad for n, m in linears.items()}
    for m in linears.values():
        m.weight.requires_grad_(True)
    try:
        for sample in tqdm(samples, desc="sensitivity", unit="sample"):
            ids = sample[None].to(device)
            logits = model(ids, use_cache=False).logits[0, :-1].float()
            F.cross_entropy(logits, ids[0, 1:]).backward()
            for n, m in linears.items():
                fisher[n] += m.weight.grad.detach().float().cpu() ** 2
                m.weight.grad = None
    finally:
        for n, m in linears.items():
            m.weight.requires_grad_(flags[n])
        model.to("cpu")
    return fisher


@torch.no_grad()
def sensitivities(linears: dict[str, nn.Linear], fisher: dict[str, torch.Tensor], choices: list[int],
                  group_size: int | None, symmetric: bool) -> dict[str, dict[int, float]]:
    """s_l(b) for every linear and candidate bit width (module docstring)."""
    out = {}
    for name, module in linears.items():
        w = module.weight.detach().float().cpu()
        out[name] = {}
        for bits in choices:
            wq = WeightQuantizer(tuple(w.shape), bits, group_size, symmetric)
            codes, scale, zero = wq.integer_codes(w)
            err = w - dequantize(codes, fp16_scale(scale), zero, group_size, torch.float32)
            out[name][bits] = 0.5 * float((fisher[name] * err ** 2).sum())
    return out


def lagrangian_pick(sizes: dict[str, int], cost: dict[str, dict[int, float]],
                    sensitivity: dict[str, dict[int, float]], lam: float) -> dict[str, int]:
    """Each layer's bits minimising s_l(b) + λ·n_l·bpw(b) (ties: fewer bits)."""
    return {n: min(cost[n], key=lambda b: (sensitivity[n][b] + lam * sizes[n] * cost[n][b], b)) for n in sizes}


def allocate(sizes: dict[str, int], cost: dict[str, dict[int, float]], sensitivity: dict[str, dict[int, float]],
             budget: float) -> dict[str, int]:
    """Bits per layer minimising Σ sensitivity under Σ sizes·cost ≤ budget (total bits; module docstring)."""
    names = sorted(sizes)

    def pick(lam: float) -> dict[str, int]:
        return lagrangian_pick(sizes, cost, sensitivity, lam)

    def total(choice: dict[str, int]) -> float:
        return sum(sizes[n] * cost[n][choice[n]] for n in names)

    cheapest = {n: min(cost[n], key=lambda b: cost[n][b]) for n in names}
    if total(cheapest) > budget * (1 + 1e-12):
        raise ConfigError(f"the budget cannot be met even at the fewest bits ({total(cheapest) / sum(sizes.values()):.3f} "
                          f"bits per weight): raise --target_bpw, or add lower --mixed_bits")
    low, high = 0.0, 1.0
    while total(pick(high)) > budget:
        high *= 2
        if high > 1e300:
            return cheapest
    for _ in range(200):                    # bisection on λ: total(pick(λ)) falls as λ grows
        mid = (low + high) / 2
        if total(pick(mid)) > budget:
            low = mid
        else:
            high = mid
    choice = pick(high)
    # spend what is left: the upgrade that saves the most sensitivity per bit, while it fits
    spare = budget - total(choice)
    while True:
        best = None
        for n in names:
            for b in cost[n]:
                extra = sizes[n] * (cost[n][b] - cost[n][choice[n]])
                gain = sensitivity[n][choice[n]] - sensitivity[n][b]
                if 0 < extra <= spare and gain > 0 and (best is None or gain / extra > best[0]):
                    best = (gain / extra, n, b, extra)
        if best is None:
            return choice
        _, n, b, extra = best
        choice[n], spare = b, spare - extra


def tied_units(linears: dict[str, nn.Linear], adapter) -> dict[str, list[str]]:
    """The allocation's units: the linears that read one norm in one block (q/k/v, gate/up) share a width, since
    engines fuse them into one matrix (vLLM's qkv_proj, gate_up_proj); every other linear is a unit of its own."""
    units: dict[str, list[str]] = {}
    tied = {}
    for _, consumers in adapter.norm_groups:
        for name in consumers:
            tied[name] = consumers[0]
    prefix = adapter.layers_path + "."
    for full in linears:
        index, _, name = full[len(prefix):].partition(".")
        units.setdefault(f"{prefix}{index}.{tied.get(name, name)}", []).append(full)
    return units


def mixed_precision(model: nn.Module, adapter, samples: torch.Tensor, cfg, device: torch.device) -> dict:
    """The allocation for cfg.target_bpw over cfg.mixed_bits: {"layer_bits": {module: bits}, ...figures}."""
    linears = quantized_linears(model, adapter)
    choices = sorted(set(cfg.mixed_bits))
    fisher = fisher_diagonal(model, linears, samples, device)
    sens = sensitivities(linears, fisher, choices, cfg.group_size, cfg.symmetric)
    sizes = {n: m.weight.numel() for n, m in linears.items()}
    cost = {n: {b: bits_per_weight(b, cfg.group_size, cfg.symmetric, m.in_features) for b in choices}
            for n, m in linears.items()}
    n_weights = sum(sizes.values())
    units = tied_units(linears, adapter)
    unit_sizes = {u: sum(sizes[n] for n in members) for u, members in units.items()}
    unit_cost = {u: {b: sum(sizes[n] * cost[n][b] for n in members) / unit_sizes[u] for b in choices}
                 for u, members in units.items()}
    unit_sens = {u: {b: sum(sens[n][b] for n in members) for b in choices} for u, members in units.items()}
    unit_bits = allocate(unit_sizes, unit_cost, unit_sens, cfg.target_bpw * n_weights)
    layer_bits = {n: unit_bits[u] for u, members in units.items() for n in members}
    bpw = sum(sizes[n] * cost[n][layer_bits[n]] for n in sizes) / n_weights
    counts = {b: sum(1 for v in layer_bits.values() if v == b) for b in choices}
    share = {b: sum(sizes[n] for n, v in layer_bits.items() if v == b) / n_weights for b in choices}
    log.info("mixed precision at %.3f bits per weight (target %.3f): %s", bpw, cfg.target_bpw,
             ", ".join(f"{b}-bit {counts[b]} linears ({100 * share[b]:.1f}% of weights)" for b in choices))
    return {"layer_bits": layer_bits, "bits_per_weight": bpw, "target_bpw": cfg.target_bpw, "choices": choices,
            "linears_per_bits": {str(b): counts[b] for b in choices},
            "weight_share_per_bits": {str(b): share[b] for b in choices},
            "sensitivity": {n: {str(b): v for b, v in s.items()} for n, s in sens.items()}}
