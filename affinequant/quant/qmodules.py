"""The modules that stand in a Hugging Face block while it is quantized.

QuantLinear replaces nn.Linear (same parameter names, so state dicts keep their keys);
TransformedNorm wraps a norm while its LET scale is being learned; quantized attention is a
function registered in transformers' attention registry, so the HF attention code runs as is.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask

from .kronecker import kron_matmul
from .quantizer import ActQuantizer, WeightQuantizer


class OnlineTransform(nn.Module):
    """x ↦ x·(left ⊗ right) at run time (FlatQuant's transforms that no weight or norm can absorb: after a norm
    under activation quantization, before o_proj and down_proj). `right` None: the identity (o_proj's transform
    mixes heads only; its per-head part is folded into v_proj). While a stage learns it, `train_factors` holds
    the current (left, right) and overrides the buffers; the merge writes the buffers, which are saved."""

    def __init__(self, left: int, right: int | None):
        super().__init__()
        self.register_buffer("left", torch.eye(left))
        self.register_buffer("right", None if right is None else torch.eye(right))
        self.train_factors: tuple | None = None

    @property
    def sizes(self) -> list:
        return [self.left.shape[0], None if self.right is None else self.right.shape[0]]

    def use(self, left: torch.Tensor, right: torch.Tensor | None, merge: bool) -> None:
        """The stage's current factors: differentiable while training, or written into the buffers at the merge."""
        if not merge:
            self.train_factors = (left, right)
            return
        self.train_factors = None
        self.left = left.detach().float().contiguous()
        self.right = None if right is None else right.detach().float().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left, right = self.train_factors if self.train_factors is not None else (self.left, self.right)
        return kron_matmul(x, left, right)

    def extra_repr(self) -> str:
        return f"kronecker {' x '.join(str(n) for n in self.sizes if n)}"


