"""Graft services: ingress, planner and worker, each runnable as ``python -m services.<name>``."""
