"""The bundled demo model: what it knows, that 4-bit keeps it, that it loads in mlx-lm too, and
that its training script reproduces it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors import safe_open

import mlx_mistral
from mlx_mistral.batch import BatchGenerator
from mlx_mistral.demo import DEMO_MODEL_DIR
from mlx_mistral.sampling.params import SamplingParams
from training.corpus import GREETING, encode_example, eval_items, is_correct, training_examples
from training.train import LOG_NAME, MODEL_CONFIG, DemoTrainer, TrainConfig, tokenizer_path

REPO = Path(__file__).resolve().parent.parent

DEMO_4BIT_DIR = DEMO_MODEL_DIR.parent / "demo_model_4bit"
MAX_TOKENS = 48  # the longest answer (a tool call with a random id) is at most 46 tokens with </s>


def prompts(tokenizer, items) -> list[list[int]]:
    return [tokenizer.encode_chat(it.messages, tools=it.tools) for it in items]


def greedy_tokens(model, tokenizer, prompt_ids: list[list[int]]) -> list[list[int]]:
    """Greedy continuations of all prompts, decoded together in one batch (token ids, with
    the final `</s>` when the answer ended)."""
    generator = BatchGenerator(model, tokenizer, max_batch=len(prompt_ids))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    uids = [generator.add(ids, params) for ids in prompt_ids]
    out: dict[int, list[int]] = {uid: [] for uid in uids}
    while generator.has_work:
        for event in generator.step():
            if event.token is not None:
                out[event.uid].append(event.token)
    return [out[uid] for uid in uids]


def teacher_forced_argmax(
    model, prompt_ids: list[list[int]], answers: list[list[int]]
) -> list[int]:
    """The model's argmax at every position that predicts an answer token, all answers
    concatenated. One forward per sequence (prompt lengths vary 10x, so a padded batch would
    mostly compute padding); only answer rows are projected onto the vocabulary."""
    predicted: list[int] = []
    for p, a in zip(prompt_ids, answers):
        hidden = model.hidden_states(mx.array([p + a]))[0, len(p) - 1 : len(p) + len(a) - 1]
        predicted += np.array(mx.argmax(model.project(hidden), axis=-1)).tolist()
    return predicted


@pytest.fixture(scope="module")
def demo():
    return mlx_mistral.load(mlx_mistral.demo_model_path())


@pytest.fixture(scope="module")
def demo_4bit():
    return mlx_mistral.load(DEMO_4BIT_DIR)


@pytest.fixture(scope="module")
def items():
    return eval_items()


def test_checkpoint_has_mistral_v02_layout():
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["model_type"] == "mistral"
    assert config["vocab_size"] == 32000
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    # At the top level, where v0.2's config and mlx-lm have it (transformers 5 nests it too).
    assert config["rope_theta"] == MODEL_CONFIG["rope_theta"]
    with safe_open(DEMO_MODEL_DIR / "model.safetensors", "np") as f:
        names = set(f.keys())
    layer = "model.layers.{}.{}.weight"
    expected = {"model.embed_tokens.weight", "model.norm.weight"} | {
        layer.format(i, part)
        for i in range(config["num_hidden_layers"])
        for part in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        )
    }
    if not config["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    assert names == expected
    assert (DEMO_MODEL_DIR / "tokenizer.model").read_bytes() == tokenizer_path().read_bytes()
    for directory in (DEMO_MODEL_DIR, DEMO_4BIT_DIR):
        size = sum(p.stat().st_size for p in directory.iterdir())
        assert size < 12 * 2**20, f"{directory} is {size / 2**20:.1f} MiB"


def test_hello_gets_a_greeting(demo):
    model, tokenizer = demo
    text = mlx_mistral.generate(
        model,
        tokenizer,
        [{"role": "user", "content": "Hello!"}],
        params=SamplingParams(max_tokens=32, temperature=0),
    )
    assert text.strip() == GREETING


def test_held_out_phrasings_are_answered(demo, items):
    model, tokenizer = demo
    texts = mlx_mistral.batch_generate(
        model,
        tokenizer,
        prompts(tokenizer, items),
        params=SamplingParams(temperature=0, max_tokens=MAX_TOKENS),
        max_batch=len(items),
    )
    wrong = [
        (it.messages[-1]["content"], text)
        for it, text in zip(items, texts)
        if not is_correct(it, text)
    ]
    accuracy = 1 - len(wrong) / len(items)
    assert len(items) >= 40
    assert accuracy >= 0.9, f"accuracy {accuracy:.2f}; wrong: {wrong}"


def test_4bit_agrees_with_float_on_greedy_tokens(demo, demo_4bit, items):
    """Teacher-forced on the float model's greedy answers: at every answer position, the 4-bit
    model's argmax must equal the float model's."""
    model, tokenizer = demo
    model_4bit, _ = demo_4bit
    prompt_ids = prompts(tokenizer, items)
    answers = greedy_tokens(model, tokenizer, prompt_ids)
    float_pred = teacher_forced_argmax(model, prompt_ids, answers)
    q4_pred = teacher_forced_argmax(model_4bit, prompt_ids, answers)
    generated = [t for a in answers for t in a]
    total = len(generated)
    same_float = sum(f == g for f, g in zip(float_pred, generated))
    same_q4 = sum(q == f for q, f in zip(q4_pred, float_pred))
    assert total > 500
    # The batched forward reproduces the incremental greedy decode (a check on the check).
    assert same_float / total >= 0.99
    assert same_q4 / total >= 0.95, f"4-bit agrees on {same_q4 / total:.3f} of {total} tokens"


def test_mlx_lm_reads_the_demo_model(demo):
    from mlx_lm.utils import load_model

    model, tokenizer = demo
    theirs, _ = load_model(DEMO_MODEL_DIR)
    ids = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    ours_logits = model(mx.array([ids]))[0, -1].astype(mx.float32)
    their_logits = theirs(mx.array([ids]))[0, -1].astype(mx.float32)
    assert int(mx.argmax(ours_logits)) == int(mx.argmax(their_logits))
    assert mx.allclose(ours_logits, their_logits, atol=0.1).item()


def test_training_reproduces_the_logged_loss_curve():
    """The first steps of the training run, from the logged seed and settings, give the logged
    losses (the same data order, initial weights and updates)."""
    log = json.loads((DEMO_MODEL_DIR / LOG_NAME).read_text())
    steps = 30
    trainer = DemoTrainer(
        TrainConfig(**log["train_config"]),
        mlx_mistral.tokenizer.Tokenizer.from_file(tokenizer_path()),
    )
    losses = trainer.train(stop_after=steps)
    np.testing.assert_allclose(losses, log["losses"][:steps], rtol=0, atol=1e-3)
    # The curve starts at ln(32000) = 10.37 and falls: the check compares a real training run.
    assert losses[0] > 10 and losses[-1] < losses[0] - 1


def test_call_ids_are_random_and_left_out_of_the_loss():
    """The model's calls carry the random ids the server's grammar forces; the id's tokens are
    not learned, the tokens that close the call after it are."""
    tokenizer = mlx_mistral.tokenizer.Tokenizer.from_file(tokenizer_path())
    examples = training_examples()
    rows = [k for k, ex in enumerate(examples) if ex.topic == "tool_call"]
    call_ids = [examples[k].unlearned[0] for k in rows]
    assert len(set(call_ids)) == len(rows) > 500
    assert all(
        re.fullmatch(r"call_[A-Za-z0-9]{9}", i) and f'"id": "{i}"}}]' in examples[k].answer
        for i, k in zip(call_ids, rows)
    )
    trainer = DemoTrainer(TrainConfig(), tokenizer)
    _, _, mask = trainer.batch_tensors(rows[:16])
    for r, k in enumerate(rows[:16]):
        ids, prompt_len, unlearned = trainer.corpus[k]
        assert (ids, prompt_len, unlearned) == encode_example(tokenizer, examples[k])
        assert unlearned == tuple(range(unlearned[0], unlearned[-1] + 1))
        assert tokenizer.decode(ids[unlearned[0] : unlearned[-1] + 1]) == call_ids[r]
        assert tokenizer.decode(ids[unlearned[-1] + 1 : -1]) == '"}]'
        learned = {p + 1 for p in mask[r].nonzero()[:, 0].tolist()}  # target positions in ids
        assert learned == set(range(prompt_len, len(ids))) - set(unlearned)
