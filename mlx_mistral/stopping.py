"""Stop strings over streamed text: no stop string, nor any part of one, ever reaches the client.

Generated text arrives in pieces (one detokenized token at a time), and a stop string may span
several pieces. `StopMatcher` releases text as soon as it cannot be the start of a stop string,
holding back only the longest tail that is a proper prefix of some stop string (so at most
`len(longest_stop) - 1` characters, and nothing at all when there are no stops). When several
stop strings occur, the one completed first wins, so the output never depends on how the text
was split into pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import InvalidRequestError


class StopMatcher:
    """Finds the first stop string in a stream of text pieces.

    Example:
        >>> m = StopMatcher(["\\nUser:"])
        >>> m.feed("Hello\\nUs")
        ('Hello', False)
        >>> m.feed("er: hi")
        ('', True)
    """

    def __init__(self, stops: Sequence[str]):
        """Set up the matcher.

        Args:
            stops: Stop strings (may be empty: then text passes straight through).

        Raises:
            InvalidRequestError: If a stop is not a non-empty string (param "stop").
        """
        if isinstance(stops, str):
            stops = [stops]
        for stop in stops:
            if not isinstance(stop, str) or not stop:
                raise InvalidRequestError(
                    f"stop strings must be non-empty strings, got {stop!r}", param="stop"
                )
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(stops))
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> tuple[str, bool]:
        """Add the next piece of text.

        Args:
            text: New text (any length, including empty).

        Returns:
            (text safe to emit now, whether a stop string was hit). Once a stop is hit, the text
            from the stop string on is dropped and every later call returns ("", True).
        """
        if self.stopped:
            return "", True
        buf = self._pending + text
        hit = self._earliest_stop(buf)
        if hit is not None:
            at, stop = hit
            self._pending = ""
            self.stopped = True
            self.matched = stop
            return buf[:at], True
        hold = self._held_tail(buf)
        self._pending = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def flush(self) -> str:
        """The text still held back, at the end of generation (no stop string can follow).

        Returns:
            The held text ("" if a stop was hit).
        """
        out, self._pending = self._pending, ""
        return out

    def _earliest_stop(self, buf: str) -> tuple[int, str] | None:
        # The stop completed first in the stream wins (on a tie, the longer one). Ranking by end
        # rather than start makes the result independent of how the text was cut into pieces:
        # with stops "abc" and "b", text "ab" already ends at "b" before a "c" could arrive.
        best: tuple[int, int, str] | None = None
        for stop in self.stops:
            at = buf.find(stop)
            if at >= 0:
                key = (at + len(stop), at, stop)
                if best is None or key[:2] < best[:2]:
                    best = key
        return None if best is None else (best[1], best[2])

    def _held_tail(self, buf: str) -> int:
        """Length of the longest tail of `buf` that is a proper prefix of a stop string (it may
        still grow into one, so it cannot be released yet). Work is linear in the stops'
        lengths for ordinary text; nothing is precomputed, so a long stop costs no memory."""
        best = 0
        for stop in self.stops:
            # Candidate starts: where the stop's first character occurs in the last
            # len(stop) - 1 characters; the earliest match gives this stop's longest tail.
            at = buf.find(stop[0], max(0, len(buf) - len(stop) + 1))
            while at >= 0 and len(buf) - at > best:
                if stop.startswith(buf[at:]):
                    best = len(buf) - at
                    break
                at = buf.find(stop[0], at + 1)
        return best
