"""The base of vesta's actors: dispatch that survives errors, and timers as messages.

pykka stops an actor for good when a ``tell``-ed message raises, and the daemon would go deaf while
its process stays up. :class:`VestaActor` catches, logs and counts every error of a message and
goes on. Should an actor die anyway (an error in ``on_start``), the launcher, which watches every
actor it started, stops the whole daemon instead of letting it limp.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import pykka

from vesta.counters import Counters
from vesta.messages import Message, Ping, Tick

logger = logging.getLogger(__name__)


class VestaActor(pykka.ThreadingActor):
    """An actor whose messages are :class:`vesta.messages.Message` records, given to ``handle``."""

    def __init__(self, counters: Counters) -> None:
        super().__init__()
        self.counters = counters
        self._tickers: list[Ticker] = []

    @property
    def name(self) -> str:
        return type(self).__name__

    def on_receive(self, message: Any) -> Any:
        if not isinstance(message, Message):
            logger.warning("%s: ignored a message that is not a vesta message: %r",
                           self.name, message)
            self.counters.add("actor_errors")
            return None
        try:
            return self.handle(message)
        except Exception:
            logger.exception("%s failed to handle %s", self.name, message.tag)
            self.counters.add("actor_errors")
            return None

    def handle(self, message: Message) -> Any:
        """Handle one message; subclasses dispatch with ``match`` and end with this one."""
        if isinstance(message, Ping):
            return True
        logger.warning("%s: no handler for %s", self.name, message.tag)
        return None

    def every(self, seconds: float, name: str = "") -> Ticker:
        """Send this actor ``Tick(name)`` every ``seconds`` until it stops."""
        ticker = Ticker(self.actor_ref, seconds, Tick(name))
        self._tickers.append(ticker)
        ticker.start()
        return ticker

    def on_stop(self) -> None:
        for ticker in self._tickers:
            ticker.stop()
        self.stopping()

    def stopping(self) -> None:
        """Release what the actor holds; called once, in the actor's thread, as it stops."""


def tell_quietly(ref: pykka.ActorRef[Any], message: Message) -> bool:
    """Tell from an I/O thread; False, and nothing raised, if the actor has already stopped."""
    try:
        ref.tell(message)
    except pykka.ActorDeadError:
        return False
    return True


class Ticker(threading.Thread):
    """A timer thread that tells an actor the same message at a fixed interval."""

    def __init__(self, target: pykka.ActorRef[Any], seconds: float, message: Message) -> None:
        super().__init__(name=f"ticker-{message.tag}", daemon=True)
        self.target = target
        self.seconds = seconds
        self.message = message
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(self.seconds):
            if not tell_quietly(self.target, self.message):
                return

    def stop(self) -> None:
        self._stopped.set()
