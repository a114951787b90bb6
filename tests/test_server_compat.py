"""Chat completions as real clients send them (issue 13), against a real server process.

Each test here was refused or wrong on the server before: several system messages, a final
assistant message to continue, the legacy function role, logprob tokens that did not join to
the content, model names the clients default to, and the paths without /v1. The openai package
is the client wherever it is the natural one; the wire is read raw where its bytes matter.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from mlx_mistral.tokenizer import Tokenizer
from tests.server_process import ServerProcess

ASK = [{"role": "user", "content": "Name a colour."}]
HELLO = 22557  # the piece "▁Hello": a logit bias makes every token this spaced piece


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint):
    with ServerProcess(tiny_hf_checkpoint) as proc:
        yield proc
        assert "Traceback" not in proc.log(), proc.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url("/v1"), api_key="k", max_retries=0)


@pytest.fixture(scope="module")
def name(tiny_hf_checkpoint):
    return tiny_hf_checkpoint.name


@pytest.fixture(scope="module")
def tokenizer(tiny_hf_checkpoint):
    return Tokenizer.from_file(tiny_hf_checkpoint / "tokenizer.model")


def streamed_text(client, name, **body) -> str:
    chunks = client.chat.completions.create(model=name, stream=True, **body)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# -- system messages ------------------------------------------------------------------------------
def test_several_system_messages_anywhere_join_into_the_system_prompt(client, name, tokenizer):
    """LangChain with two SystemMessages, pydantic-ai's system_prompt plus instructions
    (a developer message), and a system message after the first turn."""
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Salut"},
        {"role": "user", "content": "Bye"},
        {"role": "system", "content": "Be kind."},
    ]
    answer = client.chat.completions.create(model=name, messages=messages, max_tokens=2)
    prompt = tokenizer.encode_chat(messages)
    assert answer.usage.prompt_tokens == len(prompt)
    assert tokenizer.decode(prompt).startswith(
        "[INST] You are terse.\n\nAnswer in French.\n\nBe kind.\n\nHi [/INST]"
    )


# -- continuing a final assistant message ----------------------------------------------------------
def test_a_final_assistant_message_is_continued(client, name, tokenizer):
    """Open WebUI's "continue response" and answer prefill: the prompt ends with the given text
    (no </s>), and the content is only the new text, as from a raw completion of that prompt
    (whose first word keeps its space: it goes on from the given text)."""
    messages = [*ASK, {"role": "assistant", "content": "My favourite colour is"}]
    prompt = tokenizer.encode_chat(messages)
    assert prompt[-1] != tokenizer.eos_id
    assert tokenizer.decode(prompt).endswith("[/INST] My favourite colour is")
    fields = {"temperature": 0, "max_tokens": 8}
    answer = client.chat.completions.create(model=name, messages=messages, **fields)
    raw = client.completions.create(model=name, prompt=prompt, **fields)
    content = answer.choices[0].message.content
    assert content == raw.choices[0].text and content
    assert answer.usage.prompt_tokens == len(prompt)
    assert streamed_text(client, name, messages=messages, **fields) == content


def test_a_continued_answer_keeps_the_space_of_its_first_token(client, name):
    messages = [*ASK, {"role": "assistant", "content": "Well"}]
    answer = client.chat.completions.create(
        model=name, messages=messages, max_tokens=2, logit_bias={str(HELLO): 100}, logprobs=True
    )
    assert answer.choices[0].message.content == " Hello Hello"
    assert [e.token for e in answer.choices[0].logprobs.content] == [" Hello", " Hello"]


def test_continuing_under_tools_or_a_json_format_is_a_400_naming_messages(client, name):
    messages = [*ASK, {"role": "assistant", "content": "{"}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=name, messages=messages, response_format={"type": "json_object"}
        )
    assert info.value.body["param"] == "messages"
    assert "continue" in info.value.body["message"]


# -- the legacy function role ----------------------------------------------------------------------
def test_the_function_role_is_a_tool_result(client, name, tokenizer):
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    as_tool = [
        *ASK,
        {
            "role": "assistant",
            "tool_calls": [{"id": "call_1", "type": "function", "function": call}],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    as_function = [*as_tool[:2], {"role": "function", "name": "get_weather", "content": "sunny"}]
    legacy = [
        *ASK,
        {"role": "assistant", "content": None, "function_call": call},
        {"role": "function", "name": "get_weather", "content": "sunny"},
    ]
    answers = [
        client.chat.completions.create(model=name, messages=messages, max_tokens=2)
        for messages in (as_tool, as_function, legacy)
    ]
    assert answers[1].usage.prompt_tokens == answers[0].usage.prompt_tokens
    assert answers[2].usage.prompt_tokens == len(tokenizer.encode_chat(legacy))
    assert '"content": "sunny"' in tokenizer.decode(tokenizer.encode_chat(legacy))


# -- logprobs ------------------------------------------------------------------------------------
def test_logprob_tokens_join_to_the_content_streamed_or_not(client, name):
    """The first token's dummy-prefix space is not in the content, nor in its logprob entry."""
    fields = {"messages": ASK, "max_tokens": 3, "logit_bias": {str(HELLO): 100}, "logprobs": True}
    fields["top_logprobs"] = 2
    answer = client.chat.completions.create(model=name, **fields)
    content = answer.choices[0].message.content
    entries = answer.choices[0].logprobs.content
    assert content == "Hello Hello Hello"
    assert "".join(e.token for e in entries) == content
    assert all(bytes(e.bytes) == e.token.encode() for e in entries)
    assert entries[0].top_logprobs[0].token == "Hello"
    assert all(bytes(t.bytes) == t.token.encode() for e in entries for t in e.top_logprobs)

    chunks = list(client.chat.completions.create(model=name, stream=True, **fields))
    streamed = [
        e
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert "".join(e.token for e in streamed) == content
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in entries]


