"""SentencePiece tokenizer of Mistral-7B-Instruct-v0.2, with exact streaming detokenization.

`Tokenizer` wraps the checkpoint's `tokenizer.model` (the same file mistral-common ships as
`tokenizer.model.v1`). Decoding is SentencePiece's own; `StreamingDetokenizer` reproduces it one
token at a time, so streamed text concatenates to exactly `Tokenizer.decode(ids)`.

How SentencePiece turns ids into text (measured against `sp.decode` on random id sequences):

- `<s>` and `</s>` are invisible; `<unk>` is rendered as " ⁇ ".
- A normal piece is its text with "▁" read as a space. The first visible piece loses one leading
  "▁" (the model adds a dummy-prefix space when encoding, so decoding takes it back); control
  tokens before it do not count as visible, a byte piece or `<unk>` does.
- Byte-fallback pieces `<0x00>`..`<0xFF>` (emoji, rare CJK) are gathered into runs. A run ends at
  any other token and is decoded as UTF-8 in which every byte that does not belong to a valid
  character becomes one U+FFFD (not one per maximal invalid sequence, as Python's "replace" does).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from sentencepiece import SentencePieceProcessor

from .errors import ContextLengthExceededError, ModelLoadError

TOKENIZER_FILENAME = "tokenizer.model"
SPACE_SYMBOL = "\u2581"  # "▁", SentencePiece's visible space
UNK_SURFACE = " \u2047 "  # how SentencePiece renders <unk>: " ⁇ "

# Token kinds, precomputed once per vocabulary so the detokenizer does one list lookup per token.
_NORMAL, _BYTE, _CONTROL, _UNKNOWN = 0, 1, 2, 3


class Tokenizer:
    """The Mistral v0.2 SentencePiece tokenizer.

    Example:
        >>> from mlx_mistral import demo_model_path
        >>> tok = Tokenizer.from_dir(demo_model_path())
        >>> ids = tok.encode("Hello world", bos=True)
        >>> tok.decode(ids)
        'Hello world'
        >>> ids = tok.encode_chat([{"role": "user", "content": "Hello!"}])
        >>> tok.decode(ids)
        '[INST] Hello! [/INST]'
        >>> ids[:2] == [tok.bos_id, tok.encode("[INST]")[0]]
        True
    """

    def __init__(self, processor: SentencePieceProcessor, *, path: Path | None = None):
        """Wrap a loaded SentencePiece processor (use `from_file` / `from_dir` instead).

        Args:
            processor: A loaded `sentencepiece.SentencePieceProcessor`.
            path: The file it came from, kept for messages only.
        """
        self._sp = processor
        self.path = path
        n = processor.vocab_size()
        self._pieces: list[str] = [processor.id_to_piece(i) for i in range(n)]
        self._kinds: list[int] = []
        self._texts: list[str] = []  # visible text of normal pieces ("▁" -> " ")
        self._bytes: list[int] = []  # byte value of byte-fallback pieces, else -1
        for i, piece in enumerate(self._pieces):
            if processor.is_byte(i):
                kind, text, byte = _BYTE, "", int(piece[3:5], 16)
            elif processor.is_control(i):
                kind, text, byte = _CONTROL, "", -1
            elif processor.is_unknown(i):
                kind, text, byte = _UNKNOWN, UNK_SURFACE, -1
            else:
                kind, text, byte = _NORMAL, piece.replace(SPACE_SYMBOL, " "), -1
            self._kinds.append(kind)
            self._texts.append(text)
            self._bytes.append(byte)
        self._token_bytes: list[bytes] | None = None
        self._max_chars = _max_chars_per_token(self._kinds, self._texts, self._bytes)

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        """Load a SentencePiece model file.

        Args:
            path: Path of a `tokenizer.model` file.

        Returns:
            The tokenizer.

        Raises:
            ModelLoadError: If the file is missing or is not a SentencePiece model.
        """
        path = Path(path)
        if not path.is_file():
            raise ModelLoadError(f"tokenizer file not found: {path}")
        processor = SentencePieceProcessor()
        try:
            processor.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise ModelLoadError(f"{path} is not a SentencePiece model: {exc}") from exc
        return cls(processor, path=path)

    @classmethod
    def from_dir(cls, checkpoint_dir: str | Path) -> Tokenizer:
        """Load `tokenizer.model` from a checkpoint directory.

        Args:
            checkpoint_dir: A model directory (HF or MLX layout).

        Returns:
            The tokenizer.

        Raises:
            ModelLoadError: If the directory has no readable `tokenizer.model`.
        """
        path = Path(checkpoint_dir) / TOKENIZER_FILENAME
        if path.is_file():
            return cls.from_file(path)
        # mlx_lm.convert (and some mlx-community repos) keep only tokenizer.json. When its
        # vocabulary is exactly Mistral v0.2's, the SentencePiece model bundled with the demo
        # model is that same tokenizer.
        bundled = Path(__file__).parent / "demo_model" / TOKENIZER_FILENAME
        hf_json = Path(checkpoint_dir) / "tokenizer.json"
        if hf_json.is_file() and bundled.is_file():
            tokenizer = cls.from_file(bundled)
            if _same_vocabulary(hf_json, tokenizer._pieces):
                return tokenizer
        raise ModelLoadError(
            f"{checkpoint_dir} has no {TOKENIZER_FILENAME} (and no tokenizer.json with Mistral "
            "v0.2's vocabulary): a Mistral v0.2 checkpoint needs its SentencePiece model next "
            "to config.json"
        )

    @property
    def bos_id(self) -> int:
        """Id of `<s>`."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """Id of `</s>`."""
        return self._sp.eos_id()

    @property
    def unk_id(self) -> int:
        """Id of `<unk>`."""
        return self._sp.unk_id()

    @property
    def vocab_size(self) -> int:
        """Number of token ids (32000 for v0.2)."""
        return len(self._pieces)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids that are not text: `<unk>`, `<s>`, `</s>`."""
        return frozenset(i for i, k in enumerate(self._kinds) if k in (_CONTROL, _UNKNOWN))

    @property
    def max_chars_per_token(self) -> int | None:
        """The most characters of text one token can stand for, or None if unbounded.

        With byte fallback for all 256 bytes, every token is a piece (at most this many
        characters, "▁" counting as one) or one byte (at most one character): so a text of
        `c` characters has at least `c / max_chars_per_token` tokens, known before tokenizing.
        Without byte fallback one `<unk>` can stand for any run of characters: None.
        """
        return self._max_chars

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """Encode text with SentencePiece (a dummy-prefix space is added, as in training).

        Args:
            text: The text. Control-token spellings such as "[INST]" or "</s>" are plain text here.
            bos: Put `<s>` first.

        Returns:
            The token ids.

        Raises:
            TypeError: If `text` is not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            ids: list[int] = self._sp.encode(text)
        except RuntimeError:
            # SentencePiece's binding cannot take a lone UTF-16 surrogate ("\ud800" in JSON):
            # say so instead of its "Unable to cast Python instance" message.
            text.encode("utf-8")  # raises UnicodeEncodeError naming the position
            raise
        return [self.bos_id, *ids] if bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text exactly as SentencePiece does (`<s>`/`</s>` are skipped).

        Args:
            ids: Token ids.

        Returns:
            The text.

        Raises:
            ValueError: If an id is outside the vocabulary.
        """
        ids = [self._check_id(i) for i in ids]
        return self._sp.decode(ids)

    def encode_chat(
        self, messages: Any, *, tools: Sequence[dict[str, Any]] | None = None
    ) -> list[int]:
        """Encode an OpenAI `messages` list into prompt ids (see `mlx_mistral.chat`).

        Args:
            messages: OpenAI chat messages.
            tools: OpenAI tool definitions, or None (validated as the chat API validates them).

        Returns:
            Prompt token ids, starting with `<s>`.

        Raises:
            InvalidRequestError: If the conversation or a tool is malformed (the error names the
                field).
        """
        from .chat import encode_chat, parse_chat
        from .tools.validation import parse_tools

        conversation = parse_chat(messages)
        specs = None if tools is None else parse_tools(tools)
        return encode_chat(self, conversation, tools=specs)

    def id_to_piece(self, token_id: int) -> str:
        """The SentencePiece piece of an id (e.g. "▁Hello", "<0x0A>", "</s>")."""
        return self._pieces[self._check_id(token_id)]

    def token_bytes(self) -> list[bytes]:
        """Each token's bytes, for the whole vocabulary (indexed by id).

        Normal pieces give their UTF-8 with "▁" as a space; byte-fallback pieces `<0xAB>` give that
        one byte; `<unk>`, `<s>`, `</s>` give their piece spelling (see `special_ids`: a grammar
        engine should treat them as special, not as text). Concatenating the bytes of
        `encode(text)` gives a space followed by the UTF-8 of `text` (the dummy prefix).

        Returns:
            A list of `vocab_size` byte strings (computed once, then shared: do not mutate).
        """
        if self._token_bytes is None:
            table = []
            for kind, text, byte, piece in zip(self._kinds, self._texts, self._bytes, self._pieces):
                if kind == _BYTE:
                    table.append(bytes([byte]))
                elif kind == _NORMAL:
                    table.append(text.encode("utf-8"))
                else:
                    table.append(piece.encode("utf-8"))
            self._token_bytes = table
        return self._token_bytes

    def detokenizer(self, *, continuation: bool = False) -> StreamingDetokenizer:
        """A fresh incremental decoder for one sequence of generated ids.

        Args:
            continuation: the ids continue a raw-text prompt, so the first word keeps its
                leading space (" world" after "Hello"); an answer to a chat starts bare, as
                `decode` gives it.
        """
        return StreamingDetokenizer(self, continuation=continuation)

    def _check_id(self, token_id: int) -> int:
        if not 0 <= token_id < len(self._pieces):
            raise ValueError(
                f"token id {token_id} is outside the vocabulary [0, {len(self._pieces)})"
            )
        return token_id


