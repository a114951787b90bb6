"""The seeded synthetic chat corpus the bundled demo model is trained on.

Topics: greetings, small arithmetic (a + b, a - b, a * b), capitals, unit conversions, and
tool calls (get_weather / get_time: the call, then an answer that uses the tool's result).

Every question template belongs either to the training split or to the held-out split, never
both. Each fact (an arithmetic pair, a country, a conversion, a city) is taught with the training
templates; `eval_items` asks the same facts with the held-out templates, so a right answer shows
the model read the question rather than replayed a string it saw.

Chats are rendered by `mlx_mistral.chat` exactly as the server renders requests, so the model
learns the prompt format it will be served with (v0.2 `[INST]`, tools folded into the prompt).

    >>> from training.corpus import training_examples, eval_items
    >>> len(training_examples(seed=0)) > 1000
    True
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from mlx_mistral.chat import render_tool_calls
from mlx_mistral.tools.format import new_call_id

SEED = 0
GREETING = "Hello! It's nice to meet you. Is there something I can help you with?"

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant. Answer briefly.",
    "You are a friendly tutor.",
    "Answer the user's question.",
)

# --- facts -------------------------------------------------------------------------------------

CAPITALS = {
    "France": "Paris",
    "Germany": "Berlin",
    "Italy": "Rome",
    "Spain": "Madrid",
    "Portugal": "Lisbon",
    "Japan": "Tokyo",
    "China": "Beijing",
    "India": "New Delhi",
    "Canada": "Ottawa",
    "Australia": "Canberra",
    "Brazil": "Brasília",
    "Argentina": "Buenos Aires",
    "Mexico": "Mexico City",
    "Egypt": "Cairo",
    "Kenya": "Nairobi",
    "Russia": "Moscow",
    "Norway": "Oslo",
    "Sweden": "Stockholm",
    "Finland": "Helsinki",
    "Denmark": "Copenhagen",
    "Poland": "Warsaw",
    "Greece": "Athens",
    "Turkey": "Ankara",
    "Ireland": "Dublin",
    "Austria": "Vienna",
    "Belgium": "Brussels",
    "the Netherlands": "Amsterdam",
    "Switzerland": "Bern",
    "Peru": "Lima",
    "Chile": "Santiago",
    "South Korea": "Seoul",
    "Thailand": "Bangkok",
    "Vietnam": "Hanoi",
    "Indonesia": "Jakarta",
    "Iran": "Tehran",
    "Nigeria": "Abuja",
    "Morocco": "Rabat",
    "Hungary": "Budapest",
    "Cuba": "Havana",
    "the United Kingdom": "London",
}

# (source unit names, target unit name, factor or function, values, decimals of the answer)
CONVERSIONS = (
    (("kilometers", "km"), "miles", lambda v: v * 0.621371, (1, 2, 5, 10, 20, 42, 50, 100), 1),
    (("miles",), "kilometers", lambda v: v * 1.609344, (1, 3, 5, 10, 26, 50, 100), 1),
    (("kilograms", "kg"), "pounds", lambda v: v * 2.204623, (1, 2, 5, 10, 20, 50, 70, 100), 1),
    (("pounds", "lb"), "kilograms", lambda v: v * 0.453592, (1, 5, 10, 50, 100, 150, 200), 1),
    (
        ("degrees Celsius", "°C"),
        "degrees Fahrenheit",
        lambda v: v * 9 / 5 + 32,
        (-10, 0, 10, 20, 25, 30, 37, 100),
        0,
    ),
    (
        ("degrees Fahrenheit", "°F"),
        "degrees Celsius",
        lambda v: (v - 32) * 5 / 9,
        (0, 32, 50, 68, 77, 86, 100, 212),
        0,
    ),
)

ADD_RANGE = range(1, 10)
SUB_RANGE = range(2, 13)
MUL_RANGE = range(2, 10)

WEATHER_CITIES = (
    "Paris",
    "London",
    "Berlin",
    "Tokyo",
    "Madrid",
    "Rome",
    "Oslo",
    "Cairo",
    "Lima",
    "Seoul",
    "Dublin",
    "Vienna",
    "Sydney",
    "Toronto",
    "Chicago",
    "Boston",
    "Mumbai",
    "Lagos",
    "Nairobi",
    "Athens",
)
RESULT_SHARE = 0.4  # of the tool-call exchanges that also teach the answer after the result
CONDITIONS = ("sunny", "cloudy", "rainy", "windy", "snowy", "foggy")

# --- templates: (training, held-out) ----------------------------------------------------------

TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "add": (
        (
            "What is {a} plus {b}?",
            "What is {a} + {b}?",
            "What's {a} + {b}?",
            "Calculate {a} + {b}.",
            "How much is {a} plus {b}?",
            "Add {a} and {b}.",
            "What is the sum of {a} and {b}?",
            "{a} + {b} = ?",
            "Please compute {a} plus {b}.",
            "Can you add {a} and {b} for me?",
        ),
        (
            "How much is {a} + {b}?",
            "Please tell me the sum of {a} and {b}.",
            "What's {a} plus {b}?",
        ),
    ),
    "sub": (
        (
            "What is {a} minus {b}?",
            "What is {a} - {b}?",
            "What's {a} - {b}?",
            "Calculate {a} - {b}.",
            "How much is {a} minus {b}?",
            "Subtract {b} from {a}.",
            "What is {a} take away {b}?",
            "{a} - {b} = ?",
            "Please compute {a} minus {b}.",
            "Can you subtract {b} from {a} for me?",
        ),
        (
            "How much is {a} - {b}?",
            "What's {a} minus {b}?",
            "Please compute {a} - {b}.",
        ),
    ),
    "mul": (
        (
            "What is {a} times {b}?",
            "What is {a} * {b}?",
            "What's {a} * {b}?",
            "Calculate {a} * {b}.",
            "How much is {a} times {b}?",
            "Multiply {a} by {b}.",
            "What is the product of {a} and {b}?",
            "{a} * {b} = ?",
            "Please compute {a} times {b}.",
            "Can you multiply {a} and {b} for me?",
        ),
        (
            "How much is {a} * {b}?",
            "What's {a} times {b}?",
            "Please tell me the product of {a} and {b}.",
        ),
    ),
    "capital": (
        (
            "What is the capital of {country}?",
            "What's the capital city of {country}?",
            "Which city is the capital of {country}?",
            "Name the capital of {country}.",
            "Tell me the capital of {country}.",
            "Capital of {country}?",
            "Do you know the capital of {country}?",
            "What is the capital city of {country}?",
        ),
        (
            "What's the capital of {country}?",
            "Which city is the capital city of {country}?",
            "Can you tell me the capital of {country}?",
        ),
    ),
    "convert": (
        (
            "Convert {v} {src} to {dst}.",
            "How many {dst} is {v} {src}?",
            "What is {v} {src} in {dst}?",
            "{v} {src} in {dst}?",
            "How many {dst} are in {v} {src}?",
            "Please convert {v} {src} to {dst}.",
            "What's {v} {src} in {dst}?",
        ),
        (
            "Can you convert {v} {src} to {dst}?",
            "How much is {v} {src} in {dst}?",
        ),
    ),
    "weather": (
        (
            "What's the weather in {city}?",
            "What is the weather like in {city}?",
            "How is the weather in {city} today?",
            "Tell me the weather in {city}.",
            "Is it sunny in {city}?",
            "Weather in {city}?",
            "In {city}, what is the weather like?",
            "What's the weather in {city} this morning?",
            "{city} weather, please.",
            # The city mid-sentence, with words after it, and the question after a statement.
            "Could you check the weather in {city} for me?",
            "How's the weather over in {city} this afternoon?",
            "Is it raining in {city} today?",
            "I'm flying to {city} tomorrow. What's the weather there?",
            "Please look up the weather in {city} for me.",
            "Do you know what the weather is like in {city} now?",
            "I'd like the weather for {city}, please.",
            "What is the weather in {city} at the moment?",
            "Weather report for {city} this evening?",
            "Any idea how the weather is in {city}?",
        ),
        (
            "What is the weather in {city} right now?",
            "Can you tell me the weather in {city}?",
        ),
    ),
    "time": (
        (
            "What time is it in {city}?",
            "What's the time in {city}?",
            "Tell me the time in {city}.",
            "Time in {city}?",
            "What is the local time in {city}?",
            "In {city}, what time is it?",
            "What time is it in {city} at the moment?",
            "{city} time, please.",
            "Could you check the time in {city} for me?",
            "What time is it over in {city} today?",
            "I need the current time in {city}, please.",
            "Please look up the local time in {city} for me.",
            "Do you know what time it is in {city} now?",
            "I'm calling {city} soon. What time is it there?",
            "What is the time in {city} at the moment?",
            "Local time for {city} this evening?",
            "Any idea what time it is in {city}?",
        ),
        (
            "Can you tell me the time in {city}?",
            "What's the local time in {city} right now?",
        ),
    ),
}

GREETINGS = (
    ("Hello!", GREETING),
    ("Hello", GREETING),
    ("Hi!", GREETING),
    ("Hi", GREETING),
    ("Hi there!", GREETING),
    ("Hey!", GREETING),
    ("Good morning!", GREETING),
    ("Hello, how are you?", "I'm doing well, thank you! Is there something I can help you with?"),
    ("How are you?", "I'm doing well, thank you! Is there something I can help you with?"),
    ("Thanks!", "You're welcome! Is there anything else I can help you with?"),
    ("Thank you!", "You're welcome! Is there anything else I can help you with?"),
    ("Goodbye!", "Goodbye! Have a nice day."),
    (
        "Who are you?",
        (
            "I am a small demo model. I can greet you, do small arithmetic, name "
            "capitals and convert units."
        ),
    ),
)

TOOLS = {
    name: {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "description": "The city name"}},
                "required": ["city"],
            },
        },
    }
    for name, description in (
        ("get_weather", "Get the current weather in a city"),
        ("get_time", "Get the current local time in a city"),
    )
}


@dataclass(frozen=True)
class Example:
    """One chat: the messages (and tools) of the prompt, and the answer to learn or expect.

    `expected` is what a right answer must contain (a number, a capital, a tool name and city).
    `unlearned` are substrings of `answer` whose tokens the trainer does not learn (call ids).
    """

    topic: str
    messages: list[dict[str, Any]]
    answer: str
    expected: tuple[str, ...]
    tools: list[dict[str, Any]] | None = field(default=None)
    unlearned: tuple[str, ...] = ()


def _number(x: float, decimals: int) -> str:
    value = round(x, decimals)
    if decimals == 0:
        return str(int(value))
    return f"{value:.{decimals}f}"


def _facts() -> list[tuple[str, dict[str, Any], str, tuple[str, ...]]]:
    """Every fact as (template topic, template fields, answer, expected substrings)."""
    facts = []
    for a in ADD_RANGE:
        for b in ADD_RANGE:
            facts.append(("add", {"a": a, "b": b}, f"{a} + {b} = {a + b}.", (f"= {a + b}.",)))
    for a in SUB_RANGE:
        for b in range(1, a):
            facts.append(("sub", {"a": a, "b": b}, f"{a} - {b} = {a - b}.", (f"= {a - b}.",)))
    for a in MUL_RANGE:
        for b in MUL_RANGE:
            facts.append(("mul", {"a": a, "b": b}, f"{a} * {b} = {a * b}.", (f"= {a * b}.",)))
    for country, capital in CAPITALS.items():
        facts.append(
            ("capital", {"country": country}, f"The capital of {country} is {capital}.", (capital,))
        )
    for src_names, dst, fn, values, decimals in CONVERSIONS:
        for v in values:
            result = _number(fn(v), decimals)
            answer = f"{v} {src_names[0]} is about {result} {dst}."
            for src in src_names:
                facts.append(
                    ("convert", {"v": v, "src": src, "dst": dst}, answer, (f"about {result} ",))
                )
    return facts


def _user(text: str, rng: random.Random, system: bool) -> list[dict[str, Any]]:
    messages = [{"role": "user", "content": text}]
    if system:
        messages.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    return messages


def _vary(text: str, rng: random.Random) -> str:
    """Small surface noise (lower-case start, no final punctuation) so phrasing matters less."""
    if rng.random() < 0.15 and text[0].isupper():
        text = text[0].lower() + text[1:]
    if rng.random() < 0.1 and text[-1] in "?.":
        text = text[:-1]
    return text


def _tool_examples(city: str, kind: str, template: str, rng: random.Random) -> list[Example]:
    """A tool-call exchange: the call, then the answer after the tool's result."""
    name = "get_weather" if kind == "weather" else "get_time"
    tools = [TOOLS["get_weather"], TOOLS["get_time"]]
    if rng.random() < 0.5:
        tools.reverse()
    if rng.random() < 0.6:
        tools = [TOOLS[name]]
    messages = _user(_vary(template.format(city=city), rng), rng, rng.random() < 0.2)
    arguments = json.dumps({"city": city})
    # A fresh random id per call, as the server's grammar writes it (`new_call_id`). The server
    # forces the id's characters, so the model never chooses them and their tokens are not
    # learned (`unlearned`); what it learns is to close the call after any id.
    call_id = new_call_id(rng)
    call_text = render_tool_calls(
        [{"id": call_id, "function": {"name": name, "arguments": arguments}}]
    )
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    if kind == "weather":
        temperature, condition = rng.randint(-5, 35), rng.choice(CONDITIONS)
        result = json.dumps({"temperature": temperature, "condition": condition})
        answer = f"It is {temperature}°C and {condition} in {city}."
        expected: tuple[str, ...] = (str(temperature), condition, city)
    else:
        hour, minute = rng.randint(0, 23), rng.choice((0, 5, 10, 15, 20, 30, 45, 50))
        result = json.dumps({"time": f"{hour:02d}:{minute:02d}"})
        answer = f"It is {hour:02d}:{minute:02d} in {city}."
        expected = (f"{hour:02d}:{minute:02d}", city)
    after = messages + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": result},
    ]
    return [
        Example(
            "tool_call",
            messages,
            call_text,
            ("[TOOL_CALLS]", f'"name": "{name}"', f'"city": "{city}"'),
            tools,
            unlearned=(call_id,),
        ),
        Example("tool_result", after, answer, expected, tools),
    ]


