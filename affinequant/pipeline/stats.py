"""Per-channel activation statistics of every linear's input, used to initialise LET.

act_scales[name] = max |x| over all tokens, per input channel;
act_shifts[name] = (max + min) / 2 per channel, averaged over samples as an EMA (0.99 old + 0.01 new),
as the reference's generate_act_scale_shift.py does. Keys are full module names
(model.layers.0.self_attn.q_proj). Computed block by block, so only one block is ever on the device.

Beyond the reference, act_scales["<q_proj or k_proj>" + QK_OUTPUT] = max |y| per output channel of the
adapter's q and k projections: the statistics the q ↔ k scale starts from (transforms.LET).
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models.adapters import Adapter
from ..models.blocks import block_output, capture_block_arguments
from ..stages.transforms import QK_OUTPUT


@torch.no_grad()
def collect_act_stats(model: nn.Module, adapter: Adapter, samples: torch.Tensor, device,
                      blocks=None) -> tuple[dict, dict]:
    """`blocks`: where the FP blocks come from (streaming.StreamedModel reads each from the checkpoint and
    drops it after); default the model's own."""
    from .streaming import InMemoryBlocks
    blocks = blocks or InMemoryBlocks(model, adapter)
    scales: dict[str, torch.Tensor] = {}
    shifts: dict[str, torch.Tensor] = {}
    with blocks.non_block(samples):
        inputs, block_kwargs = capture_block_arguments(model, adapter, samples, device, torch.float32)
    for index in tqdm(range(len(blocks)), desc="activation statistics", unit="block"):
        block = blocks.fp_block(index)
        orig_dtype = next(block.parameters()).dtype
        block.to(device=device, dtype=torch.float32)
        handles = []
        for name, module in block.named_modules():
            if isinstance(module, nn.Linear):
                key = f"{adapter.layers_path}.{index}.{name}"

                def hook(mod, args, key=key):
                    x = _rows(args[0])
                    _keep_max(scales, key, x.abs().amax(0).cpu())
                    mid = ((x.amax(0) + x.amin(0)) / 2).cpu()
                    shifts[key] = mid if key not in shifts else 0.99 * shifts[key] + 0.01 * mid
                handles.append(module.register_forward_pre_hook(hook))
                if name in adapter.qk_pair:
                    def out_hook(mod, args, out, key=key + QK_OUTPUT):
                        _keep_max(scales, key, _rows(out).abs().amax(0).cpu())
                    handles.append(module.register_forward_hook(out_hook))
        for i in range(inputs.shape[0]):
            inputs[i:i + 1] = block_output(block(inputs[i:i + 1].to(device), **block_kwargs[index])).float().cpu()
        for h in handles:
            h.remove()
        block.to(device="cpu", dtype=orig_dtype)
        blocks.release_fp(index)
    return scales, shifts


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., channels) -> (tokens, channels), float32."""
    return t.detach().reshape(-1, t.shape[-1]).float()


def _keep_max(stats: dict, key: str, value: torch.Tensor) -> None:
    stats[key] = value if key not in stats else torch.maximum(stats[key], value)
