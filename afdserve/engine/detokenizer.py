"""One sequence's output text, decoded as its tokens arrive, and its stop strings.

The engine gives every sequence an `IncrementalDetokenizer`; the scheduler feeds it each sampled
token (`add`) and asks it whether a stop string has appeared (`stop_string`), in the same place
where it checks stop tokens and the length budget, so every request finishes once, for one
reason. The server streams `output_text(finished=False)`, which holds back what may still turn
into a stop string.

Linear time: each token decodes only a small window of ids, `ids[prefix:]`, against the same
window without the new tokens, `ids[prefix:read]`; the difference is the new text. The window
starts at the previous token boundary that ended a complete character, which gives the decoder
the context it needs for merge-sensitive tokens (a word-start marker that becomes a space only
after another word, byte tokens that together form one multi-byte character). While the window
decodes to text ending in U+FFFD (an incomplete UTF-8 character), or ends in a byte-fallback
token (whose text a following byte token can still change), nothing is emitted yet; the window
then grows by the tokens of that one character or byte run. The text so far always equals
`tokenizer.decode(output_ids)` for the ids up to `read`, and `output_text(finished=True)` equals
`tokenizer.decode(output_ids)` exactly (cut before the stop string when one matched).
Unsettled text is still searched for stop strings, so a sequence stops on the same token as it
would if the whole output were decoded after every token.

Stop strings are searched only in the text that is new since the last token, plus the last
`len(stop) - 1` characters before it, so a stop string that spans tokens is found the moment it
completes. A stop string counts once `min_tokens` tokens have been generated: one that completes
earlier is ordinary text.
"""
from __future__ import annotations

from typing import Protocol, Sequence

REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Text of one sequence's generated tokens, its stop-string check and its stream hold-back."""

    def __init__(self, tokenizer: Decoder, stop: Sequence[str] = (), min_tokens: int = 0,
                 skip_special_tokens: bool = True):
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._unsettled_ids = getattr(tokenizer, "byte_fallback_ids", frozenset())
        self._dropped_ids = getattr(tokenizer, "special_ids", frozenset()) if skip_special_tokens else frozenset()
        self._last_text_id: int | None = None   # the last id that decode does not drop
        self.stop = tuple(stop)
        self.min_tokens = min_tokens
        self._ids: list[int] = []
        self._prefix = 0            # ids[:prefix] are decoded; the window starts here
        self._read = 0              # ids[:read] are in `text`
        self._prefix_text = ""      # decode(ids[prefix:read]), kept from the previous token
        self.text = ""
        """The decoded text so far (complete characters only); cut before the stop string once one matched."""
        self.stop_string: str | None = None
        """The stop string that ended the sequence, once one has."""

    @property
    def num_tokens(self) -> int:
        return len(self._ids)

    def add(self, token_id: int) -> str | None:
        """Append a generated token; the stop string it completes, if any (then `text` ends before it)."""
        if self.stop_string is not None:
            raise RuntimeError("the sequence already ended on a stop string")
        self._ids.append(token_id)
        if token_id not in self._dropped_ids:
            self._last_text_id = token_id
        end = len(self.text)
        new, settled = self._decode_new()
        if settled:
            self.text += new
        if new and self.stop and self.num_tokens >= self.min_tokens:
            # Unsettled text is searched too: if it completes a stop string, the sequence ends
            # here and that text is final after all.
            self._find_stop(self.text if settled else self.text + new, end)
        return self.stop_string

    def _decode_new(self) -> tuple[str, bool]:
        """Text of the tokens after `read` (without a trailing incomplete character) and whether it
        is settled: no later token can change it. Settled text moves the window on."""
        window = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        settled = not window.endswith(REPLACEMENT) and self._last_text_id not in self._unsettled_ids
        new = window.rstrip(REPLACEMENT)[len(self._prefix_text):]
        if settled and new:
            self._prefix, self._read = self._read, len(self._ids)
            # The next window starts at the old read offset; decoded on its own, its first token may
            # read differently than in context (a leading word marker is dropped), so decode it again.
            self._prefix_text = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        return new, settled

    def _find_stop(self, text: str, end: int) -> None:
        """The earliest stop string in `text` that ends after text[:end] (the text before this token)."""
        hits = [(i, s) for s in self.stop if (i := text.find(s, max(0, end - len(s) + 1))) >= 0]
        if hits:
            i, self.stop_string = min(hits)
            self.text = text[:i]

    def held_back(self) -> int:
        """Characters at the end of `text` that could begin a stop string (not safe to stream yet)."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), hold, -1):
                if self.text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def output_text(self, finished: bool) -> str:
        """What the client sees: while running, the text minus a possible stop-string start (so a
        stream never shows one it must take back); finished, the whole text, incomplete trailing
        bytes included (as U+FFFD, like `tokenizer.decode`)."""
        if not finished:
            return self.text[:len(self.text) - self.held_back()]
        if self.stop_string is not None or self._read == len(self._ids):
            return self.text
        window = self._tok.decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        return self.text + window[len(self._prefix_text):]
