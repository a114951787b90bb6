"""Several prompts answered as one request: /v1/completions with a list of prompts.

The engine runs each prompt as its own request (its own handle, n choices each); `HandleGroup`
presents them to a writer as one request of `len(handles) * n` choices, in OpenAI's order:
choice i of prompt p is choice `p * n + i`. Usage counts every prompt's tokens.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Sequence

from mlx_mistral.batch import TokenEvent
from mlx_mistral.engine import RequestHandle, each_event

_ENDED = object()  # a handle's last batch has been passed on


class HandleGroup:
    """The handles of one request's prompts, read as one handle (`batches`, async iteration,
    `cancel`), their events renumbered."""

    def __init__(self, handles: Sequence[RequestHandle], n: int):
        self.handles = list(handles)
        self.n = n
        self.prompt_tokens = [0] * len(self.handles)  # as each handle's events report them

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    def _renumbered(self, prompt: int, event: TokenEvent) -> TokenEvent:
        self.prompt_tokens[prompt] = max(self.prompt_tokens[prompt], event.prompt_tokens)
        return dataclasses.replace(
            event, index=prompt * self.n + event.index, prompt_tokens=sum(self.prompt_tokens)
        )

    async def batches(self) -> AsyncIterator[list[TokenEvent]]:
        """Lists of events as they arrive from any of the handles; the first error ends it
        (and, as leaving early does, cancels the handles still running)."""
        arrived: asyncio.Queue = asyncio.Queue()

        async def pump(prompt: int, handle: RequestHandle) -> None:
            try:
                async for batch in handle.batches():
                    arrived.put_nowait([self._renumbered(prompt, e) for e in batch])
            except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
                arrived.put_nowait(exc)
            arrived.put_nowait(_ENDED)

        pumps = [asyncio.create_task(pump(p, h)) for p, h in enumerate(self.handles)]
        running = len(pumps)
        try:
            while running:
                item = await arrived.get()
                if item is _ENDED:
                    running -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for task, handle in zip(pumps, self.handles, strict=True):
                if not task.done():  # its handle has not ended: nobody reads the rest
                    task.cancel()
                    handle.cancel()

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return each_event(self.batches())
