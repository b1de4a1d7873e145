"""VestaActor: dispatch that survives errors, timers as messages, and telling a stopped actor."""

from __future__ import annotations

import queue
from typing import Any

import pykka
import pytest

from tests.actors.conftest import DEADLINE
from tests.conftest import wait_for
from vesta.actors.base import Ticker, VestaActor, tell_quietly
from vesta.counters import Counters
from vesta.messages import Message, Tick

pytestmark = pytest.mark.timeout(30)


class Recorder(VestaActor):
    """Records the Ticks it handles; raises on ``Tick("boom")``; can start a timer on start."""

    def __init__(
        self, counters: Counters, seen: queue.Queue[Message], tick_every: float = 0.0,
        tickers: list[Ticker] | None = None,
    ) -> None:
        super().__init__(counters)
        self.seen = seen
        self.tick_every = tick_every
        self.tickers = tickers if tickers is not None else []

    def on_start(self) -> None:
        if self.tick_every:
            self.tickers.append(self.every(self.tick_every, "beat"))

    def handle(self, message: Message) -> Any:
        match message:
            case Tick(name="boom"):
                raise RuntimeError("boom")
            case Tick(name=name):
                self.seen.put(message)
                return f"handled {name}"
        return super().handle(message)


def next_seen(seen: queue.Queue[Message]) -> Message:
    return seen.get(timeout=DEADLINE)


def test_an_error_in_handle_is_counted_and_later_messages_are_served() -> None:
    counters = Counters()
    seen: queue.Queue[Message] = queue.Queue()
    ref = Recorder.start(counters, seen)

    ref.tell(Tick("boom"))
    ref.tell(Tick("after"))

    assert next_seen(seen) == Tick("after")
    assert counters.get("actor_errors") == 1
    assert ref.is_alive()
    assert ref.ask(Tick("asked"), timeout=DEADLINE) == "handled asked"
    assert ref.ask(Tick("boom"), timeout=DEADLINE) is None  # the error does not reach the caller
    assert counters.get("actor_errors") == 2


def test_a_message_that_is_not_a_vesta_message_is_ignored_and_counted() -> None:
    counters = Counters()
    seen: queue.Queue[Message] = queue.Queue()
    ref = Recorder.start(counters, seen)

    ref.tell({"not": "a message"})
    assert ref.ask("neither is this", timeout=DEADLINE) is None
    ref.tell(Tick("still here"))

    assert next_seen(seen) == Tick("still here")
    assert counters.get("actor_errors") == 2
    assert seen.empty()


def test_every_sends_ticks_until_the_actor_stops() -> None:
    counters = Counters()
    seen: queue.Queue[Message] = queue.Queue()
    tickers: list[Ticker] = []
    ref = Recorder.start(counters, seen, tick_every=0.02, tickers=tickers)

    beats = [next_seen(seen) for _ in range(3)]
    assert beats == [Tick("beat")] * 3
    (ticker,) = tickers
    assert ticker.is_alive()

    ref.stop(timeout=DEADLINE)
    wait_for(lambda: not ticker.is_alive(), timeout=5, what="the ticker thread to end")
    assert counters.get("actor_errors") == 0


def test_tell_quietly_returns_whether_the_actor_was_told() -> None:
    seen: queue.Queue[Message] = queue.Queue()
    ref = Recorder.start(Counters(), seen)

    assert tell_quietly(ref, Tick("alive")) is True
    assert next_seen(seen) == Tick("alive")

    ref.stop(timeout=DEADLINE)
    assert tell_quietly(ref, Tick("gone")) is False
    with pytest.raises(pykka.ActorDeadError):
        ref.tell(Tick("gone"))  # what tell_quietly spares an I/O thread
