"""Responses input items: the keys each type may carry, their ids, and what the store keeps.

OpenAI refuses an input item key it does not know ("Unknown parameter: 'input[0].foo'.") and
a second item with an id already used ("Duplicate item found with id ..."); so does this server,
which also bounds an id's length: an id is echoed in `first_id`/`last_id` and matched by
`after=`, so it must be a short string.

The store keeps each request's items as `GET /v1/responses/{id}/input_items` lists them and no
more: known keys only, text parts as text, and a `reasoning` item (another model's thoughts,
never read by this one) as its id alone, whatever size its summary had.
"""

from __future__ import annotations

from typing import Any

from mlx_mistral.errors import InvalidRequestError

from .responses_writer import new_item_id

MAX_ITEM_ID_CHARS = 256
"""OpenAI's ids are ~50 characters (`msg_` and 48 hex digits); room for any client's own."""

# Keys OpenAI's input item types define (as sent back from an earlier response's output too).
ITEM_KEYS = {
    "message": frozenset({"type", "role", "content", "id", "status", "phase"}),
    "function_call": frozenset(
        {"type", "call_id", "name", "arguments", "id", "status", "namespace"}
    ),
    "function_call_output": frozenset({"type", "call_id", "output", "id", "status"}),
    "reasoning": frozenset({"type", "id", "summary", "content", "encrypted_content", "status"}),
}
_ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def check_input_item(item: dict[str, Any], where: str, seen_ids: set[str]) -> None:
    """Refuse an unknown key, an id that is not a short string, or an id already in `seen_ids`
    (which gains this item's). An unknown `type` is left to the caller to name.

    Raises:
        InvalidRequestError: naming `where` and the key (code `unknown_parameter` for a key).
    """
    allowed = ITEM_KEYS.get(item.get("type", "message"))
    if allowed is not None:
        for key in item:
            if key not in allowed:
                name = f"{where}.{str(key)[:100]}"
                raise InvalidRequestError(
                    f"Unknown parameter: {name!r}.", param=name, code="unknown_parameter"
                )
    if item.get("id") is None:
        return  # absent or null: the server names the item
    item_id = item["id"]
    if not isinstance(item_id, str) or not 1 <= len(item_id) <= MAX_ITEM_ID_CHARS:
        raise InvalidRequestError(
            f"{where}.id must be a string of 1 to {MAX_ITEM_ID_CHARS} characters",
            param=f"{where}.id",
        )
    if item_id in seen_ids:
        raise InvalidRequestError(
            f"Duplicate item found with id {item_id}. Remove duplicate items from your input "
            "and try again.",
            param="input",
        )
    seen_ids.add(item_id)


def stored_items(raw: str | list[dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """A validated `input` as the input-items list shows it: a string is one user message, a
    message's content text parts, and every item has an id (the client's, or new)."""
    items = [{"type": "message", "role": "user", "content": raw}] if isinstance(raw, str) else raw
    out = []
    for item in items:
        kind = item.get("type", "message")
        kept: dict[str, Any] = {"id": item.get("id") or new_item_id(_ID_PREFIXES.get(kind, "rs"))}
        kept["type"] = kind
        if kind == "message":
            kept["role"] = item["role"]
            kept["content"] = _text_parts(item["content"], item["role"])
        elif kind == "function_call":
            kept.update({k: item[k] for k in ("call_id", "name", "arguments")})
        elif kind == "function_call_output":
            output = item["output"]
            kept["call_id"] = item["call_id"]
            kept["output"] = output if isinstance(output, str) else _text_parts(output, "tool")
        elif kind == "reasoning":
            kept["summary"] = []
            out.append(kept)
            continue
        kept["status"] = "completed"
        out.append(kept)
    return tuple(out)


def _text_parts(content: str | list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    """Text parts without any other key a client added (the request's validation admitted only
    text parts); an assistant's are `output_text` with their annotations list."""
    texts = (
        [content]
        if isinstance(content, str)
        else [p.get("text", p.get("refusal")) for p in content]
    )
    if role == "assistant":
        return [{"type": "output_text", "text": t, "annotations": []} for t in texts]
    return [{"type": "input_text", "text": t} for t in texts]


def item_page(items: tuple[dict[str, Any], ...], query: Any) -> dict[str, Any]:
    """One page of `items` as `GET /v1/responses/{id}/input_items` answers, from its query:
    `limit` (1-100, default 20), `order` (`desc`, the default, or `asc`), `after` (an item id:
    the page starts after it). Raises InvalidRequestError naming a bad parameter."""
    try:
        limit = int(query.get("limit", 20))
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise InvalidRequestError("limit must be an integer from 1 to 100", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequestError(f"order must be asc or desc, got {order[:100]!r}", param="order")
    ordered = list(items) if order == "asc" else list(reversed(items))
    after = query.get("after")
    if after is not None:
        ids = [item["id"] for item in ordered]
        if after not in ids:
            raise InvalidRequestError(
                f"after: no input item with id {after[:100]!r} in this response", param="after"
            )
        ordered = ordered[ids.index(after) + 1 :]
    page = ordered[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(ordered) > limit,
    }
