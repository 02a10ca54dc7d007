"""Per-architecture glue. An adapter only *declares* where things are; the Hugging Face decoder
layers and attention run unchanged.

    norm_groups: (norm, [linears it feeds])  -- LET / affine transforms between them
    out_pair:    (v_proj, o_proj)            -- per-head transform, exact since softmax rows sum to 1
    qk_pair:     (q_proj, k_proj)            -- q divided, k multiplied by the same per-head scale
    mlp_out:     down_proj / fc2             -- the MLP's output projection (ABQ-LLM's compensation, FlatQuant)
    mlp_up:      up_proj                     -- the linear whose output multiplies into mlp_out's input channel
                                                by channel, so a per-channel scale there folds into its rows
                                                ("" where a nonlinearity sits between: OPT's fc1)
    fused:       (qkv_proj, ((q_proj, "q"), (k_proj, "kv"), (v_proj, "kv")))  -- a linear that computes
                 several projections as row slices (Phi-3); the pairs above may name its parts
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..config import ConfigError


MLP_OUTPUTS = ("down_proj", "fc2")


@dataclass(frozen=True)
class Adapter:
    model_types: tuple[str, ...]
    layers_path: str                        # attribute path from the CausalLM to the block list
    norm_groups: tuple[tuple[str, tuple[str, ...]], ...]
    out_pair: tuple[str, str]
    qk_pair: tuple[str, str]
    attention: str                          # the attention module inside a block
    rope: bool                              # q/k rotate in pairs (i, i + head_dim/2): scales must be tied per pair
    norm_has_bias: bool                     # LayerNorm-style norms can absorb LET shifts; RMSNorm cannot
    mlp_out: str = "mlp.down_proj"          # the MLP's output projection
    mlp_up: str = "mlp.up_proj"             # its input's linear factor (gated MLPs); "" where none is
    norm_weight_offset: float = 0.0         # the norms scale by (offset + weight): Gemma's (1 + w)
    qk_transform: bool = True               # False where q and k pass through their own norms (q_norm/k_norm)
    # fused linears: (name, ((part, size kind), ...)), parts in row order; size kinds "q" (heads x head_dim),
    # "kv" (KV heads x head_dim), "ffn" (intermediate size)
    fused: tuple = ()
    experts: str = ""                       # MoE: the module holding a block's 3-D expert parameters (moe.py)
    skip: tuple[str, ...] = ()              # linears kept in full precision (MoE shared-expert gates)
    # the linear of each norm group whose weight the reference code's LET initialisation reads
    # (q_proj; up_proj for Llama, fc1 for OPT): --reference_compat
    reference_init_linears: tuple[str, ...] = ()

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def sequential_groups(self, names: list[str]) -> list[list[str]]:
        """GPTQ's true-sequential order over the linears `names`: the consumers of the first norm (q/k/v),
        the consumer of v (o), the consumers of each later norm (gate/up, fc1), then the rest (down, fc2).
        A linear's inputs depend only on the groups before its own."""
        order = [list(self.norm_groups[0][1]), [self.out_pair[1]], *[list(c) for _, c in self.norm_groups[1:]]]
        placed = {n for group in order for n in group}
        rest = [n for n in names if n not in placed]
        # an MLP's output projection reads what its input projections produce (per expert in MoE blocks)
        order += [[n for n in rest if n.rsplit(".", 1)[-1] not in MLP_OUTPUTS],
                  [n for n in rest if n.rsplit(".", 1)[-1] in MLP_OUTPUTS]]
        return [[n for n in group if n in names] for group in order if any(n in names for n in group)]

    def part_rows(self, config) -> dict[str, list[tuple[str, int]]]:
        """{fused linear: [(part, rows), ...]} in row order."""
        n_heads, n_kv, head_dim = self.heads(config)
        size = {"q": n_heads * head_dim, "kv": n_kv * head_dim, "ffn": getattr(config, "intermediate_size", 0)}
        return {name: [(part, size[kind]) for part, kind in parts] for name, parts in self.fused}

    def heads(self, config) -> tuple[int, int, int]:
        n_heads = config.num_attention_heads
        n_kv = getattr(config, "num_key_value_heads", None) or n_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        return n_heads, n_kv, head_dim


