"""The references the actors hold to each other, filled in by the launcher before work flows."""

from __future__ import annotations

from typing import Any

import pykka


class Links:
    """One ``ActorRef`` per role. The launcher (or a test) sets them; the actors only read them.

    Actors refer to each other in a cycle (the autopilot tells the executor what to run, the
    executor tells the autopilot what happened), so refs cannot all be constructor arguments;
    this holder is filled in, explicitly, right after the actors start and before any message
    that would need it can arrive.
    """

    autopilot: pykka.ActorRef[Any]
    executor: pykka.ActorRef[Any]
    control: pykka.ActorRef[Any]
    discovery: pykka.ActorRef[Any]
    transport: pykka.ActorRef[Any]  # the owner of the PeerLinks
    clients: Any  # where ToClient messages go: control.ClientOutbox, or a test's probe
