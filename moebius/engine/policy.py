"""Switch policies: decide at a step boundary whether to change layout.

The engine calls ``policy.decide(snapshot)`` before every step when no manual switch is
pending; a returned layout is switched to at once. ``ManualPolicy`` never decides by itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field


@dataclass(frozen=True)
class EngineSnapshot:
    """What a policy may look at: plain numbers, no engine internals."""

    step: int
    now: float  # time.monotonic()
    layout: str  # current layout
    num_running: int
    num_waiting: int
    running_tokens: int  # tokens held by running requests (prompt + output)
    kv_usage: float  # 0..1, mean over block managers
    # per running request: output tokens still allowed (max_tokens - produced); None = unknown
    remaining_tokens: list[int | None] = field(default_factory=list)


class SwitchPolicy(ABC):
    """Contract: ``decide`` is called once per engine step, on the engine thread, before the
    step is scheduled. Return "tp" or "ep" to switch now, or None to stay. ``observe`` receives
    each step's measured duration and batch size, and each switch's record, for policies that
    learn from them."""

    @abstractmethod
    def decide(self, snap: EngineSnapshot) -> str | None: ...

    def observe_step(self, layout: str, batch_size: int, seconds: float) -> None:  # noqa: B027
        pass

    def observe_switch(self, record) -> None:  # noqa: B027
        pass


class ManualPolicy(SwitchPolicy):
    def decide(self, snap: EngineSnapshot) -> str | None:
        return None
