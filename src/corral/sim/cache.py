"""A runner's prompt cache, after Ollama's input cache (``runner/ollamarunner/cache.go``).

Each parallel slot remembers the tokens it last held in its KV cache: the prompt of its last
request and the tokens generated after it. A new request takes, among the slots no request is
using, the one whose tokens share the longest common prefix with its prompt (ties: the lowest
slot); a busy slot is never shared. Those prefix tokens need no prompt processing, but at least
one token always does (the model must see something to sample from).
"""

from __future__ import annotations

from collections.abc import Sequence

Tokens = tuple[str, ...]


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class CacheSlot:
    """One parallel slot's KV-cache contents."""

    __slots__ = ("in_use", "tokens")

    def __init__(self) -> None:
        self.tokens: Tokens = ()
        self.in_use = False


class PromptCache:
    """The slots of one runner (created empty at load; a reload starts from nothing)."""

    __slots__ = ("slots",)

    def __init__(self) -> None:
        self.slots: list[CacheSlot] = []

    def take(self, prompt: Tokens, capacity: int) -> tuple[CacheSlot, int]:
        """The slot for ``prompt`` (marked in use) and how many of its tokens are cached."""
        while len(self.slots) < capacity:
            self.slots.append(CacheSlot())
        best: CacheSlot | None = None
        longest = -1
        for slot in self.slots:
            if slot.in_use:
                continue
            count = common_prefix(slot.tokens, prompt)
            if count > longest:
                best, longest = slot, count
        if best is None:  # num_parallel shrank under running requests: one more slot
            best, longest = CacheSlot(), 0
            self.slots.append(best)
        best.in_use = True
        cached = min(longest, max(0, len(prompt) - 1))
        best.tokens = prompt[:cached]
        return best, cached
