"""The conversion itself: check everything, stream tensors into a temporary directory, rename.

Order matters for the user: every refusal (options, output directory, config, tensor names and
shapes, tokenizer) happens before any weight is read, and the output appears under its final
name only once it is complete (see output_dir.py for what --force may replace).

Test hook: when the environment variable MLX_MISTRAL_CONVERT_PAUSE_FIFO names a FIFO, the
converter blocks on it after each shard, so a test can interrupt it there without a race.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from mlx_mistral.config import ModelArgs
from mlx_mistral.errors import ConversionError
from mlx_mistral.hub import resolve_model_path

from .output_dir import check_replaceable, make_parents, remove_stale, replace, sibling
from .quantize import QuantConfig, parse_dtype, plan_outputs, transform
from .source import SourceCheckpoint
from .weight_map import TensorSpec, check_source
from .writer import ShardWriter, plan_shards, write_index

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
REQUIRED_TOKENIZER_FILE = "tokenizer.model"
# Copied when present: the tokenizer and what mlx-lm and transformers read beside it.
OPTIONAL_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)
# What a conversion writes besides weights and their index: all `--force` may replace.
SIDE_FILES = ("config.json", REQUIRED_TOKENIZER_FILE, *OPTIONAL_FILES)
# Test hook: the path of a FIFO to block on after each shard (see `_pause_between_shards`).
PAUSE_FIFO_ENV = "MLX_MISTRAL_CONVERT_PAUSE_FIFO"


def output_config(
    config: dict[str, Any], args: ModelArgs, dtype: str, quant: QuantConfig | None
) -> dict[str, Any]:
    """The output config.json: the source's, plus what readers of the mlx format need.

    - `quantization` and its alias `quantization_config`, as mlx-lm writes them.
    - `rope_theta` at the top level: transformers 5 nests it in `rope_parameters`, and mlx-lm
      0.32.2 reads only the top-level key, silently falling back to 10000 (wrong logits).
    - `tie_word_embeddings` explicit: mlx-lm's Llama defaults it to true when absent, which
      would drop a real lm_head.
    - the stored dtype, under whichever key (`dtype`, `torch_dtype`) the source used.
    """
    out = {k: v for k, v in config.items() if k != "_name_or_path"}
    out["rope_theta"] = args.rope_theta
    out["tie_word_embeddings"] = args.tie_word_embeddings
    out["head_dim"] = args.head_dim
    out["num_key_value_heads"] = args.num_key_value_heads
    keys = [k for k in ("dtype", "torch_dtype") if k in out] or ["torch_dtype"]
    for key in keys:
        out[key] = dtype
    if quant is not None:
        out["quantization"] = quant.config_block()
        out["quantization_config"] = quant.config_block()
    return dict(sorted(out.items()))


def _check_out(out: Path, src: Path, force: bool) -> None:
    exists = out.exists() or out.is_symlink()
    if exists and not force:
        raise ConversionError(f"output {out} already exists (pass --force to replace it)")
    src_real, out_real = src.resolve(), out.resolve()
    if src_real == out_real or out_real in src_real.parents:
        raise ConversionError(f"output {out} would overwrite the source checkpoint {src}")
    if src_real in out_real.parents:  # it would be written into the checkpoint it reads
        raise ConversionError(
            f"output {out} is inside the source checkpoint {src}; choose a folder outside it"
        )
    if exists:
        check_replaceable(out, SIDE_FILES)


def _write_weights(
    tmp: Path,
    source: SourceCheckpoint,
    specs: list[TensorSpec],
    dtype: mx.Dtype,
    quant: QuantConfig | None,
    max_shard_bytes: int,
    progress: bool,
) -> int:
    outputs = [o for spec in specs for o in plan_outputs(spec, dtype, quant)]
    shards = plan_shards(outputs, max_shard_bytes)
    pending = iter(specs)
    pause_fifo = os.environ.get(PAUSE_FIFO_ENV)
    with tqdm(
        total=len(specs), unit="tensor", desc="Converting", file=sys.stderr, disable=not progress
    ) as bar:
        produced: list[tuple[str, mx.array]] = []
        for shard in shards:
            with ShardWriter(tmp, shard) as writer:
                while not writer.complete:
                    if not produced:
                        spec = next(pending)
                        produced = transform(spec, source.take(spec.name), dtype, quant)
                        try:
                            mx.eval([a for _, a in produced])
                        except (RuntimeError, ValueError) as exc:
                            raise ConversionError(
                                f"cannot convert tensor {spec.name}: {exc}"
                            ) from None
                        bar.update(1)
                    name, array = produced.pop(0)
                    writer.write(name, array)
                    del array
                    if not produced:
                        # Freed buffers stay in MLX's cache: give them back, so RSS tracks one
                        # tensor.
                        mx.clear_cache()
            if pause_fifo:
                _pause_between_shards(pause_fifo)
    write_index(tmp, shards, total_parameters=sum(_numel(s.shape) for s in specs))
    return len(shards)


def _pause_between_shards(fifo: str) -> None:
    """Block until something opens `fifo` for writing and closes it (a test hook; off if unset).

    A test that signals the converter while it waits here knows a shard is on disk and the
    conversion unfinished, instead of racing it; a signal's handler runs inside the wait.
    """
    with open(fifo, "rb") as pipe:
        pipe.read()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str = "float16",
    quantize: bool = False,
    bits: int = 4,
    group_size: int = 64,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Convert a Hugging Face Mistral/Llama checkpoint to the MLX (mlx-community) format.

    Tensors are streamed one at a time, so memory holds about one tensor, not the checkpoint.
    The result is written to a temporary directory beside `out` and renamed when complete; on
    any failure (or Ctrl-C) the temporary directory is removed and `out` is left as it was.
    Temporaries that dead conversions to the same `out` left behind are removed first.

    Args:
        src: a local checkpoint directory or a Hugging Face repo id.
        out: the output directory (must not exist unless `force`).
        dtype: "float16", "bfloat16" or "float32": float tensors, scales and biases.
        quantize: store Linear and Embedding weights quantized (affine, mlx-lm's layout).
        bits: bits per quantized weight (4 or 8; also 2, 3, 5, 6).
        group_size: weights per scale/bias group: 32, 64 or 128.
        force: replace an existing `out`, only if it holds nothing but an earlier conversion's
            output, and only after the new output is complete.
        max_shard_bytes: the most tensor bytes in one safetensors shard.
        progress: show a progress bar on stderr.

    Returns:
        The output directory.

    Raises:
        ConversionError: a bad option, an existing output, or a source that is not a float
            Mistral/Llama safetensors checkpoint with a tokenizer.model (one line each).
        ModelNotFoundError: `src` is neither a local checkpoint nor a reachable repo.

    Example:
        >>> from mlx_mistral.convert import convert
        >>> path = convert(  # doctest: +SKIP
        ...     "mistralai/Mistral-7B-Instruct-v0.2", "mistral-4bit", quantize=True
        ... )
    """
    target = parse_dtype(dtype)
    quant_settings = QuantConfig(bits=bits, group_size=group_size)
    quant = quant_settings if quantize else None
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ConversionError(
            f"max shard size must be a positive number of bytes, got {max_shard_bytes!r}"
        )
    out = Path(out).expanduser().absolute()
    if (out.exists() or out.is_symlink()) and not force:
        # Cheap and common: refuse before resolving (perhaps downloading) the source.
        raise ConversionError(f"output {out} already exists (pass --force to replace it)")

    root = resolve_model_path(src)
    _check_out(out, root, force)
    source = SourceCheckpoint(root)
    if not (root / REQUIRED_TOKENIZER_FILE).is_file():
        raise ConversionError(
            f"{root} has no {REQUIRED_TOKENIZER_FILE} (the tokenizer is required)"
        )
    specs = check_source(source.args, source.shapes)

    created = make_parents(out.parent)
    remove_stale(out, SIDE_FILES)
    # os.mkdir honours the umask (mkdtemp would leave the final directory private).
    tmp = sibling(out, "tmp")
    try:
        os.mkdir(tmp)
        _write_weights(tmp, source, specs, target, quant, max_shard_bytes, progress)
        config = output_config(source.config, source.args, dtype, quant)
        (tmp / "config.json").write_text(_dumps(config), encoding="utf-8")
        for name in (REQUIRED_TOKENIZER_FILE, *OPTIONAL_FILES):
            if (root / name).is_file():
                shutil.copyfile(root / name, tmp / name)
        replace(tmp, out, force=force, side_files=SIDE_FILES)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise
    return out


def _dumps(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=4) + "\n"