_LLAMA_LIKE = dict(
    layers_path="model.layers",
    norm_groups=(("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                 ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"))),
    out_pair=("self_attn.v_proj", "self_attn.o_proj"),
    qk_pair=("self_attn.q_proj", "self_attn.k_proj"),
    attention="self_attn",
    rope=True,
    norm_has_bias=False,
    reference_init_linears=("self_attn.q_proj", "mlp.up_proj"),
)

# Gemma-2/3: sandwich norms. input_layernorm feeds q/k/v and pre_feedforward_layernorm feeds gate/up;
# post_attention_layernorm and post_feedforward_layernorm normalise the sublayers' outputs before the
# residual add, so nothing folds into them (o_proj's and down_proj's outputs are unchanged by every transform).
_GEMMA = {**_LLAMA_LIKE, "norm_groups": (
    ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj"))), "norm_weight_offset": 1.0}

ADAPTERS = [
    Adapter(model_types=("llama",), **_LLAMA_LIKE),
    Adapter(model_types=("mistral",), **_LLAMA_LIKE),
    Adapter(model_types=("qwen2",), **_LLAMA_LIKE),
    Adapter(model_types=("qwen3",), **{**_LLAMA_LIKE, "qk_transform": False}),
    Adapter(model_types=("gemma2",), **_GEMMA),
    # Phi-3: q/k/v in one qkv_proj and gate/up in one gate_up_proj; the v -> o and q <-> k transforms act on
    # qkv_proj's row slices
    Adapter(model_types=("phi3",), **{**_LLAMA_LIKE, "norm_groups": (
        ("input_layernorm", ("self_attn.qkv_proj",)), ("post_attention_layernorm", ("mlp.gate_up_proj",))),
        "reference_init_linears": ("self_attn.qkv_proj", "mlp.gate_up_proj"),
        "fused": (("self_attn.qkv_proj", (("self_attn.q_proj", "q"), ("self_attn.k_proj", "kv"),
                                          ("self_attn.v_proj", "kv"))),
                  ("mlp.gate_up_proj", (("mlp.gate_proj", "ffn"), ("mlp.up_proj", "ffn")))),
    }),
    Adapter(model_types=("gemma3_text",), **{**_GEMMA, "qk_transform": False}),
    Adapter(
        model_types=("opt",),
        layers_path="model.decoder.layers",
        norm_groups=(("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                     ("final_layer_norm", ("fc1",))),
        out_pair=("self_attn.v_proj", "self_attn.out_proj"),
        qk_pair=("self_attn.q_proj", "self_attn.k_proj"),
        attention="self_attn",
        rope=False,
        norm_has_bias=True,
        mlp_out="fc2",
        mlp_up="",
        reference_init_linears=("self_attn.q_proj", "fc1"),
    ),
]

# Mixture-of-experts: attention as Llama's (q/k norms in Qwen3-MoE and OLMoE). The post-attention norm feeds
# the router as well as every expert, and the router is no Linear, so no LET transform is placed there; each
# expert's linears are quantized (moe.py unpacks the 3-D expert parameters), the router stays in full precision.
_MOE = {**_LLAMA_LIKE, "norm_groups": _LLAMA_LIKE["norm_groups"][:1], "mlp_out": "", "mlp_up": "", "experts": "mlp.experts"}
ADAPTERS += [
    Adapter(model_types=("mixtral",), **_MOE),
    Adapter(model_types=("qwen2_moe",), **{**_MOE, "skip": ("mlp.shared_expert_gate",)}),
    Adapter(model_types=("qwen3_moe",), **{**_MOE, "qk_transform": False}),
    Adapter(model_types=("olmoe",), **{**_MOE, "qk_transform": False}),
]


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(config) -> Adapter:
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
                raise ConfigError("OPT-350m puts its layer norms after attention, so LET cannot be placed: "
                                  "use another OPT size")
            return adapter
    raise ConfigError(f"model_type '{model_type}' is not supported; supported model types: "
                      f"{', '.join(supported_model_types())}")
