"""The WireGuard protocol engine shared by the pytun hub and client."""

__version__ = "0.1.0"
