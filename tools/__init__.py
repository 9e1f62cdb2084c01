"""Graft's admin CLI (``graft``) and offline tools: models, profile, plan, simulate, bench, loadgen."""
