"""Offline generation from Python: `stream_generate` -> `generate`, and `batch_generate`.

All three drive the same `BatchGenerator` the server's engine uses, on the calling thread, and
take the sampling fields as one `SamplingParams` (`params=`), the object the server builds from a
request. `stream_generate` and `generate` take the chat API's `tools`, `tool_choice`,
`parallel_tool_calls` and `response_format` too, enforced by the same grammars as in the server.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .batch import BatchGenerator, TokenEvent
from .chat import encode_chat_request
from .errors import InvalidRequestError
from .model import Model
from .prefix_cache import PrefixCache
from .sampling.params import SamplingParams
from .sampling.sampler import TokenLogprobs
from .tokenizer import Tokenizer
from .tools.grammar import make_constraints
from .tools.spec import StructuredRequest
from .tools.validation import parse_structured_request

Prompt = str | Sequence[dict[str, Any]] | Sequence[int]

DEFAULT_MAX_TOKENS = 256
"""max_tokens when no `params` are given: a short answer, not a run to the context window."""


@dataclass(frozen=True)
class GenerationChunk:
    """One step of a generation: the new text, the token, and why it ended (on the last chunk)."""

    text: str
    token: int | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: TokenLogprobs | None = None


def prompt_ids(
    tokenizer: Tokenizer, prompt: Prompt, spec: StructuredRequest | None = None
) -> tuple[list[int], StructuredRequest]:
    """Token ids of a prompt, and `spec` for it: chat messages are formatted as
    Mistral-Instruct (with `spec.prompt_tools` rendered in, and `spec` told whether the history
    holds tool calls); a string is raw text (with the BOS token, no chat template); a list of
    ints is used as is.

    Raises:
        InvalidRequestError: a bad message, or tools with a prompt that is not chat messages
            (only the chat format shows the model its tools).
    """
    spec = spec or StructuredRequest()
    if isinstance(prompt, str):
        ids = tokenizer.encode(prompt, bos=True)
    else:
        ids = list(prompt)
        if not _is_token_ids(ids):
            return encode_chat_request(tokenizer, ids, spec)
    if spec.prompt_tools:
        raise InvalidRequestError(
            "tools need a chat prompt (a list of messages), which shows the model the tools; "
            "this prompt is raw text or token ids",
            param="tools",
        )
    return ids, spec


def _is_token_ids(prompt: Sequence[Any]) -> bool:
    return bool(prompt) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)


def continues(prompt: Prompt) -> bool:
    """Whether generated text continues the prompt (raw text or token ids: its first word keeps
    its leading space) rather than answering chat messages."""
    return isinstance(prompt, str) or _is_token_ids(list(prompt))


def _chunk(event: TokenEvent) -> GenerationChunk:
    return GenerationChunk(
        event.text,
        event.token,
        event.finish_reason,
        event.prompt_tokens,
        event.completion_tokens,
        event.logprobs,
    )


def stream_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompt: Prompt,
    *,
    params: SamplingParams | None = None,
    prefill_chunk: int = 512,
    tools: Sequence[dict[str, Any]] | None = None,
    tool_choice: str | dict[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
    response_format: dict[str, Any] | None = None,
) -> Iterator[GenerationChunk]:
    """Generate text token by token.

    Args:
        model, tokenizer: from `mlx_mistral.load`.
        prompt: chat messages ([{"role": "user", "content": ...}]), raw text, or token ids.
        params: the sampling fields, meaning what the chat API's fields mean (default:
            `SamplingParams(max_tokens=DEFAULT_MAX_TOKENS)`); one choice (`n` = 1).
        tools, tool_choice, parallel_tool_calls, response_format: as in the chat API (see
            `mlx_mistral.tools.validation.parse_structured_request`); tools need chat
            messages. A call is written as `[TOOL_CALLS] [...]` in the text:
            `mlx_mistral.tools.parsing.split_tool_calls(text)` reads it into OpenAI tool calls.

    Yields:
        GenerationChunk: text safe to print (whole UTF-8 characters, never part of a stop
        string); the last one carries finish_reason "stop", "length" or "tool_calls".

    Raises:
        InvalidRequestError: a bad argument, naming it.
        ContextLengthExceededError: the prompt does not fit the context window.

    Example:
        >>> import mlx_mistral
        >>> from mlx_mistral import SamplingParams
        >>> model, tokenizer = mlx_mistral.load(mlx_mistral.demo_model_path())
        >>> for chunk in stream_generate(model, tokenizer, [{"role": "user", "content": "Hello!"}],
        ...                              params=SamplingParams(max_tokens=8, temperature=0)):
        ...     print(chunk.text, end="")
        Hello! It's nice to meet
    """
    if params is None:
        params = SamplingParams(max_tokens=DEFAULT_MAX_TOKENS)
    if params.n != 1:  # the chunks carry no choice index; batch_generate runs many prompts
        raise InvalidRequestError(
            f"stream_generate makes one choice: n must be 1, got {params.n}.", param="n"
        )
    spec = parse_structured_request(
        tools=None if tools is None else list(tools),
        tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls,
        response_format=response_format,
    )
    ids, spec = prompt_ids(tokenizer, prompt, spec)
    constraints = make_constraints(spec, tokenizer, 1, seed=params.seed, prompt=ids)
    generator = BatchGenerator(model, tokenizer, prefill_chunk=prefill_chunk)
    generator.add(ids, params, constraints=constraints, continuation=continues(prompt))
    try:
        while generator.has_work:
            for event in generator.step():
                yield _chunk(event)
    finally:  # also when the caller stops iterating early
        generator.close()


def generate(model: Model, tokenizer: Tokenizer, prompt: Prompt, **kwargs: Any) -> str:
    """Generate and return the whole text; takes the keyword arguments of `stream_generate`.

    Example:
        >>> import mlx_mistral
        >>> from mlx_mistral import SamplingParams
        >>> model, tokenizer = mlx_mistral.load(mlx_mistral.demo_model_path())
        >>> text = generate(model, tokenizer, [{"role": "user", "content": "Hello!"}],
        ...                 params=SamplingParams(max_tokens=16, temperature=0))
        >>> isinstance(text, str)
        True

    Example (a call forced by `tool_choice`; `split_tool_calls` reads it):
        >>> from mlx_mistral.tools.parsing import split_tool_calls
        >>> tz = {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
        ...       "required": ["tz"], "additionalProperties": False}
        >>> tools = [{"type": "function", "function": {"name": "get_time", "parameters": tz}}]
        >>> text = generate(model, tokenizer, [{"role": "user", "content": "Time?"}], tools=tools,
        ...                 tool_choice="required", parallel_tool_calls=False,
        ...                 params=SamplingParams(max_tokens=64))
        >>> content, calls = split_tool_calls(text)
        >>> call = calls[0]["function"]
        >>> call["name"], call["arguments"] in ('{"tz": "UTC"}', '{"tz": "CET"}')
        ('get_time', True)
    """
    return "".join(chunk.text for chunk in stream_generate(model, tokenizer, prompt, **kwargs))


def batch_generate(
    model: Model,
    tokenizer: Tokenizer,
    prompts: Sequence[Prompt],
    *,
    params: SamplingParams | Sequence[SamplingParams] | None = None,
    max_batch: int = 32,
    prefill_chunk: int = 512,
    prefix_cache_bytes: int = 0,
) -> list[str]:
    """Generate for many prompts at once, decoding them together in one batch.

    Args:
        prompts: each chat messages, raw text or token ids.
        params: one SamplingParams for all prompts, or one per prompt (default: greedy, at most
            `DEFAULT_MAX_TOKENS` tokens).
        prefix_cache_bytes: reuse KV state across prompts that share a prefix (0: off).

    Returns:
        The generated texts, in the order of `prompts`.

    Example:
        >>> import mlx_mistral
        >>> from mlx_mistral import SamplingParams
        >>> model, tokenizer = mlx_mistral.load(mlx_mistral.demo_model_path())
        >>> greedy = SamplingParams(temperature=0, max_tokens=4)
        >>> texts = batch_generate(model, tokenizer, ["Hello", "Paris is"], params=greedy)
        >>> len(texts)
        2
    """
    if params is None:
        params = SamplingParams(temperature=0.0, max_tokens=DEFAULT_MAX_TOKENS)
    per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(per_prompt) != len(prompts):
        raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
    cache = PrefixCache(prefix_cache_bytes) if prefix_cache_bytes else None
    generator = BatchGenerator(
        model, tokenizer, prefill_chunk=prefill_chunk, max_batch=max_batch, prefix_cache=cache
    )
    uids = [
        generator.add(prompt_ids(tokenizer, p)[0], sp, continuation=continues(p))
        for p, sp in zip(prompts, per_prompt)
    ]
    texts = {uid: "" for uid in uids}
    try:
        while generator.has_work:
            for event in generator.step():
                if event.index == 0:
                    texts[event.uid] += event.text
    finally:  # interrupted (KeyboardInterrupt): MLX must not be left computing at exit
        generator.close()
    return [texts[uid] for uid in uids]
