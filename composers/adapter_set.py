"""An adapter set: library adapters by name, each with a weight, a kind and a per-step weight schedule.

`AdapterSet.parse("corgi:0.8,watercolor")` reads the CLI form `NAME[:W][,NAME[:W]...]`; kinds come from the library
(`subject | style | content | unknown`, DESIGN.md section 4) and drive LoRA Switch's default order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from studio.configs import finite
from studio.errors import StudioError
from studio.library import Library


# (step, total_steps) -> multiplier of an adapter's weight; step is 0-based.
Schedule = Callable[[int, int], float]


def constant(step: int, total: int) -> float:
    return 1.0


def linear(start: float, end: float) -> Schedule:
    """Multiplier going from `start` at the first step to `end` at the last, linearly."""

    def schedule(step: int, total: int) -> float:
        return start + (end - start) * (step / (total - 1) if total > 1 else 0.0)

    return schedule


def parse_schedule(text: str) -> Schedule:
    """`constant` or `linear:START:END` (e.g. `linear:1:0` fades an adapter out over the run)."""
    if text == "constant":
        return constant
    parts = text.split(":")
    if parts[0] == "linear" and len(parts) == 3:
        return linear(finite(parts[1], "--schedule START"), finite(parts[2], "--schedule END"))
    raise StudioError(f"unknown schedule {text!r}; write constant or linear:START:END (e.g. linear:1:0)")


@dataclass
class AdapterSet:
    names: list[str]
    weights: list[float]
    kinds: list[str] = field(default_factory=list)  # filled from the library by `resolve`
    schedules: list[Schedule] = field(default_factory=list)  # default: constant for every adapter

    def __post_init__(self) -> None:
        if not self.names:
            raise StudioError("no adapters given; pass --adapters NAME[:W][,NAME[:W]...] or <lora:name:w> tags")
        if len(self.weights) != len(self.names):
            raise StudioError(f"{len(self.names)} adapters but {len(self.weights)} weights; give one per adapter")
        if len(set(self.names)) != len(self.names):
            raise StudioError(f"an adapter is named twice in {','.join(self.names)}; name each adapter once")
        self.weights = [float(finite(w, f"the weight of {n!r}")) for n, w in zip(self.names, self.weights)]
        self.schedules = list(self.schedules) or [constant] * len(self.names)
        if len(self.schedules) != len(self.names):
            raise StudioError(f"{len(self.names)} adapters but {len(self.schedules)} schedules")

    @classmethod
    def parse(cls, text: str, extra: Sequence[tuple[str, float]] = ()) -> AdapterSet:
        """`NAME[:W][,NAME[:W]...]` plus `extra` (name, weight) pairs, e.g. from `<lora:name:w>` prompt tags."""
        pairs: list[tuple[str, float]] = []
        for item in filter(None, (s.strip() for s in text.split(","))):
            name, _, weight = item.partition(":")
            try:
                pairs.append((name.strip(), finite(weight, "the weight") if weight else 1.0))
            except StudioError as err:
                raise StudioError(f"bad weight in {item!r}: {err}; write NAME or NAME:0.8") from None
        pairs += list(extra)
        return cls([n for n, _ in pairs], [w for _, w in pairs])

    def resolve(self, library: Library | None = None) -> AdapterSet:
        """Check every name exists in the library and fill in the kinds."""
        library = library or Library()
        self.kinds = [library.get(name).meta.kind for name in self.names]
        return self

    def weights_at(self, step: int, total: int) -> dict[str, float]:
        """Each adapter's weight at `step` of `total`: weight * schedule(step, total)."""
        return {n: w * s(step, total) for n, w, s in zip(self.names, self.weights, self.schedules)}

    def as_params(self) -> list[dict[str, object]]:
        return [{"name": n, "weight": w} for n, w in zip(self.names, self.weights)]
