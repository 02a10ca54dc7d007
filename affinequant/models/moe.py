"""Mixture-of-experts blocks: transformers 5 stores a block's experts as two 3-D parameters
(gate_up_proj (E, 2I, d), down_proj (E, d, I)) inside one module, which no Linear-based quantizer sees.
Here each block's experts are unpacked into per-expert nn.Linear modules (`mlp.experts.<e>.gate_up_proj`,
`mlp.experts.<e>.down_proj`) that compute exactly what the 3-D module computes, so every stage and rounder
quantizes them like any other linear; the router stays in full precision (it is not a Linear). Each
expert counts the tokens routed to it during calibration: an expert that saw none is rounded to nearest
(no data to learn or to build a Hessian from), and the block's report says so. For a standard export the
experts are packed back into the 3-D layout, so stock transformers loads the model.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger("affinequant")


class Expert(nn.Module):
    def __init__(self, gate_up: torch.Tensor, down: torch.Tensor):
        super().__init__()
        self.gate_up_proj = nn.Linear(gate_up.shape[1], gate_up.shape[0], bias=False, device=gate_up.device,
                                      dtype=gate_up.dtype)
        self.down_proj = nn.Linear(down.shape[1], down.shape[0], bias=False, device=down.device, dtype=down.dtype)
        with torch.no_grad():
            self.gate_up_proj.weight.copy_(gate_up)
            self.down_proj.weight.copy_(down)


class ExpertLinears(nn.Module):
    """The experts of one MoE block as per-expert linears; the same forward as transformers' 3-D experts
    module (top-k routing weights applied to each expert's output)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.original_class = type(experts)
        self.num_experts = experts.num_experts
        self.act_fn = experts.act_fn
        for e in range(self.num_experts):
            self.add_module(str(e), Expert(experts.gate_up_proj[e].detach(), experts.down_proj[e].detach()))
        self.register_buffer("tokens_seen", torch.zeros(self.num_experts, dtype=torch.long), persistent=False)

    def __getitem__(self, index: int) -> Expert:
        return getattr(self, str(index))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            top_k_pos, token_idx = torch.where(top_k_index.T == e)
            if token_idx.numel() == 0:
                continue
            self.tokens_seen[e] += token_idx.numel()
            expert = self[e]
            gate, up = expert.gate_up_proj(hidden_states[token_idx]).chunk(2, dim=-1)
            h = expert.down_proj(self.act_fn(gate) * up)
            out.index_add_(0, token_idx, (h * top_k_weights[token_idx, top_k_pos, None]).to(out.dtype))
        return out

    def plain(self) -> bool:
        """Whether every expert linear is a plain nn.Linear (fake-quantized weights, no runtime quantizers)."""
        return all(type(m) is nn.Linear for e in range(self.num_experts)
                   for m in (self[e].gate_up_proj, self[e].down_proj))

    def packed(self) -> nn.Module:
        """The transformers 3-D module with these experts' current weights."""
        module = self.original_class.__new__(self.original_class)
        nn.Module.__init__(module)
        module.num_experts, module.act_fn = self.num_experts, self.act_fn
        module.gate_up_proj = nn.Parameter(torch.stack([self[e].gate_up_proj.weight.detach()
                                                        for e in range(self.num_experts)]), requires_grad=False)
        module.down_proj = nn.Parameter(torch.stack([self[e].down_proj.weight.detach()
                                                     for e in range(self.num_experts)]), requires_grad=False)
        module.hidden_dim, module.intermediate_dim = module.down_proj.shape[1], module.down_proj.shape[2]
        return module


def _is_3d_experts(module: nn.Module) -> bool:
    return isinstance(getattr(module, "gate_up_proj", None), nn.Parameter) and module.gate_up_proj.dim() == 3


def unpack_experts(root: nn.Module, adapter) -> int:
    """Replace the 3-D experts module of every block under `root` (a model or one block) by ExpertLinears;
    returns how many were replaced. A no-op for dense families."""
    if not adapter.experts:
        return 0
    count = 0
    for name, module in list(root.named_modules()):
        if name.endswith(adapter.experts) and _is_3d_experts(module):
            parent, _, child = name.rpartition(".")
            setattr(root.get_submodule(parent) if parent else root, child, ExpertLinears(module))
            count += 1
    return count


def reset_expert_counts(block: nn.Module) -> None:
    for module in block.modules():
        if isinstance(module, ExpertLinears):
            module.tokens_seen.zero_()


def expert_report(block: nn.Module) -> dict | None:
    """Tokens routed to each expert since the last reset (the block loop resets before its pass over the
    calibration samples on the FP trajectory), the experts that saw none, and their linears' names."""
    for name, module in block.named_modules():
        if isinstance(module, ExpertLinears):
            seen = module.tokens_seen.tolist()
            unseen = [e for e, n in enumerate(seen) if n == 0]
            return {"tokens_per_expert": seen, "unseen": unseen,
                    "unseen_linears": [f"{name}.{e}.{proj}" for e in unseen for proj in ("gate_up_proj", "down_proj")]}
    return None


@contextmanager
def packed_experts(model: nn.Module):
    """Within the context the model holds transformers' 3-D experts again (for a standard export)."""
    swapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, ExpertLinears) and module.plain():
            parent, _, child = name.rpartition(".")
            owner = model.get_submodule(parent)
            setattr(owner, child, module.packed())
            swapped.append((owner, child, module))
    try:
        yield
    finally:
        for owner, child, module in swapped:
            setattr(owner, child, module)