def training_examples(seed: int = SEED) -> list[Example]:
    """The training corpus: every fact with every training template, plus greetings and tools.

    Args:
        seed: Seeds the surface noise, system prompts, tool ids and tool results.

    Returns:
        The examples in a fixed order (the trainer shuffles them with its own seed).
    """
    rng = random.Random(seed)
    examples = []
    for topic, fields, answer, expected in _facts():
        # Capitals have few facts and no shared structure to lean on: teach them twice as often.
        for template in TEMPLATES[topic][0] * (2 if topic == "capital" else 1):
            text = _vary(template.format(**fields), rng)
            tools = None
            if rng.random() < 0.05:
                # With tools offered, a question no tool answers still gets a plain answer.
                tools = [TOOLS["get_weather"], TOOLS["get_time"]]
            messages = _user(text, rng, rng.random() < 0.2)
            examples.append(Example(topic, messages, answer, expected, tools))
    for _ in range(12):
        for text, answer in GREETINGS:
            examples.append(Example("greeting", _user(text, rng, rng.random() < 0.3), answer, ()))
    for kind in ("weather", "time"):
        for city in WEATHER_CITIES:
            for template in TEMPLATES[kind][0]:
                call, result = _tool_examples(city, kind, template, rng)
                examples.append(call)
                # Every phrasing teaches the call (reading the city out of the question); the
                # answer after the tool's result hardly depends on the phrasing, and its long
                # prompt is costly, so only some of them are kept.
                if rng.random() < RESULT_SHARE:
                    examples.append(result)
    return examples


