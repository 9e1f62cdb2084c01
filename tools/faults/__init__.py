"""The fault suite of ``graft bench faults`` (``tools/bench_faults.py``): a reply accountant that trusts no
SDK, open-loop raw load, process census, scenarios and their report."""
