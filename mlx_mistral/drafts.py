"""Draft tokens for speculative decoding, without a draft model.

Two sources propose what a sequence will say next, and a :class:`Speculator` decides, per
sequence, whether to ask them this step:

- :class:`PredictionDraft`: OpenAI's Predicted Outputs. The client sends the text it expects
  (an edited file, say); the draft is the prediction from a cursor that follows the output and
  is re-aligned after a mismatch.
- :class:`PromptLookup`: the latest earlier occurrence of the sequence's last few tokens in its
  prompt and output; the tokens that followed it are the draft (code and quoted text repeat).

Drafts only ever save time: the batch verifies every drafted token against the model
(:mod:`mlx_mistral.speculative`), so a wrong draft costs a wider forward, never a wrong token.
A draft is a function of the sequence's own tokens, and so is every decision here, so a seeded
request speculates the same way (and yields the same text) in any batch.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_DRAFT = 8
"""Most tokens proposed in one step. On a GPU a forward of 9 tokens costs about what one
costs; on the CPU it costs ~1.5x, which a draft accepted half the time still repays."""

NGRAMS = (3, 2)
"""N-gram lengths searched, longest first: one token alone matches too often to be a signal."""

REALIGN_WINDOW = 8
"""After a mismatch, how far ahead in the prediction the output's token is looked for."""


class PredictionDraft:
    """Follows a predicted token list with a cursor (the index of the next expected token).

    After a mismatch the prediction is first assumed to have a substitution there (the cursor
    steps over one token); if the next token mismatches too, the cursor moves to the nearest
    place where the output's last tokens occur in the prediction, or to nowhere until they do.
    """

    def __init__(self, prediction: Sequence[int]):
        self.reference = list(prediction)
        self.cursor: int | None = 0
        self.output: list[int] = []
        self._guessed = False  # the cursor stands on a guess made at the last mismatch
        self._index: dict[tuple[int, ...], list[int]] = {}
        for n in (*NGRAMS, 1):
            for end in range(n, len(self.reference) + 1):
                self._index.setdefault(tuple(self.reference[end - n : end]), []).append(end)

    def observe(self, token: int) -> None:
        self.output.append(token)
        c, ref = self.cursor, self.reference
        if c is not None and c < len(ref) and ref[c] == token:
            self.cursor, self._guessed = c + 1, False
        elif c is not None and not self._guessed:
            ahead = ref[c + 1 : c + 1 + REALIGN_WINDOW]
            # The prediction holds extra tokens here (the output skipped them), or one token
            # of it was replaced: step over the replaced token.
            self.cursor = c + 2 + ahead.index(token) if token in ahead else c + 1
            self._guessed = True
        else:
            self.cursor, self._guessed = self._search(c or 0), False

    def _search(self, hint: int) -> int | None:
        """Where the output's last tokens end in the prediction, the nearest after `hint`."""
        for n in (*NGRAMS, 1):
            if len(self.output) < n:
                continue
            ends = self._index.get(tuple(self.output[-n:]))
            if ends:
                after = [e for e in ends if e >= hint]
                return after[0] if after else ends[-1]
        return None

    def propose(self, k: int) -> list[int]:
        if self.cursor is None:
            return []
        return self.reference[self.cursor : self.cursor + k]


class PromptLookup:
    """Proposes what followed the latest earlier occurrence of the sequence's last tokens.

    An index from each n-gram to where it last ended is kept up to date token by token, so a
    lookup is a few dict reads whatever the prompt's length. While the output keeps following
    the found place, the cursor simply advances with it.
    """

    def __init__(self, prompt: Sequence[int]):
        self.tokens: list[int] = []
        self.cursor: int | None = None
        self._last_end: dict[tuple[int, ...], int] = {}
        for token in prompt:
            self.tokens.append(token)
            self._index_tail()

    def _index_tail(self) -> None:
        end = len(self.tokens)
        for n in NGRAMS:
            if end >= n:
                self._last_end[tuple(self.tokens[end - n :])] = end

    def observe(self, token: int) -> None:
        c = self.cursor
        follows = c is not None and self.tokens[c] == token
        self.tokens.append(token)
        self.cursor = c + 1 if follows else None
        end = len(self.tokens)
        # Searched before the new n-grams are indexed: the match must be an earlier one.
        for n in NGRAMS if self.cursor is None else ():
            found = self._last_end.get(tuple(self.tokens[end - n :])) if end >= n else None
            if found is not None:
                self.cursor = found
                break
        self._index_tail()

    def propose(self, k: int) -> list[int]:
        if self.cursor is None:
            return []
        return self.tokens[self.cursor : self.cursor + k]


