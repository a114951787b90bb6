"""The hosted API's three curl examples, run verbatim with the real `curl` against a local server.

Only the host changes (https://api.deepinfra.com -> the local server); `$DEEPINFRA_TOKEN` is
set to an arbitrary token, which a server started without --api-key accepts. Every field of
each answer is checked against the contract's shapes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time

import pytest

from tests.server_process import ServerProcess

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary")

PROMPT_PRICE = 1e-7
COMPLETION_PRICE = 2e-7
MAX_TOKENS = 16

HELLO = """curl "https://api.deepinfra.com/v1/openai/chat/completions" \\
-H "Content-Type: application/json" \\
-H "Authorization: Bearer $DEEPINFRA_TOKEN" \\
-d '{
"model": "mistralai/Mistral-7B-Instruct-v0.2",
"messages": [
{
"role": "user",
"content": "Hello!"
}
]
}'"""

CHEF = """curl "https://api.deepinfra.com/v1/openai/chat/completions" \\
-H "Content-Type: application/json" \\
-H "Authorization: Bearer $DEEPINFRA_TOKEN" \\
-d '{
"model": "mistralai/Mistral-7B-Instruct-v0.2",
"messages": [
{
"role": "system",
"content": "Respond like a michelin starred chef."
},
{
"role": "user",
"content": "Can you name at least two different techniques to cook lamb?"
},
{
"role": "assistant",
"content": "Bonjour! Let me tell you, my friend, cooking lamb is an art form, and I'"'"'m more than happy to share with you not two, but three of my favorite techniques to coax out the rich, unctuous flavors and tender textures of this majestic protein. First, we have the classic \\"Sous Vide\\" method. Next, we have the ancient art of \\"Sous le Sable\\". And finally, we have the more modern technique of \\"Hot Smoking.\\""
},
{
"role": "user",
"content": "Tell me more about the second method."
}
]
}'"""  # noqa: E501  DeepInfra's example verbatim: a JSON string cannot be wrapped

STREAM = """curl "https://api.deepinfra.com/v1/openai/chat/completions" \\
-H "Content-Type: application/json" \\
-H "Authorization: Bearer $DEEPINFRA_TOKEN" \\
-d '{
"model": "mistralai/Mistral-7B-Instruct-v0.2",
"stream": true,
"messages": [
{
"role": "user",
"content": "Hello!"
}
]
}'"""


@pytest.fixture(scope="module")
def server(tiny_hf_checkpoint):
    with ServerProcess(
        tiny_hf_checkpoint,
        "--default-max-tokens",
        str(MAX_TOKENS),
        "--prompt-price",
        str(PROMPT_PRICE),
        "--completion-price",
        str(COMPLETION_PRICE),
    ) as proc:
        yield proc
        assert "Traceback" not in proc.log()


def run_curl(server, command: str) -> str:
    command = command.replace("https://api.deepinfra.com", server.base_url)
    result = subprocess.run(
        ["bash", "-c", command + " --silent --show-error --fail-with-body"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DEEPINFRA_TOKEN": "any-local-token"},
    )
    assert result.returncode == 0, result.stderr + result.stdout
    return result.stdout


def request_messages(command: str) -> list[dict]:
    """The messages the command sends, decoded by the shell exactly as curl receives them."""
    printer = 'curl() { while [ $# -gt 0 ]; do [ "$1" = -d ] && printf "%s" "$2"; shift; done; }\n'
    body = subprocess.run(
        ["bash", "-c", printer + command], capture_output=True, text=True, check=True
    ).stdout
    return json.loads(body)["messages"]


def check_common(obj: dict, name: str, started: float) -> None:
    assert re.fullmatch(r"chatcmpl-[0-9a-f]{32}", obj["id"])
    assert obj["model"] == name
    assert isinstance(obj["created"], int) and started - 1 <= obj["created"] <= time.time() + 1


@pytest.mark.parametrize("command", [HELLO, CHEF], ids=["hello", "chef"])
def test_chat_examples(server, tiny_hf_checkpoint, tiny_model, command):
    started = time.time()
    answer = json.loads(run_curl(server, command))
    assert list(answer) == ["id", "object", "created", "model", "choices", "usage"]
    check_common(answer, tiny_hf_checkpoint.name, started)
    assert answer["object"] == "chat.completion"
    (choice,) = answer["choices"]
    assert list(choice) == ["index", "message", "finish_reason"]
    assert choice["index"] == 0
    assert list(choice["message"]) == ["role", "content"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert list(usage) == [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "estimated_cost",
        "prompt_tokens_details",
    ]
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0}  # a short prompt: never cached
    messages = request_messages(command)
    assert usage["prompt_tokens"] == len(tiny_model[1].encode_chat(messages))
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == MAX_TOKENS  # --default-max-tokens applied
    else:
        assert 1 <= usage["completion_tokens"] <= MAX_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["estimated_cost"] == pytest.approx(
        usage["prompt_tokens"] * PROMPT_PRICE + usage["completion_tokens"] * COMPLETION_PRICE,
        rel=1e-9,
    )


def test_chef_example_sends_the_quoted_assistant_message(server):
    messages = request_messages(CHEF)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "I'm more than happy" in messages[2]["content"]
    assert '"Sous le Sable"' in messages[2]["content"]


def test_streaming_example(server, tiny_hf_checkpoint):
    started = time.time()
    body = run_curl(server, STREAM)
    events = [e for e in body.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    for chunk in chunks:
        assert list(chunk) == ["id", "object", "created", "model", "choices"]
        check_common(chunk, tiny_hf_checkpoint.name, started)
        assert chunk["object"] == "chat.completion.chunk"
        (choice,) = chunk["choices"]
        assert list(choice) == ["index", "delta", "finish_reason"] and choice["index"] == 0
    first, *middle, last = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["finish_reason"] is None
    for chunk in middle:
        assert list(chunk["choices"][0]["delta"]) == ["content"]
        assert chunk["choices"][0]["finish_reason"] is None
    assert last["choices"][0]["delta"] == {}
    assert last["choices"][0]["finish_reason"] in ("stop", "length")
    assert 1 <= len(middle) <= MAX_TOKENS
