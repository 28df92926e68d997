"""Quality filter for curated pairs: drop degraded renders that are nearly perfect (nothing for the fixer to learn)
or hopeless (a failed reconstruction, not an artifact), and count what was kept and dropped per strategy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

KEPT, TOO_GOOD, TOO_BAD = "kept", "too_good", "too_bad"


@dataclass
class PsnrFilter:
    """Keep pairs with ``min_psnr <= psnr(degraded, target) <= max_psnr`` (dB).

    The bounds are ours (the paper states no filter values): above ~35 dB a render is visually clean; below ~8 dB
    it barely resembles the target (a diverged or empty reconstruction)."""

    min_psnr: float = 8.0
    max_psnr: float = 35.0

    def __post_init__(self) -> None:
        if not self.min_psnr <= self.max_psnr:
            raise ValueError(f"min_psnr {self.min_psnr} > max_psnr {self.max_psnr}")

    def verdict(self, psnr: float) -> str:
        if math.isnan(psnr) or psnr < self.min_psnr:
            return TOO_BAD
        if psnr > self.max_psnr:
            return TOO_GOOD
        return KEPT

    def apply(self, pairs: Iterable[dict], counts: "FilterCounts") -> Iterator[dict]:
        """The kept pairs, in order; every pair seen is counted in ``counts`` under its strategy."""
        for pair in pairs:
            verdict = self.verdict(float(pair["psnr"]))
            counts.add(str(pair.get("strategy", "")), verdict)
            if verdict == KEPT:
                yield pair


@dataclass
class FilterCounts:
    """``{strategy: {"kept", "too_good", "too_bad"}}``; mergeable across scenes and tasks."""

    by_strategy: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, strategy: str, verdict: str, n: int = 1) -> None:
        row = self.by_strategy.setdefault(strategy, {KEPT: 0, TOO_GOOD: 0, TOO_BAD: 0})
        row[verdict] = row.get(verdict, 0) + n

    def merge(self, other: "FilterCounts | dict") -> "FilterCounts":
        other = other.by_strategy if isinstance(other, FilterCounts) else other
        for strategy, row in other.items():
            for verdict, n in row.items():
                self.add(strategy, verdict, int(n))
        return self

    def total(self, verdict: str) -> int:
        return sum(row.get(verdict, 0) for row in self.by_strategy.values())

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {s: dict(r) for s, r in sorted(self.by_strategy.items())}

    def table(self) -> str:
        """A plain-text table for the job's report."""
        lines = [f"{'strategy':<14}{'kept':>8}{'too_good':>10}{'too_bad':>9}"]
        for s, r in sorted(self.by_strategy.items()):
            lines.append(f"{s:<14}{r.get(KEPT, 0):>8}{r.get(TOO_GOOD, 0):>10}{r.get(TOO_BAD, 0):>9}")
        return "\n".join(lines)
