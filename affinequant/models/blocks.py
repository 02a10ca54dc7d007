"""Running a stock Hugging Face model block by block: the arguments the model hands each decoder block
(captured without running the blocks), a block's outputs on a cache of inputs, and moving the rest of the
model (embeddings, final norm, rotary tables, head) on and off the device. The block loop, the activation
statistics and the streamed evaluation all walk the model this way."""
from __future__ import annotations

import torch
from torch import nn

from .activations import DiskActivations, empty_like
from .adapters import Adapter


class _StopForward(Exception):
    pass


def block_output(out):
    """The hidden states of what a decoder block returns (a tensor, or a tuple led by it)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def non_block_to(model: nn.Module, adapter: Adapter, device) -> None:
    """Move everything except the decoder blocks (embeddings, final norm, rotary tables, head)."""
    prefix = adapter.layers_path + "."
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(prefix) and not tensor.is_meta:     # meta: a streamed model's unloaded head
            tensor.data = tensor.data.to(device)


class _ArgumentRecorder(nn.Module):
    """Stands in for a decoder block while inputs are captured: records the keyword arguments the model
    passes to this block (and, at the first recorded block, its input), then hands the hidden states on
    unchanged, so capturing every block's arguments costs no block compute."""

    def __init__(self, index: int, sink: "_Capture"):
        super().__init__()
        self.index, self.sink = index, sink

    def forward(self, hidden_states=None, *args, **kwargs):
        return self.sink.record(self.index, hidden_states if hidden_states is not None else args[0], kwargs)


class _Capture:
    def __init__(self, first: int, last: int, cache_dtype, n_samples: int, cache_dir=None):
        self.first, self.last, self.cache_dtype = first, last, cache_dtype
        self.n_samples, self.cache_dir = n_samples, cache_dir
        self.inputs: list[torch.Tensor] = []
        self.disk = None            # --cache_dir: each sample written as it comes
        self.recorded = 0
        self.kwargs: dict[int, dict] = {}

    def record(self, index: int, hidden: torch.Tensor, kwargs: dict):
        if index == self.first:
            if self.cache_dir is None:
                self.inputs.append(hidden.detach().to(self.cache_dtype))
            else:
                if self.disk is None:
                    self.disk = DiskActivations(self.cache_dir, (self.n_samples, *hidden.shape[1:]), self.cache_dtype)
                self.disk[self.recorded:self.recorded + 1] = hidden
            self.recorded += 1
        if index not in self.kwargs:
            self.kwargs[index] = {k: v for k, v in kwargs.items()
                                  if k not in ("hidden_states", "past_key_values", "past_key_value", "use_cache")}
        if index == self.last:
            raise _StopForward
        return hidden


@torch.no_grad()
def capture_block_arguments(model: nn.Module, adapter: Adapter, samples: torch.Tensor, device,
                            cache_dtype: torch.dtype, index: int = 0, cache_dir=None) -> tuple[torch.Tensor, dict[int, dict]]:
    """Run the model up to block `index` for every sample; return that block's inputs (N, L, d) and, for
    every block from `index` on, the keyword arguments the model passes to it (mask, position embeddings...).
    They differ between blocks where the model alternates layer types (Gemma's sliding-window and global
    layers: other masks, and for Gemma-3 other RoPE tables), so each block gets its own. The blocks from
    `index` on are replaced by recorders while this runs: they cost nothing. For block 0 only the
    embeddings move to `device` and back; for a later block the model must already be on `device`.
    `cache_dir`: the inputs go to a file there as they are captured (activations.DiskActivations)."""
    layers = adapter.layers(model)
    capture = _Capture(index, len(layers) - 1, cache_dtype, samples.shape[0], cache_dir)
    originals = [layers[i] for i in range(index, len(layers))]
    for i in range(index, len(layers)):
        layers[i] = _ArgumentRecorder(i, capture)
    if index == 0:
        non_block_to(model, adapter, device)
    try:
        for sample in samples:
            try:
                model(sample[None].to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, block in zip(range(index, len(layers)), originals):
            layers[i] = block
        if index == 0:
            non_block_to(model, adapter, "cpu")
    return (capture.disk if capture.disk is not None else torch.cat(capture.inputs)), capture.kwargs


def capture_block_inputs(model: nn.Module, adapter: Adapter, samples: torch.Tensor, device,
                         cache_dtype: torch.dtype, index: int = 0) -> tuple[torch.Tensor, dict]:
    """Block `index`'s inputs and its keyword arguments (capture_block_arguments, for one block)."""
    inputs, kwargs = capture_block_arguments(model, adapter, samples, device, cache_dtype, index)
    return inputs, kwargs[index]


@torch.no_grad()
def run_block(block, inputs: torch.Tensor, kwargs: dict, batch_size: int, device, ctx_factory) -> torch.Tensor:
    """The block's outputs on `inputs`, a batch at a time, into a cache like `inputs` (in memory or on disk)."""
    outs = empty_like(inputs)
    for i in range(0, inputs.shape[0], batch_size):
        with ctx_factory():
            x = inputs[i:i + batch_size].to(device)
            outs[i:i + batch_size] = block_output(block(x, **kwargs)).to(outs.dtype)
    return outs


class _Substitute(nn.Module):
    """Stands in for a block while the head runs on given hidden states: the first returns them, the
    others hand them on."""

    def __init__(self, hidden: torch.Tensor | None):
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states=None, *args, **kwargs):
        return self.hidden if self.hidden is not None else hidden_states


def head_logits(model: nn.Module, adapter: Adapter, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The model's own head (final norm, output embedding, soft-capping...) on final hidden states `hidden`
    (B, L, d) of the tokens `ids` (B, L): the model runs with its blocks replaced by stand-ins that return
    `hidden`, so no family's head is rebuilt by hand. Differentiable in `hidden` where autograd is on."""
    layers = adapter.layers(model)
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = _Substitute(hidden if i == 0 else None)
    try:
        return model(ids, use_cache=False).logits
    finally:        # the blocks are back before the caller resumes (a generator may never be finished)
        for i, block in enumerate(originals):
            layers[i] = block
