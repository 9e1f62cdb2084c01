"""A stand-in replica process for agent tests: the agent's protocol without torch or a model.

``python -m tests.fake_replica --name N --device D --model M --share S --metrics-port P`` (the argv the
agent gives ``services.worker.replica``; the agent runs it through a two-line interpreter script, see
``tests.worker_helpers.fake_python``). Like a real replica it asks for SIGTERM when its parent dies,
reads ``control`` assignments on its stdin, publishes itself in the replica registry (``standby`` or
``serving``, the streams it was told to read, its consumer and the assignment's ``seq``), and exits 0
on ``stop`` or end-of-file. It reads no stream: a test plays the data plane itself.

Knobs (environment): ``FAKE_REPLICA_LOG`` — append one JSON line per start (argv, pid and the share
environment) and per assignment; ``FAKE_REPLICA_EXIT`` — exit with that code ``FAKE_REPLICA_EXIT_AFTER_S``
seconds after starting, before registering (a replica that cannot load; without a delay the
interpreter script exits at once, before Python starts); ``FAKE_REPLICA_LOAD_S`` — seconds it "loads"
before registering (default 0); ``FAKE_REPLICA_ONCE`` — a path: the first process creates it and
serves, every later one exits 1 at once (also in the interpreter script).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from typing import Any

from common.contract import keys
from common.store.connection import connect
from common.store.registry import Registry
from services.lifecycle import die_with_parent
from services.worker.control import STOP, Assignment, messages, stdin_reader
from services.worker.process import HEARTBEAT_S, REPLICA_TTL_S

SHARE_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "OMP_NUM_THREADS", "GRAFT_DIE_WITH_PARENT")


def record(**row: Any) -> None:
    path = os.environ.get("FAKE_REPLICA_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")


async def serve(args: argparse.Namespace) -> int:
    if os.environ.get("FAKE_REPLICA_EXIT"):
        await asyncio.sleep(float(os.environ.get("FAKE_REPLICA_EXIT_AFTER_S", "0")))
        return int(os.environ["FAKE_REPLICA_EXIT"])
    await asyncio.sleep(float(os.environ.get("FAKE_REPLICA_LOAD_S", "0")))
    r = connect(os.environ["REDIS_URL"])
    registry = Registry(r, keys.REPLICA_KIND, REPLICA_TTL_S)
    status: dict[str, Any] = {"pid": os.getpid(), "device": args.device, "model": args.model, "share": args.share,
                              "state": "standby", "streams": [], "consumer": None, "seq": 0}
    done = asyncio.Event()

    async def beat() -> None:
        while not done.is_set():
            with contextlib.suppress(Exception):
                await registry.beat(args.name, status)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), HEARTBEAT_S)

    beating = asyncio.create_task(beat())
    try:
        async for msg in messages(await stdin_reader()):
            if msg.get("kind") == STOP["kind"]:
                break
            a = Assignment.from_wire(msg)
            status.update(state="standby" if a.standby else "serving", streams=list(a.streams), consumer=a.consumer,
                          seq=a.seq, share=a.share)
            record(event="assigned", name=args.name, pid=os.getpid(), consumer=a.consumer, streams=list(a.streams),
                   share=a.share, seq=a.seq)
            await registry.beat(args.name, status)
    finally:
        done.set()
        await beating
        with contextlib.suppress(Exception):
            await registry.leave(args.name)
        await r.aclose()
    return 0


def main() -> int:
    die_with_parent()
    p = argparse.ArgumentParser()
    for flag in ("--name", "--device", "--model", "--metrics-port"):
        p.add_argument(flag, required=True)
    p.add_argument("--share", type=int, required=True)
    args = p.parse_args()
    record(event="started", argv=sys.argv[1:], pid=os.getpid(), env={k: os.environ.get(k) for k in SHARE_ENV})
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
