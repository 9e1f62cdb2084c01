"""``graft doctor [--gpu] [--json]``: the first command on a new host — is it ready to serve, and will plans hold?

``report`` (result records, exit codes), ``verdicts`` (every threshold, as pure functions of numbers),
``checks`` (each check a small function; ``run_doctor``), ``probes`` (the GPU workloads, run in child
processes with a replica's environment). ``tools/cli_doctor.py`` is the typer layer.
"""