class Speculator:
    """One sequence's draft sources and how eagerly it uses them.

    Adaptive: the draft length doubles while drafts are accepted whole and shrinks to just past
    the last accepted token after a rejection; two steps in a row that gain nothing (no draft,
    or none of it accepted) pause proposing for a number of generated tokens that doubles each
    time (16 up to 256) and resets on success. Free text thus soon stops paying for drafts
    (each try needs a step that waits for its tokens), yet an edit further on is found again.

    Args:
        prompt: the prompt's token ids (searched by prompt lookup).
        prediction: predicted output token ids, or None.
        prompt_lookup: search the prompt and output for drafts.
    """

    base_pause = 16
    max_pause = 256
    decline_pause = 8  # tokens without proposing after the batch's cost model said no
    memory = 0.8  # weight of past verifications in `rate`

    def __init__(
        self, prompt: Sequence[int], prediction: Sequence[int] | None, *, prompt_lookup: bool
    ):
        self.prediction = PredictionDraft(prediction) if prediction else None
        self.lookup = PromptLookup(prompt) if prompt_lookup else None
        self.generated = 0
        self.length = MAX_DRAFT
        self.misses = 0
        self.pause = self.base_pause
        self.resume_at = 0
        self.proposed = 0  # drafted tokens sent for verification, over the whole sequence
        self.accepted = 0  # of those, the ones the model agreed with
        # Recent per-token acceptance, as counts of drafted tokens that held (`_hits`) out of
        # those tested (`_tests`: a draft is tested up to its first miss), decayed per draft.
        self._hits = 0.0
        self._tests = 0.0

    @property
    def rate(self) -> float:
        """The chance that a drafted token holds, from recent drafts (1/2 before any)."""
        return (self._hits + 1) / (self._tests + 2)

    @property
    def rejected(self) -> int:
        return self.proposed - self.accepted

    def may_propose(self, lag: int = 0) -> bool:
        """Whether the sequence may propose once its last `lag` tokens are known (the batch
        settles its pipelined draw when this is true, then calls :meth:`propose`)."""
        return (self.prediction is not None or self.lookup is not None) and (
            self.generated + lag >= self.resume_at
        )

    def observe(self, token: int) -> None:
        """Take one token of the output, in order (every token, drafted or not)."""
        self.generated += 1
        for source in (self.prediction, self.lookup):
            if source is not None:
                source.observe(token)

    def propose(self, room: int) -> list[int]:
        """This step's draft, at most `room` tokens; a miss counts toward a pause when empty."""
        if not self.may_propose() or room <= 0:
            return []
        k = min(self.length, room)
        draft = self.prediction.propose(k) if self.prediction is not None else []
        if not draft and self.lookup is not None:
            draft = self.lookup.propose(k)
        if not draft:
            self._missed()
        return draft

    def record(self, proposed: int, accepted: int) -> None:
        """The outcome of verifying a draft of `proposed` tokens."""
        self.proposed += proposed
        self.accepted += accepted
        self._hits = self.memory * self._hits + accepted
        self._tests = self.memory * self._tests + accepted + (accepted < proposed)
        if accepted == proposed:
            self.length = min(MAX_DRAFT, self.length * 2)
        else:
            self.length = max(2, accepted + 1)
        if accepted:
            self.misses, self.pause = 0, self.base_pause
        else:
            self._missed()

    def decline(self) -> None:
        """The batch chose not to verify this step's draft (it would not pay): ask again after
        a few tokens, so that the plain steps between keep their pipelining."""
        self.resume_at = self.generated + self.decline_pause

    def _missed(self) -> None:
        self.misses += 1
        if self.misses >= 2:
            self.resume_at = self.generated + self.pause
            self.pause = min(self.max_pause, self.pause * 2)
            self.misses = 0
