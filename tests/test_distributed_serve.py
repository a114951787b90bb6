"""Tensor-parallel serving (issue 18): `mlx.launch --backend ring -n 2 -- ... serve --distributed`
on localhost against a one-process server, and what happens when a rank dies or rank 0 stops.

The demo model (trained: its greedy choices are not near-ties) splits into two ranks of one KV
head each. Every launch is a real launcher, two real rank processes and a real uvicorn.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from mlx_mistral.demo import demo_model_path
from tests.checkpoints import write_hf_checkpoint
from tests.server_process import ServerProcess
from tests.test_distributed import LAUNCH, free_port_pair

TIMEOUT = 120  # seconds to start, and to exit: a hung ring fails the test instead of the suite
_LISTENING = re.compile(r"serving .+ on http://\S+?:(\d+)/v1")
_RANK0_PID = re.compile(r"Started server process \[(\d+)\]")
_RANK1_PID = re.compile(r"rank 1 of 2 \(pid (\d+)\)")

# Concurrent streams: greedy ones, and a seeded sampled one (sampling happens once, on rank 0).
REQUESTS = [
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "user", "content": "Hello! Who are you?"}]},
    {"messages": [{"role": "user", "content": "What is 12 + 30?"}]},
    {
        "messages": [{"role": "user", "content": "Tell me about Rome."}],
        "temperature": 0.8,
        "top_p": 0.95,
        "seed": 7,
    },
]
# End-of-sequence banned: a stream that runs until stopped (a rank is killed meanwhile).
ENDLESS = {
    "messages": [{"role": "user", "content": "Count to a thousand."}],
    "max_tokens": 1500,
    "logit_bias": {"2": -100},
    "stream": True,
}


class DistributedServer:
    """`mlx.launch --backend ring -n 2 -- python -m mlx_mistral.server --distributed ...`."""

    def __init__(self, *args: str, model: Path | None = None):
        launch = [sys.executable, "-c", LAUNCH, "--backend", "ring", "-n", "2"]
        launch += ["--starting-port", str(free_port_pair()), "--"]
        serve = [sys.executable, "-m", "mlx_mistral.server", "--distributed"]
        serve += ["--model", str(model or demo_model_path()), "--port", "0", *args]
        fd, self._log_path = tempfile.mkstemp(prefix="mlx-mistral-distributed-", suffix=".log")
        self._log = os.fdopen(fd, "w+")
        self.proc = subprocess.Popen(
            [*launch, *serve],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # the launcher and both ranks: killed together at the end
        )
        self.port = self.rank0 = self.rank1 = 0

    def __enter__(self) -> DistributedServer:
        try:
            return self._wait_until_serving()
        except BaseException:
            self.__exit__()  # the launcher and both ranks, which would otherwise run on
            raise

    def _wait_until_serving(self) -> DistributedServer:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            log = self.log()
            if self.proc.poll() is not None:
                raise RuntimeError(f"the launcher exited with {self.proc.returncode}:\n{log}")
            found = [p.search(log) for p in (_LISTENING, _RANK0_PID, _RANK1_PID)]
            if all(found):
                self.port, self.rank0, self.rank1 = (int(m.group(1)) for m in found)
                try:
                    if httpx.get(self.url("/health"), timeout=5).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass  # not answering yet
            time.sleep(0.1)
        raise RuntimeError(f"the distributed server did not start in {TIMEOUT}s:\n{self.log()}")

    def __exit__(self, *exc: object) -> None:
        try:  # the ranks too, even when the launcher is gone
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        if exc and exc[0] is not None:
            print(f"the group's log:\n{self.log()}")  # shown with the failure
        self._log.close()
        os.unlink(self._log_path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        with open(self._log_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def wait_exit(self) -> int:
        """The launcher's status once it and both ranks are gone (within TIMEOUT)."""
        try:
            status = self.proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the group did not exit in {TIMEOUT}s:\n{self.log()}")
        for pid in (self.rank0, self.rank1):
            assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"rank pid {pid} lives"
        return status


def _zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


def completions(base_url: str) -> list[str]:
    """The answers to REQUESTS, sent concurrently (so they share the running batch)."""

    def ask(body: dict) -> str:
        body = {"temperature": 0, "max_tokens": 24, **body}
        response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=TIMEOUT)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
        return list(pool.map(ask, REQUESTS))


def stream_events(client: httpx.Client, url: str, body: dict):
    """The JSON of each SSE `data:` line of a streamed completion."""
    with client.stream("POST", url, json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[len("data: ") :])


def test_two_ranks_answer_as_one_process():
    with ServerProcess(demo_model_path()) as single:
        expected = completions(single.base_url)
    assert all(expected) and len(set(expected)) == len(expected)
    with DistributedServer() as group:
        assert completions(group.url("")) == expected
        # A second round: the rows of the first have left the batch on both ranks alike.
        assert completions(group.url("")) == expected


