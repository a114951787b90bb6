"""A request cancelled while its long prompt is still being prefilled, chunk by chunk.

The step after the cancel reports it cancelled, drops its partly filled KV cache and the KV
budget it held (a request waiting for that room is admitted), and the rows already decoding go
on as if it had never come.
"""

from __future__ import annotations

from mlx_mistral import SamplingParams
from mlx_mistral.batch import BatchGenerator

CHUNK = 16  # prompt tokens per prefill step
RUNNING = SamplingParams(temperature=0, max_tokens=30)


def chat(tokenizer, text: str) -> list[int]:
    return tokenizer.encode_chat([{"role": "user", "content": text}])


def greedy_alone(model, tokenizer, prompt: list[int], params: SamplingParams) -> list[int]:
    generator = BatchGenerator(model, tokenizer, prefill_chunk=CHUNK, prompt_lookup=False)
    uid = generator.add(prompt, params)
    tokens = []
    while generator.has_work:
        tokens += [e.token for e in generator.step() if e.uid == uid and e.token is not None]
    return tokens


def test_cancel_mid_prefill_frees_its_kv_and_budget_and_the_batch_decodes_on(tiny_model):
    model, tokenizer = tiny_model
    short, later = chat(tokenizer, "Hello!"), chat(tokenizer, "2+2?")
    long_prompt = tokenizer.encode("word " * 120, bos=True)
    assert len(long_prompt) > 6 * CHUNK and max(len(short), len(later)) <= CHUNK
    # Room for the running row beside the long prompt, but not for a third row as well (rows
    # are padded to the longest): `later` waits until the long prompt's reservation goes.
    long_reserved = len(long_prompt) + 4
    budget = (2 * long_reserved + 20) * BatchGenerator(model, tokenizer).kv_bytes_per_token
    generator = BatchGenerator(
        model, tokenizer, prefill_chunk=CHUNK, kv_budget_bytes=budget, prompt_lookup=False
    )
    running = generator.add(short, RUNNING)
    running_tokens = [e.token for e in generator.step() if e.uid == running]
    long_uid = generator.add(long_prompt, SamplingParams(temperature=0, max_tokens=4))
    later_uid = generator.add(later, SamplingParams(temperature=0, max_tokens=5))
    for _ in range(2):
        events = generator.step()
        running_tokens += [e.token for e in events if e.uid == running]
        assert {e.uid for e in events} == {running}
    (prefilling,) = generator.prefilling
    assert prefilling.uid == long_uid and 0 < prefilling.prefilled < len(long_prompt)
    assert [r.uid for r in generator.waiting] == [later_uid]  # no room beside the long prompt

    generator.cancel(long_uid)
    events = generator.step()
    assert [e.finish_reason for e in events if e.uid == long_uid] == ["cancelled"]
    assert prefilling.cache is None and not generator.prefilling  # its KV is dropped
    assert not generator.waiting  # the budget it held let `later` in, in this very step
    assert any(e.uid == later_uid and e.token is not None for e in events)
    assert any(e.uid == running and e.token is not None for e in events)

    running_tokens += [e.token for e in events if e.uid == running]
    later_tokens = [e.token for e in events if e.uid == later_uid]
    while generator.has_work:
        events = generator.step()
        assert all(e.uid != long_uid for e in events), "a cancelled request came back"
        running_tokens += [e.token for e in events if e.uid == running]
        later_tokens += [e.token for e in events if e.uid == later_uid]
    assert running_tokens == greedy_alone(model, tokenizer, short, RUNNING)
    later_params = SamplingParams(temperature=0, max_tokens=5)
    assert later_tokens == greedy_alone(model, tokenizer, later, later_params)
    assert generator.kv_bytes_in_use == 0