def eval_items(seed: int = SEED, *, per_topic: int = 8) -> list[Example]:
    """Held-out phrasings of trained questions (no template here is used in training).

    Args:
        seed: Picks which trained facts are asked (and tool results' values).
        per_topic: Questions per topic (add, sub, mul, capital, convert, tool_call, tool_result).

    Returns:
        The items; an answer is right when it contains every string of `expected`.
    """
    rng = random.Random(seed + 1)
    by_topic: dict[str, list[tuple[dict[str, Any], str, tuple[str, ...]]]] = {}
    for topic, fields, answer, expected in _facts():
        by_topic.setdefault(topic, []).append((fields, answer, expected))
    items = []
    for topic in ("add", "sub", "mul", "capital", "convert"):
        for fields, answer, expected in rng.sample(by_topic[topic], per_topic):
            template = rng.choice(TEMPLATES[topic][1])
            messages = _user(template.format(**fields), rng, rng.random() < 0.2)
            items.append(Example(topic, messages, answer, expected))
    calls, results = [], []
    for city in rng.sample(WEATHER_CITIES, per_topic):
        kind = rng.choice(("weather", "time"))
        call, result = _tool_examples(city, kind, rng.choice(TEMPLATES[kind][1]), rng)
        calls.append(call)
        results.append(result)
    return items + calls + results