def test_a_killed_rank_ends_the_stream_with_an_error_and_the_group_exits():
    with DistributedServer() as group, httpx.Client() as client:
        events = stream_events(client, group.url("/v1/chat/completions"), ENDLESS)
        for _ in range(5):
            assert "error" not in next(events)
        os.kill(group.rank1, signal.SIGKILL)
        rest = list(events)
        assert rest and "error" in rest[-1], rest[-3:]
        assert rest[-1]["error"]["code"] == "engine_dead"
        group.wait_exit()
        assert "connection to a peer was lost" in group.log()


def test_sigterm_on_rank_0_drains_and_stops_every_rank():
    with DistributedServer() as group, httpx.Client() as client:
        body = {**ENDLESS, "max_tokens": 40}
        events = stream_events(client, group.url("/v1/chat/completions"), body)
        assert "error" not in next(events)
        os.kill(group.rank0, signal.SIGTERM)
        rest = list(events)  # the stream in flight finishes (drained), without an error
        assert rest[-1]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in event for event in rest)
        assert group.wait_exit() == 0
        assert "rank 1: rank 0 stopped" in group.log()


def test_distributed_needs_launch_and_refuses_the_disk_prompt_cache():
    serve = [sys.executable, "-m", "mlx_mistral.server", "--model", str(demo_model_path())]
    alone = subprocess.run([*serve, "--distributed"], capture_output=True, text=True, timeout=60)
    assert alone.returncode == 1
    assert "--distributed needs two or more ranks: start it with `mlx.launch`" in alone.stderr
    cached = subprocess.run(
        [*serve, "--distributed", "--prompt-cache-dir", tempfile.gettempdir()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cached.returncode == 1
    assert "--prompt-cache-dir: the disk prompt cache is not replicated" in cached.stderr


SYSTEM = "You are a patient teacher who answers in short, plain sentences. " * 6
TOPICS = ["the sea", "bread", "the moon", "rivers", "bees", "glass", "maps", "snow", "iron"]


def _chat(base_url: str, messages: list[dict], **fields) -> dict:
    body = {"messages": messages, "temperature": 0, "max_tokens": 16, **fields}
    response = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    return response.json()


def cached_and_speculated(base_url: str) -> list[dict]:
    """One request at a time, so both servers see the same order: a system prompt shared by
    nine conversations (more than a 1 MiB prefix cache holds: entries are evicted), a second
    turn of the first (its prefix comes from the cache), and the first asked again with its
    own answer as the prediction, greedy and seeded."""
    system = {"role": "system", "content": SYSTEM}
    first = [system, {"role": "user", "content": f"Tell me about {TOPICS[0]}."}]
    answers = [_chat(base_url, first)]
    for topic in TOPICS[1:]:
        answers.append(_chat(base_url, [system, {"role": "user", "content": f"And {topic}?"}]))
    said = answers[0]["choices"][0]["message"]["content"]
    turn_two = [*first, {"role": "assistant", "content": said}, {"role": "user", "content": "Why?"}]
    answers.append(_chat(base_url, turn_two))
    prediction = {"type": "content", "content": said}
    answers.append(_chat(base_url, first, prediction=prediction))
    seeded = {"temperature": 0.8, "top_p": 0.95, "seed": 3}
    answers.append(_chat(base_url, first, prediction=prediction, **seeded))
    answers.append(_chat(base_url, first, **seeded))
    return answers


def test_two_ranks_share_the_prefix_cache_and_speculate_as_one_process():
    # Each rank's entries hold its head: a prompt of ~110 tokens is ~110 KiB on a rank. Drafts
    # are always verified: whether it pays with two ranks sharing 2 cores is not the question.
    args = ["--prefix-cache-mib", "1", "--speculation", "always"]
    with ServerProcess(demo_model_path(), *args) as single:
        expected = cached_and_speculated(single.base_url)
    with DistributedServer(*args) as group:
        answers = cached_and_speculated(group.url(""))
        log = group.log()
    contents = [a["choices"][0]["message"]["content"] for a in answers]
    assert contents == [a["choices"][0]["message"]["content"] for a in expected]
    # The seeded request gives the same text with and without its prediction.
    assert contents[-2] == contents[-1]
    turn_two, predicted = answers[len(TOPICS)], answers[len(TOPICS) + 1]
    assert turn_two["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    details = predicted["usage"]["completion_tokens_details"]
    assert details["accepted_prediction_tokens"] > 0 and details["rejected_prediction_tokens"] == 0
    assert "Traceback" not in log and "ERROR" not in log


def test_two_ranks_with_a_quantized_kv_cache_answer_as_one_process(tmp_path_factory):
    """--kv-bits 8: every rank quantizes its own head's cache (quantization groups of 64: a
    random model with 64-wide heads, two KV heads, one per rank)."""
    model = write_hf_checkpoint(
        tmp_path_factory.mktemp("heads-64"), hidden_size=128, num_attention_heads=2, head_dim=64
    )
    with ServerProcess(model, "--kv-bits", "8") as single:
        expected = completions(single.base_url)
    with DistributedServer("--kv-bits", "8", model=model) as group:
        assert completions(group.url("")) == expected