def _max_chars_per_token(kinds: list[int], texts: list[str], byte_values: list[int]) -> int | None:
    if len({b for b in byte_values if b >= 0}) < 256:
        return None
    return max(1, *(len(text) for kind, text in zip(kinds, texts) if kind == _NORMAL))


class PromptBudget:
    """A tokenizer view that refuses a prompt as soon as it provably exceeds `max_tokens`.

    Each text is checked before it is tokenized: its characters alone give a lower bound on its
    tokens (`Tokenizer.max_chars_per_token`), so a prompt of megabytes is refused without the
    seconds and memory its tokenization would cost. Whatever is tokenized is counted too, so the
    texts after the first that overflows are never tokenized. It has what the chat encoder
    needs (`bos_id`, `eos_id`, `encode`).

    Example:
        >>> from mlx_mistral import demo_model_path
        >>> tok = Tokenizer.from_dir(demo_model_path())
        >>> budget = PromptBudget(tok, 8, param="prompt")
        >>> len(budget.encode("Hello", bos=True))
        2
        >>> try:
        ...     budget.encode("x" * 1000)  # refused without tokenizing
        ... except ContextLengthExceededError as exc:
        ...     print(exc.param, exc)
        prompt this model's maximum context length is 8 tokens; the prompt needs at least 65 \
(1000 characters at most 16 per token, after 2 tokens), 57 too many
    """

    def __init__(self, tokenizer: Tokenizer, max_tokens: int | None, *, param: str):
        """Args:
        tokenizer: the model's tokenizer.
        max_tokens: the most prompt tokens the model takes (its context length), or None.
        param: the request field the error names ("messages", "prompt").
        """
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.param = param
        self.tokens = 0  # tokens produced so far

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    def encode(self, text: str, *, bos: bool = False) -> list[int]:
        """`Tokenizer.encode`, refusing first if the prompt so far cannot fit.

        Raises:
            ContextLengthExceededError: the prompt provably has more than `max_tokens` tokens.
        """
        per_token = self.tokenizer.max_chars_per_token
        if self.max_tokens is not None and per_token is not None and isinstance(text, str):
            at_least = self.tokens + int(bos) + -(-len(text) // per_token)
            if at_least > self.max_tokens:
                raise ContextLengthExceededError(
                    f"this model's maximum context length is {self.max_tokens} tokens; the "
                    f"{self.param} needs at least {at_least} ({len(text)} characters at most "
                    f"{per_token} per token, after {self.tokens} tokens), "
                    f"{at_least - self.max_tokens} too many",
                    param=self.param,
                    prompt_tokens=at_least,
                    context_length=self.max_tokens,
                )
        ids = self.tokenizer.encode(text, bos=bos)
        self.tokens += len(ids)
        if self.max_tokens is not None and self.tokens > self.max_tokens:
            raise ContextLengthExceededError(
                f"this model's maximum context length is {self.max_tokens} tokens; the "
                f"{self.param} needs at least {self.tokens}, {self.tokens - self.max_tokens} too "
                "many",
                param=self.param,
                prompt_tokens=self.tokens,
                context_length=self.max_tokens,
            )
        return ids


def _same_vocabulary(tokenizer_json: Path, pieces: list[str]) -> bool:
    """True when an HF tokenizer.json maps exactly `pieces` to their ids."""
    try:
        with open(tokenizer_json, encoding="utf-8") as f:
            vocab = json.load(f)["model"]["vocab"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (
        isinstance(vocab, dict)
        and len(vocab) == len(pieces)
        and all(vocab.get(piece) == i for i, piece in enumerate(pieces))
    )


class StreamingDetokenizer:
    """Turns ids into text one at a time; the pieces add up to `Tokenizer.decode(ids)`.

    Text is released as soon as it is final. Only the bytes of a byte-fallback run that could
    still be the start of a UTF-8 character are held back (at most 3 bytes), so each step costs
    O(1) whatever the length of the sequence.

    Example:
        >>> import mlx_mistral
        >>> tok = mlx_mistral.load(mlx_mistral.demo_model_path())[1]
        >>> ids = tok.encode("Grüße 👋")
        >>> detok = tok.detokenizer()
        >>> [detok.add_token(i) for i in ids] + [detok.finalize()]  # the emoji's bytes wait
        ['Gr', 'ü', 'ße', ' ', '', '', '', '👋', '']
        >>> "".join(_) == tok.decode(ids)
        True
    """

    def __init__(self, tokenizer: Tokenizer, *, continuation: bool = False):
        """Start an empty sequence.

        Args:
            tokenizer: The tokenizer whose ids will be fed.
            continuation: keep the first piece's leading space (see `Tokenizer.detokenizer`).
        """
        self._tok = tokenizer
        self._first = not continuation  # the next visible piece loses one leading "▁"
        self._run = bytearray()  # undecoded bytes of the current byte-fallback run

    def add_token(self, token_id: int) -> str:
        """Feed one id.

        Args:
            token_id: The next token id.

        Returns:
            The text that became final with this token (often empty for a partial character).

        Raises:
            ValueError: If the id is outside the vocabulary.
        """
        tok = self._tok
        kind = tok._kinds[tok._check_id(token_id)]
        if kind == _BYTE:
            self._first = False
            self._run.append(tok._bytes[token_id])
            return self._drain(final=False)
        out = self._drain(final=True)
        if kind == _CONTROL:
            return out
        text = tok._texts[token_id]
        if self._first and kind == _NORMAL and text.startswith(" "):
            text = text[1:]
        self._first = False
        return out + text

    def finalize(self) -> str:
        """Flush the held bytes at the end of the sequence (incomplete characters become U+FFFD).

        Returns:
            The remaining text.
        """
        return self._drain(final=True)

    def _drain(self, *, final: bool) -> str:
        """Decode the byte run as SentencePiece does, keeping a possibly incomplete tail."""
        run = self._run
        out: list[str] = []
        i, n = 0, len(run)
        while i < n:
            ch, width = _decode_one(run, i, final=final)
            if width == 0:  # an incomplete but valid start: wait for more bytes
                break
            out.append(ch)
            i += width
        del run[:i]
        return "".join(out)


def _decode_one(buf: bytearray, i: int, *, final: bool) -> tuple[str, int]:
    """Decode the character starting at buf[i].

    Returns (char, bytes used): a valid character, or U+FFFD for one byte that cannot start one;
    (\"\", 0) when the bytes left are a valid prefix that more bytes could complete (unless final).
    """
    tail = bytes(buf[i : i + 4])
    try:
        ch = tail[:1].decode("utf-8")
        return ch, 1
    except UnicodeDecodeError:
        pass
    for width in (2, 3, 4):
        if width > len(tail):
            break
        try:
            return tail[:width].decode("utf-8"), width
        except UnicodeDecodeError:
            continue
    if not final and len(tail) < 4:
        try:
            tail.decode("utf-8")
        except UnicodeDecodeError as exc:
            # "unexpected end of data" at the end means every byte so far is a valid prefix.
            if exc.start == 0 and exc.end == len(tail) and "end of data" in exc.reason:
                return "", 0
    return "\ufffd", 1