class KeyTransform(nn.Module):
    """FlatQuant's k-cache transform, inside attention after RoPE: k ↦ k·P and q ↦ q·P⁻ᵀ per head, so every
    score q·kᵀ is unchanged and the quantized k is the transformed one."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.register_buffer("key", torch.eye(head_dim))
        self.register_buffer("query", torch.eye(head_dim))
        self.train_matrices: tuple | None = None

    def use(self, key: torch.Tensor, query: torch.Tensor, merge: bool) -> None:
        """As OnlineTransform.use: k's matrix P and q's P⁻ᵀ."""
        if not merge:
            self.train_matrices = (key, query)
            return
        self.train_matrices = None
        self.key, self.query = key.detach().float().contiguous(), query.detach().float().contiguous()

    def forward(self, query: torch.Tensor, key: torch.Tensor):
        k_mat, q_mat = self.train_matrices if self.train_matrices is not None else (self.key, self.query)
        return query @ q_mat.to(query.dtype), key @ k_mat.to(key.dtype)


class QuantLinear(nn.Module):
    """A linear whose weight is fake-quantized (WeightQuantizer, with LWC) and whose input is
    quantized per token. During training, `temp_weight`/`temp_bias` hold the transformed weights
    (a differentiable function of the LET parameters) and the stored weight stays untouched."""

    def __init__(self, linear: nn.Linear, weight_quantizer: WeightQuantizer | None,
                 act_quantizer: ActQuantizer | None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.weight_quantizer = weight_quantizer
        self.act_quantizer = act_quantizer
        self.temp_weight: torch.Tensor | None = None
        self.temp_bias: torch.Tensor | None = None
        self.online: OnlineTransform | None = None      # applied to the input first (FlatQuant)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.online is not None:
            x = self.online(x)
        weight = self.weight if self.temp_weight is None else self.temp_weight
        bias = self.bias if self.temp_bias is None else self.temp_bias
        if self.weight_quantizer is not None:
            weight = self.weight_quantizer(weight)
        if self.act_quantizer is not None:
            x = self.act_quantizer(x)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear with the current stored weights (for weight-only models)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.weight = self.weight
        if self.bias is not None:
            linear.bias = self.bias
        return linear

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class TransformedNorm(nn.Module):
    """norm(x) followed by an equivalent transform: ((y + bias − shift) / scale) · inverse.

    While training, `scale`/`shift` (LET) or `inverse_train` (AffineQuant) are set every step.
    After the merge a LET scale is folded into the norm and this wrapper is removed; an
    AffineQuant matrix cannot be folded into a norm, so its inverse stays here as a buffer,
    part of the model's state dict, applied at run time (the reference drops it on reload).
    A shift after a norm that has no bias (RMSNorm, under --reference_compat) stays here as `bias`.
    """

    def __init__(self, norm: nn.Module, hidden_size: int | None = None, with_bias: bool = False):
        super().__init__()
        self.norm = norm
        self.scale: torch.Tensor | None = None
        self.shift: torch.Tensor | None = None
        self.inverse_train: torch.Tensor | None = None
        # None until a matrix is merged; given hidden_size, an empty one for load_state_dict to fill
        self.register_buffer("inverse", None if hidden_size is None else torch.zeros(hidden_size, hidden_size))
        self.register_buffer("bias", torch.zeros(norm.weight.shape[0]) if with_bias else None)
        self.online: OnlineTransform | None = None      # FlatQuant's transform of the norm's output

    def set_inverse(self, inverse: torch.Tensor) -> None:
        self.inverse_train = None
        self.register_buffer("inverse", inverse.to(torch.float32).contiguous())

    def set_bias(self, bias: torch.Tensor) -> None:
        self.register_buffer("bias", bias.to(torch.float32).contiguous())

    @property
    def holds_runtime_ops(self) -> bool:
        """Whether the merged wrapper still does something the stock norm cannot."""
        return self.inverse is not None or self.bias is not None or self.online is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.shift is not None:
            y = y - self.shift.to(y.dtype)
        if self.scale is not None:
            y = y / self.scale.to(y.dtype)
        inverse = self.inverse_train if self.inverse_train is not None else self.inverse
        if inverse is not None:
            y = (y.float() @ inverse).to(y.dtype)
        if self.online is not None:
            y = self.online(y)
        return y


class QKVQuantizers(nn.Module):
    """Per-token, per-head dynamic quantizers of what attention reads: q at `q_bits`, k and v (the KV cache) at
    `kv_bits` (None: as `bits`), asymmetric as the KV-cache methods do (under `reference`, OmniQuant's quantizers
    follow `symmetric` like every activation); a width of 16 leaves that input alone. `k_transform`: FlatQuant's
    k-cache transform, applied before the quantizers."""

    def __init__(self, bits: int, symmetric: bool = False, reference: bool = False, q_bits: int | None = None,
                 kv_bits: int | None = None):
        super().__init__()
        q_bits = bits if q_bits is None else q_bits
        kv_bits = bits if kv_bits is None else kv_bits
        kv_symmetric = symmetric if reference else False
        self.q = ActQuantizer(q_bits, symmetric, reference) if q_bits < 16 else None
        self.k = ActQuantizer(kv_bits, kv_symmetric, reference) if kv_bits < 16 else None
        self.v = ActQuantizer(kv_bits, kv_symmetric, reference) if kv_bits < 16 else None
        self.k_transform: KeyTransform | None = None

    def forward(self, query, key, value):
        if self.k_transform is not None:
            query, key = self.k_transform(query, key)
        return tuple(x if quantizer is None else quantizer(x)
                     for x, quantizer in ((query, self.q), (key, self.k), (value, self.v)))


ATTN_IMPLEMENTATION = "affinequant_sdpa"
MASKED_LOGIT = -1e9     # finite, so that (P - Q)(log P - log Q) is 0 (not NaN) where both maps are masked


class AttentionRead:
    """What one attention call read: q and k (after RoPE and their quantizers), the mask, the scaling
    and the GQA group count; `log_probs()` rebuilds its attention map (batch, heads, queries, keys)."""

    def __init__(self, query, key, mask, scaling: float, groups: int, softcap: float | None = None):
        self.query, self.key, self.mask, self.scaling, self.groups = query, key, mask, scaling, groups
        self.softcap = softcap

    def log_probs(self) -> torch.Tensor:
        key = repeat_kv(self.key, self.groups) if self.groups > 1 else self.key
        logits = (self.query.float() @ key.float().transpose(-1, -2)) * self.scaling
        if self.softcap:                # Gemma-2's attention logit soft-capping
            logits = torch.tanh(logits / self.softcap) * self.softcap
        q_len, k_len = logits.shape[-2:]
        if self.mask is None:         # SDPA's is_causal path (aligned to the last key, as with a cache)
            allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=logits.device).tril(k_len - q_len)
        elif self.mask.dtype == torch.bool:
            allowed = self.mask
        else:
            allowed = self.mask > torch.finfo(self.mask.dtype).min / 2
        return logits.masked_fill(~allowed, MASKED_LOGIT).log_softmax(-1)


class _AttentionRead(Exception):
    pass


class AttentionProbe:
    """`with AttentionProbe() as reads:` records an AttentionRead for every attention call of the models
    run inside (through quantized_sdpa). With stop=True the forward ends at the first attention call
    (the rest of the block is not needed for the map), and the context swallows that stop."""
    _active: list = []

    def __init__(self, stop: bool = False):
        self.reads: list[AttentionRead] = []
        self.stop = stop

    def __enter__(self) -> list:
        AttentionProbe._active.append(self)
        return self.reads

    def __exit__(self, exc_type, exc, tb) -> bool:
        AttentionProbe._active.remove(self)
        return exc_type is _AttentionRead

    @classmethod
    def record(cls, module, query, key, mask, scaling, softcap=None) -> None:
        if not cls._active:
            return
        probe = cls._active[-1]
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        probe.reads.append(AttentionRead(query, key, mask, scaling, getattr(module, "num_key_value_groups", 1),
                                         softcap))
        if probe.stop:
            raise _AttentionRead


def _eager_of_model(module, query, key, value, attention_mask, **kwargs):
    """The eager attention of the module's own modeling file (Gemma-2's soft-capping lives there)."""
    return sys.modules[type(module).__module__].eager_attention_forward(module, query, key, value, attention_mask,
                                                                        **kwargs)


def _quantized(base):
    def attention(module, query, key, value, attention_mask, **kwargs):
        """`base` attention with q/k/v fake-quantized when the attention module carries QKVQuantizers.
        q and k arrive here after RoPE (and q/k norms), in (batch, heads, tokens, head_dim): the quantizer's
        last-dimension grid is per token and per head. An active AttentionProbe sees what attention reads."""
        quantizers = getattr(module, "qkv_quantizers", None)
        if quantizers is not None:
            query, key, value = quantizers(query, key, value)
        AttentionProbe.record(module, query, key, attention_mask, kwargs.get("scaling"), kwargs.get("softcap"))
        return base(module, query, key, value, attention_mask, **kwargs)
    return attention


quantized_sdpa = _quantized(sdpa_attention_forward)
quantized_eager = _quantized(_eager_of_model)
ATTN_IMPLEMENTATION_EAGER = "affinequant_eager"
AttentionInterface.register(ATTN_IMPLEMENTATION, quantized_sdpa)
AttentionInterface.register(ATTN_IMPLEMENTATION_EAGER, quantized_eager)
# Without a mask function of the same name transformers would build no causal mask at all.
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, sdpa_mask)
ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION_EAGER, eager_mask)


def use_quantized_attention(model: nn.Module) -> None:
    """Route every attention module of `model` through our attention function, on top of the model's own
    implementation: SDPA, or the model's eager attention where the model runs eager (Gemma-2, whose
    soft-capping SDPA cannot do)."""
    current = model.config._attn_implementation
    name = current if current in (ATTN_IMPLEMENTATION, ATTN_IMPLEMENTATION_EAGER) else (
        ATTN_IMPLEMENTATION_EAGER if current == "eager" else ATTN_IMPLEMENTATION)
    model.config._attn_implementation = name
    for sub in model.modules():
        cfg = getattr(sub, "config", None)
        if cfg is not None and cfg is not model.config and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = name


def install_quantizers(block: nn.Module, adapter, abits: int, symmetric: bool, weight_quantizer_for,
                       reference: bool = False, q_bits: int | None = None, kv_bits: int | None = None) -> dict:
    """Replace every nn.Linear of `block` by a QuantLinear (weight quantizer from
    `weight_quantizer_for(name, weight)`, per-token input quantizer when abits < 16) and give its
    attention q/k/v quantizers (q at q_bits, k and v at kv_bits; both default to abits) where any is below 16.
    Used for calibration and again when a saved model is rebuilt.
    `reference`: the activation grids follow the reference code's range convention."""
    linears = {}
    for name, module in list(block.named_modules()):
        if isinstance(module, nn.Linear) and name not in adapter.skip:
            aq = ActQuantizer(abits, symmetric, reference) if abits < 16 else None
            qlinear = QuantLinear(module, weight_quantizer_for(name, module.weight), aq).to(module.weight.device)
            set_submodule(block, name, qlinear)
            linears[name] = qlinear
    q_bits = abits if q_bits is None else q_bits
    kv_bits = abits if kv_bits is None else kv_bits
    if min(q_bits, kv_bits) < 16:
        block.get_submodule(adapter.attention).qkv_quantizers = QKVQuantizers(abits, symmetric, reference, q_bits,
                                                                              kv_bits)
    return linears


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)
