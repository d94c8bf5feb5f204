"""Parameter names -> the groups analyses report by: transformer layer, and module type.

Hugging Face decoder names look like ``model.layers.7.self_attn.q_proj.weight``: the layer is the
number after ``layers.`` (or ``h.`` / ``blocks.`` in other families); tensors outside the blocks are
grouped under their own short name (``embed``, ``norm``, ``lm_head``). Module types follow the Llama/Qwen
naming (q/k/v/o projections, gate/up/down MLP matrices), with GPT-2/NeoX aliases, and the bias of a
projection counts with its weight.
"""

from __future__ import annotations

import re

# Report order. "other" catches everything the patterns below do not name.
MODULE_TYPES = ("q", "k", "v", "o", "gate", "up", "down", "norm", "embed", "lm_head", "other")

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        ("lm_head", r"(?:^|\.)(?:lm_head|embed_out)\."),
        ("embed", r"(?:embed_tokens|wte|wpe|word_embeddings|embed_positions)\."),
        ("norm", r"(?:norm|ln_\d|ln_f|layernorm)[^.]*\."),
        ("q", r"\.(?:q_proj|query)\."),
        ("k", r"\.(?:k_proj|key)\."),
        ("v", r"\.(?:v_proj|value)\."),
        ("o", r"\.(?:o_proj|out_proj|dense|c_proj)\."),
        ("gate", r"\.(?:gate_proj|w1)\."),
        ("up", r"\.(?:up_proj|w3|c_fc|fc1|dense_h_to_4h)\."),
        ("down", r"\.(?:down_proj|w2|fc2|dense_4h_to_h)\."),
    )
)


def module_type(name: str) -> str:
    """The module type of parameter ``name``: one of :data:`MODULE_TYPES`.

    >>> module_type("model.layers.0.self_attn.q_proj.bias"), module_type("model.layers.3.mlp.down_proj.weight")
    ('q', 'down')
    """
    if ".mlp." in name and re.search(r"\.c_proj\.", name):  # GPT-2's MLP output projection
        return "down"
    for kind, pattern in _PATTERNS:
        if pattern.search(name):
            return kind
    return "other"


def layer_of(name: str) -> str:
    """``layers.<i>`` for a tensor inside transformer block i, else the tensor's group: ``embed``,
    ``norm`` (the final norm), ``lm_head`` or ``other``."""
    m = _LAYER_RE.search(name)
    if m:
        return f"layers.{int(m.group(1))}"
    kind = module_type(name)
    return kind if kind in ("embed", "norm", "lm_head") else "other"


def layer_order(group: str) -> tuple[int, int]:
    """Sort key for :func:`layer_of` groups: embed, layers 0..L-1, final norm, lm_head, other."""
    if group.startswith("layers."):
        return (1, int(group.split(".")[1]))
    return ({"embed": 0, "norm": 2, "lm_head": 3}.get(group, 4), 0)
