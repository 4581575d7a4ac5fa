"""Controller <-> agent transports (in-process, network)."""