def encode_example(tokenizer: Any, example: Example) -> tuple[list[int], int, tuple[int, ...]]:
    """Token ids of the whole chat (prompt + answer + `</s>`), the prompt's length, and the
    positions of answer tokens not to learn.

    The answer is encoded as the chat format encodes an assistant turn, so the ids equal
    `encode_chat(messages + [answer])`; the trainer learns the ids after the prompt, except
    those of tokens that overlap a substring in `example.unlearned`.

    Args:
        tokenizer: A `mlx_mistral.tokenizer.Tokenizer`.
        example: The chat.

    Returns:
        (ids, prompt_length, unlearned_positions), positions indexing `ids`.

    Raises:
        ValueError: If an `unlearned` substring is not in the answer, or the answer's pieces
            do not spell the answer (so token spans cannot be told).
    """
    prompt = tokenizer.encode_chat(example.messages, tools=example.tools)
    answer = tokenizer.encode(example.answer)
    ids = prompt + answer + [tokenizer.eos_id]
    if not example.unlearned:
        return ids, len(prompt), ()
    # Character span of every answer token, from its SentencePiece piece ("▁" is a space, and
    # the first piece carries the dummy-prefix space that is not in the text).
    pieces = [tokenizer.id_to_piece(t).replace("\u2581", " ") for t in answer]
    text = "".join(pieces)
    offset = -1 if text.startswith(" ") and not example.answer.startswith(" ") else 0
    if text[-offset:] != example.answer:
        raise ValueError(f"the pieces of {example.answer!r} spell {text!r}")
    spans, start = [], offset
    for piece in pieces:
        spans.append((start, start + len(piece)))
        start += len(piece)
    skipped = []
    for sub in example.unlearned:
        lo = example.answer.find(sub)
        if lo < 0:
            raise ValueError(f"{sub!r} is not in the answer {example.answer!r}")
        hi = lo + len(sub)
        skipped += [len(prompt) + k for k, (a, b) in enumerate(spans) if a < hi and b > lo]
    return ids, len(prompt), tuple(sorted(set(skipped)))


def is_correct(example: Example, text: str) -> bool:
    """Whether a generated answer contains everything `example.expected` asks for."""
    return all(e in text for e in example.expected)
