"""Graft's shared core: wire format, stream names, models, profiles, planning and batching logic."""

__version__ = "0.1.0"
