"""The tensors of a Mistral/Llama checkpoint, declared once: names, shapes, quantizability.

Names are those of the Hugging Face checkpoint, which is also the mlx-community format, so the
converter never renames a tensor: it checks, casts, quantizes and re-shards. Every source is
checked against this map before a byte is written (missing, unknown and misshapen tensors).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mlx_mistral.checkpoint_files import IGNORED_SUFFIXES
from mlx_mistral.config import ModelArgs
from mlx_mistral.errors import ConversionError

Shape = tuple[int, ...]
ShapeFn = Callable[[ModelArgs], Shape]


@dataclass(frozen=True)
class TensorSpec:
    """One expected tensor.

    Attributes:
        name: the tensor's name in the checkpoint, e.g. "model.layers.0.mlp.up_proj.weight".
        shape: its shape, derived from the config.
        quantizable: a Linear or Embedding weight (quantized with -q); norms never are.
    """

    name: str
    shape: Shape
    quantizable: bool


def _q_out(a: ModelArgs) -> int:
    return a.num_attention_heads * a.head_dim


def _kv_out(a: ModelArgs) -> int:
    return a.num_key_value_heads * a.head_dim


# Per-layer templates: "{}" is the layer index. Linear weights are [out_features, in_features].
LAYER_TEMPLATES: dict[str, tuple[ShapeFn, bool]] = {
    "model.layers.{}.input_layernorm.weight": (lambda a: (a.hidden_size,), False),
    "model.layers.{}.self_attn.q_proj.weight": (lambda a: (_q_out(a), a.hidden_size), True),
    "model.layers.{}.self_attn.k_proj.weight": (lambda a: (_kv_out(a), a.hidden_size), True),
    "model.layers.{}.self_attn.v_proj.weight": (lambda a: (_kv_out(a), a.hidden_size), True),
    "model.layers.{}.self_attn.o_proj.weight": (lambda a: (a.hidden_size, _q_out(a)), True),
    "model.layers.{}.post_attention_layernorm.weight": (lambda a: (a.hidden_size,), False),
    "model.layers.{}.mlp.gate_proj.weight": (
        lambda a: (a.intermediate_size, a.hidden_size),
        True,
    ),
    "model.layers.{}.mlp.up_proj.weight": (lambda a: (a.intermediate_size, a.hidden_size), True),
    "model.layers.{}.mlp.down_proj.weight": (
        lambda a: (a.hidden_size, a.intermediate_size),
        True,
    ),
}

EMBEDDING = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

GLOBAL_TEMPLATES: dict[str, tuple[ShapeFn, bool]] = {
    EMBEDDING: (lambda a: (a.vocab_size, a.hidden_size), True),
    FINAL_NORM: (lambda a: (a.hidden_size,), False),
    LM_HEAD: (lambda a: (a.vocab_size, a.hidden_size), True),
}

_MAX_LISTED = 3


def expected_tensors(args: ModelArgs) -> list[TensorSpec]:
    """Every tensor a checkpoint for `args` holds, in file order (embedding, layers, norm, head).

    Args:
        args: the model's hyper-parameters.

    Returns:
        One TensorSpec per tensor; no lm_head when the embedding is tied to it.
    """
    specs = [TensorSpec(EMBEDDING, GLOBAL_TEMPLATES[EMBEDDING][0](args), True)]
    for i in range(args.num_hidden_layers):
        for template, (shape_fn, quantizable) in LAYER_TEMPLATES.items():
            specs.append(TensorSpec(template.format(i), shape_fn(args), quantizable))
    specs.append(TensorSpec(FINAL_NORM, GLOBAL_TEMPLATES[FINAL_NORM][0](args), False))
    if not args.tie_word_embeddings:
        specs.append(TensorSpec(LM_HEAD, GLOBAL_TEMPLATES[LM_HEAD][0](args), True))
    return specs


def is_ignored(name: str, args: ModelArgs) -> bool:
    """True for source tensors dropped on purpose (RoPE buffers, a tied lm_head copy)."""
    if name.endswith(IGNORED_SUFFIXES):
        return True
    return args.tie_word_embeddings and name == LM_HEAD


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    more = len(names) - _MAX_LISTED
    return shown + (f" and {more} more" if more > 0 else "")


def check_source(args: ModelArgs, found: Mapping[str, Shape]) -> list[TensorSpec]:
    """Match the source's tensors against the map; refuse anything that does not fit.

    Args:
        args: the hyper-parameters from the source's config.json.
        found: every tensor name in the source with its shape.

    Returns:
        The tensors to convert, in output order (ignored buffers left out).

    Raises:
        ConversionError: tensors missing, unknown, or of the wrong shape (first problem found,
            in that order, naming up to three tensors).
    """
    specs = expected_tensors(args)
    expected = {s.name for s in specs}
    missing = [s.name for s in specs if s.name not in found]
    if missing:
        raise ConversionError(
            f"source is missing {len(missing)} tensor(s) the config requires: {_listing(missing)}"
        )
    unknown = sorted(n for n in found if n not in expected and not is_ignored(n, args))
    if unknown:
        raise ConversionError(
            f"source has {len(unknown)} tensor(s) a Mistral/Llama model does not have: "
            f"{_listing(unknown)}"
        )
    for spec in specs:
        shape = tuple(found[spec.name])
        if shape != spec.shape:
            raise ConversionError(
                f"tensor {spec.name} has shape {list(shape)}, but the config implies "
                f"{list(spec.shape)}"
            )
    return specs
