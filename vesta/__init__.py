"""vesta: a federated compute daemon for small, trusted networks of personal machines.

This module stays light: the CLI imports it, and every import here costs start-up time.
"""

__version__ = "0.1.0"

#: The wire protocol version. Peers with another major version cannot talk to each other.
PROTOCOL_VERSION = 1
