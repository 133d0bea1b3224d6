"""Counts of drafted and accepted tokens, for the stat loggers."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SpecDecodingCounts:
    """Drafts verified and kept, since the last `take` (one engine step).

    ``accepted_per_position[j]`` counts the drafts kept at position ``j`` of their
    sequence's run (a draft is only kept when every draft before it was)."""

    num_drafts: int = 0  # sequences that carried drafts into a step
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def record(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One sequence's step: `num_draft_tokens` drafts, the first `num_accepted` kept."""
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        if len(self.accepted_per_position) < num_draft_tokens:
            self.accepted_per_position += [0] * (num_draft_tokens
                                                 - len(self.accepted_per_position))
        for j in range(num_accepted):
            self.accepted_per_position[j] += 1

    def merge(self, other: SpecDecodingCounts) -> None:
        """Add `other`'s counts to these."""
        self.num_drafts += other.num_drafts
        self.num_draft_tokens += other.num_draft_tokens
        self.num_accepted_tokens += other.num_accepted_tokens
        for j, n in enumerate(other.accepted_per_position):
            if j < len(self.accepted_per_position):
                self.accepted_per_position[j] += n
            else:
                self.accepted_per_position.append(n)

    def take(self) -> SpecDecodingCounts:
        """These counts, and zero them."""
        taken = SpecDecodingCounts(self.num_drafts, self.num_draft_tokens,
                                   self.num_accepted_tokens, list(self.accepted_per_position))
        self.num_drafts = self.num_draft_tokens = self.num_accepted_tokens = 0
        self.accepted_per_position = []
        return taken

    @property
    def acceptance_rate(self) -> float:
        """Accepted / drafted tokens, 0.0 when nothing was drafted."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0