# -- model names -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "model", ["gpt-3.5-turbo", "gpt-4o", "gpt-4.1", "gpt-4o-mini", "llama3:latest", "x:latest", ""]
)
def test_any_model_name_is_served_by_the_one_model(client, name, model):
    """LangChain's and the Agents SDK's defaults, Ollama-style tags, and "" (some UIs)."""
    answer = client.chat.completions.create(model=model, messages=ASK, max_tokens=1)
    assert answer.model == name
    text = client.completions.create(model=model, prompt="Hi", max_tokens=1)
    assert text.model == name


def test_strict_model_names_restores_the_404(tiny_hf_checkpoint, name):
    with ServerProcess(tiny_hf_checkpoint, "--strict-model-names") as proc:
        api = openai.OpenAI(base_url=proc.url("/v1"), api_key="k", max_retries=0)
        with pytest.raises(openai.NotFoundError) as info:
            api.chat.completions.create(model="gpt-4o", messages=ASK, max_tokens=1)
        assert info.value.body["code"] == "model_not_found"
        assert api.chat.completions.create(model=name, messages=ASK, max_tokens=1).model == name


def test_looking_a_model_up_by_another_name_is_still_404(client):
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


# -- paths ---------------------------------------------------------------------------------------
def test_paths_without_v1(server, name):
    """Clients configured with the server's root as base URL."""
    api = openai.OpenAI(base_url=server.url(""), api_key="k", max_retries=0)
    assert [m.id for m in api.models.list().data] == [name]
    assert api.chat.completions.create(model=name, messages=ASK, max_tokens=1).choices
    assert api.completions.create(model=name, prompt="Hi", max_tokens=1).choices
    raw = httpx.post(server.url("/chat/completions"), json={"messages": ASK, "max_tokens": 1})
    assert raw.status_code == 200 and json.loads(raw.text)["object"] == "chat.completion"
    assert httpx.get(server.url(f"/models/{name}")).json()["id"] == name
