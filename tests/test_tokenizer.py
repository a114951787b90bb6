"""Tokenizer: loading, encode/decode, token bytes, and streaming == full decoding."""

from __future__ import annotations

import random
import shutil

import pytest

from mlx_mistral.errors import ModelLoadError
from mlx_mistral.tokenizer import Tokenizer
from tests.test_chat import SNIPPETS, conversations, random_text

TEXTS = [
    "Hello world",
    "  two leading spaces",
    "trailing  ",
    "\nstarts with a newline",
    "emoji 😀👍🏽🇫🇷🦙 and CJK 中文字符 日本語 鬱",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math letters",
    "tabs\tand\r\nCRLF",
    "[INST] not a control token </s>",
    "e\u0301 combining, \u00a0 nbsp, \u200b zero width",
    "",
]


@pytest.fixture(scope="module")
def tok(mistral_tokenizer_path) -> Tokenizer:
    return Tokenizer.from_file(mistral_tokenizer_path)


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    detok = tok.detokenizer()
    return [detok.add_token(i) for i in ids] + [detok.finalize()]


def assert_streams_like_decode(tok: Tokenizer, ids: list[int]) -> None:
    assert "".join(stream(tok, ids)) == tok.decode(ids), ids


def test_basic_properties(tok):
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.vocab_size) == (1, 2, 0, 32000)
    assert tok.special_ids == {0, 1, 2}
    assert tok.id_to_piece(1) == "<s>"
    assert tok.id_to_piece(3 + 0x0A) == "<0x0A>"


def test_from_dir_reads_tokenizer_model(tmp_path, mistral_tokenizer_path):
    shutil.copy(mistral_tokenizer_path, tmp_path / "tokenizer.model")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("Hello") == [22557]


def test_missing_or_bad_tokenizer_is_a_load_error(tmp_path):
    with pytest.raises(ModelLoadError, match="has no tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(ModelLoadError, match="not found"):
        Tokenizer.from_file(tmp_path / "nope.model")
    (tmp_path / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelLoadError, match="not a SentencePiece model"):
        Tokenizer.from_dir(tmp_path)


def test_encode_decode_round_trip(tok):
    rng = random.Random(7)
    texts = TEXTS + [random_text(rng) for _ in range(300)]
    for text in texts:
        # SentencePiece reads its own "▁" (U+2581) as a space: the one text that cannot round-trip.
        assert tok.decode(tok.encode(text)) == text.replace("\u2581", " ")
        assert tok.decode(tok.encode(text, bos=True)) == text.replace("\u2581", " ")
    assert tok.encode("Hi", bos=True)[0] == tok.bos_id


def test_decode_skips_bos_and_eos(tok):
    ids = tok.encode("Hello")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == "Hello"


def test_bad_ids_and_text(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([32000])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.detokenizer().add_token(-1)
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_streaming_equals_decode_on_conversations(tok):
    for messages in conversations(260):
        try:
            ids = tok.encode_chat(messages)
        except ValueError:
            continue  # the few conversations the chat format refuses
        assert_streams_like_decode(tok, ids)


def test_streaming_equals_decode_on_random_ids(tok):
    rng = random.Random(0)
    word_starts = [i for i in range(tok.vocab_size) if tok.id_to_piece(i).startswith("\u2581")]
    pools = [
        lambda: rng.randrange(tok.vocab_size),
        lambda: rng.choice(word_starts),
        lambda: rng.randrange(3, 259),  # any byte-fallback piece
        lambda: rng.randrange(3 + 0x80, 259),  # continuation / lead bytes
        lambda: rng.choice([0, 1, 2]),  # <unk>, <s>, </s>
    ]
    for _ in range(3000):
        ids = [rng.choice(pools)() for _ in range(rng.randint(0, 12))]
        assert_streams_like_decode(tok, ids)


def test_streaming_mid_word_and_byte_fallback_text(tok):
    rng = random.Random(3)
    for _ in range(300):
        text = "".join(rng.choice(SNIPPETS) for _ in range(rng.randint(1, 8)))
        ids = tok.encode(text)
        for start in range(min(len(ids), 4)):
            assert_streams_like_decode(tok, ids[start:])  # may begin inside a word or a character
        assert_streams_like_decode(tok, [tok.bos_id, *ids, tok.eos_id, *ids])


def test_streaming_holds_back_partial_characters(tok):
    ids = tok.encode("a🦙b")  # the llama emoji is not in the vocabulary: four byte pieces
    assert [tok.id_to_piece(i) for i in ids] == [
        "\u2581a",
        "<0xF0>",
        "<0x9F>",
        "<0xA6>",
        "<0x99>",
        "b",
    ]
    assert stream(tok, ids) == ["a", "", "", "", "🦙", "b", ""]
    # A character cut off at the end becomes one U+FFFD per byte, as SentencePiece decodes it.
    assert stream(tok, ids[:3]) == ["a", "", "", "\ufffd\ufffd"]
    # A byte that cannot start a character is released at once.
    assert stream(tok, [3 + 0x80, 3 + 0x41]) == ["\ufffd", "A", ""]


def test_streaming_leading_space_rule(tok):
    hello = tok.encode("Hello")  # "▁Hello"
    assert stream(tok, hello + hello) == ["Hello", " Hello", ""]
    assert stream(tok, [tok.bos_id, *hello]) == ["", "Hello", ""]
    assert stream(tok, [tok.unk_id, *hello]) == [" \u2047 ", " Hello", ""]
    # Continuing a raw-text prompt ("Say" -> " Hello Hello"), the first word keeps its space.
    detok = tok.detokenizer(continuation=True)
    assert [detok.add_token(i) for i in hello + hello] == [" Hello", " Hello"]


def test_streaming_work_per_token_is_bounded(tok):
    """Each step keeps at most 3 undecoded bytes, so no step re-reads the history."""
    rng = random.Random(5)
    detok = tok.detokenizer()
    pieces = []
    ids = [
        rng.randrange(3, 259) if rng.random() < 0.5 else rng.randrange(tok.vocab_size)
        for _ in range(20000)
    ]
    for i in ids:
        pieces.append(detok.add_token(i))
        assert len(detok._run) <= 3
    pieces.append(detok.finalize())
    assert "".join(pieces) == tok.decode(ids)


def test_token_bytes(tok):
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size
    assert table[3 + 0xAB] == b"\xab"
    assert table[tok.encode("Hello")[0]] == b" Hello"
    assert table[28705] == b" "  # the lone "▁" piece
    assert [table[i] for i in sorted(tok.special_ids)] == [b"<unk>", b"<s>", b"</s>"]
    rng = random.Random(11)
    for text in TEXTS + [random_text(rng) for _ in range(300)]:
        text = text.replace("\u2581", " ")
        ids = tok.encode(text)
        joined = b"".join(table[i] for i in ids)
        # The dummy-prefix space that decoding drops.
        assert joined == (b" " + text.encode("utf-8") if text else b"")
