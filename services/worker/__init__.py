"""Graft worker service: a device agent and its replica processes (design.md sections 6-7).

    __main__.py    ``python -m services.worker``: the agent's command line (``--devices``, ``--check``)
    agent.py       follows the plan; one child process per replica placed on its devices
    supervisor.py  one replica child: start with its share, restart with backoff, stop gracefully
    device.py      device discovery (NVML, MPS) and the environment that carries a share
    replica.py     ``python -m services.worker.replica``: one group's consumer, reaper and heartbeat
    loop.py        the deadline-aware batching loop (shared ``BatchPolicy``) and re-aligned execution
    intake.py      stream entry → job, or the error to answer
    latency.py     predicted batch latency: profile at the share, corrected online by measurements
    drain.py       the plan of an epoch, and when a retired group stream is drained
"""
