"""The references the actors hold to each other, filled in by the launcher before work flows."""

from __future__ import annotations

from typing import Any

import pykka

from vesta.messages import ForPeer, Message


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
    ledger: pykka.ActorRef[Any]
    clients: Any  # where ToClient messages go: control.ClientOutbox, or a test's probe

    def __init__(self) -> None:
        #: The PeerLink of each linked peer, by fingerprint. Only the Transport, their owner,
        #: changes it: it adds a link once the link is up and removes it before it goes down.
        self.peer_links: dict[str, pykka.ActorRef[Any]] = {}

    def to_peer(self, fingerprint: str, msg: Message) -> None:
        """Send ``msg`` to a peer: straight to its PeerLink, or, when it has none, through the
        Transport, which says what became of it (a task for a node without a link is lost)."""
        link = self.peer_links.get(fingerprint)
        if link is not None:
            try:
                link.tell(ForPeer(fingerprint, msg))
                return
            except pykka.ActorDeadError:
                pass
        self.transport.tell(ForPeer(fingerprint, msg))
