"""Transport: framing, sealing and the socket loops that carry vesta's messages."""
