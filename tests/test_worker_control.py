"""The agent → replica channel (``control.py``: msgpack assignments on the child's stdin) and the child
process handle (``process.py``: share environment, the pipe, the exit waiter, stop, backoff)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.worker.control import STOP, Assignment, Task, encode, messages
from services.worker.device import Device
from services.worker.process import (
    BACKOFF_MAX_S,
    BACKOFF_START_S,
    CONFIG_BACKOFF_MAX_S,
    EXIT_CONFIG,
    STABLE_S,
    Backoff,
    ReplicaProcess,
    terminate_all,
)
from tests.helpers import alive

pytestmark = pytest.mark.timeout(30)

TASK = Task(4, "g2", "graft:group:{4:g2}", 8, 12.5, (0, 4))


def test_assignment_round_trip() -> None:
    a = Assignment(7, "gpu1-resnet18-3", 40, TASK, (TASK.stream, "graft:group:{3:g1}"), 1.5)
    wire = msgpack.unpackb(encode(a.to_wire()), raw=False)
    assert wire["kind"] == "assign" and Assignment.from_wire(wire) == a
    assert not a.standby and a.draining == ("graft:group:{3:g1}",)
    standby = Assignment(8)
    assert standby.standby and standby.consumer is None and standby.draining == ()
    assert Assignment.from_wire(msgpack.unpackb(encode(standby.to_wire()), raw=False)) == standby
    # defaults for what an older agent would not send; a share is at least 1
    assert Assignment.from_wire({"kind": "assign", "share": 0}) == Assignment(0, None, 1)
    only_drains = Assignment(9, "c", 1, None, ("s",))
    assert not only_drains.standby and only_drains.draining == ("s",)  # drains without an active group
    assert Task.from_wire({"epoch": 1, "group": "g", "stream": "s", "batch": 2, "latency_ms": 3}).cuts == ()


@given(st.lists(st.integers(1, 64), min_size=1, max_size=20), st.integers(1, 5))
async def test_messages_survive_any_chunking(splits: list[int], n: int) -> None:
    msgs = [Assignment(i, f"c{i}", 1 + i, TASK if i % 2 else None, (f"s{i}",)).to_wire() for i in range(n)]
    data = b"".join(encode(m) for m in msgs) + encode(STOP) + msgpack.packb([1, 2]) + encode({"kind": "x"})
    reader = asyncio.StreamReader()
    pos = 0
    for size in splits * (len(data) // max(1, sum(splits)) + 1):
        if pos >= len(data):
            break
        reader.feed_data(data[pos:pos + size])
        pos += size
    reader.feed_data(data[pos:])
    reader.feed_eof()
    got = [m async for m in messages(reader)]
    # every dict, in order; the non-dict message is skipped; end-of-file ends the iteration
    assert got == [*msgs, STOP, {"kind": "x"}]


def test_backoff_doubles_caps_and_resets_after_a_stable_run() -> None:
    b = Backoff()
    assert [b.next(1.0) for _ in range(7)] == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0]
    assert BACKOFF_START_S == 0.2 and BACKOFF_MAX_S == 5.0
    assert b.next(STABLE_S) == BACKOFF_START_S  # it ran stably: fast again
    # a kind that cannot be served here (exit 2): slowly, and slower each time, up to a minute
    assert [b.next(1.0, EXIT_CONFIG) for _ in range(6)] == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0]
    assert CONFIG_BACKOFF_MAX_S == 60.0
    assert b.next(1.0, 1) == BACKOFF_MAX_S  # a crash after that: back to the crash cap


def test_replica_command_line_names_its_process() -> None:
    proc = ReplicaProcess("agent/3", Device("gpu", 1, "gpu-host-1"), "resnet18", 40, {}, python="py",
                          metrics_port=9100)
    argv = proc.argv()
    assert argv[:3] == ["py", "-m", "services.worker.replica"]
    assert dict(zip(argv[3::2], argv[4::2], strict=True)) == {
        "--name": "agent/3", "--device": "gpu-host-1/gpu1", "--model": "resnet18", "--share": "40",
        "--metrics-port": "9100"}
    assert proc.pid is None and not proc.alive and proc.describe()["consumer"] is None


def cat_to(tmp_path: Path) -> str:
    """An interpreter that records its environment and copies its stdin to a file, then exits 0."""
    script = tmp_path / "python"
    script.write_text(f"#!/bin/sh\nenv > {tmp_path / 'env'}\nexec cat > {tmp_path / 'stdin'}\n")
    script.chmod(0o755)
    return str(script)


async def test_assignments_travel_the_pipe_and_end_of_file_stops_the_child(tmp_path: Path) -> None:
    proc = ReplicaProcess("a/0", Device("cpu", 0), "resnet18", 3, {"PATH": os.environ["PATH"], "KEEP": "1"},
                          python=cat_to(tmp_path), loaded=True)
    await proc.start()
    assert proc.alive and proc.pid is not None
    first = Assignment(99, "cpu0-resnet18-0", 3, TASK, (TASK.stream,))
    assert await proc.assign(first)
    assert await proc.assign(Assignment(0))
    assert proc.assignment == Assignment(2) and proc.seq == 2  # the handle numbers what it sends
    await proc.stop()  # a stop message; `cat` keeps going until end-of-file...
    assert proc.proc is not None and proc.proc.stdin is not None
    proc.proc.stdin.close()  # ...which is what the agent's death means to a child
    await asyncio.wait_for(proc.exited.wait(), 5)
    assert proc.exit_code == 0 and not proc.alive and not await proc.assign(Assignment(0))  # gone: False
    reader = asyncio.StreamReader()
    reader.feed_data((tmp_path / "stdin").read_bytes())
    reader.feed_eof()
    got = [m async for m in messages(reader)]
    assert [Assignment.from_wire(m) for m in got[:2]] == [
        Assignment(1, "cpu0-resnet18-0", 3, TASK, (TASK.stream,)), Assignment(2)]
    assert got[2] == STOP
    env = dict(line.split("=", 1) for line in (tmp_path / "env").read_text().splitlines() if "=" in line)
    assert env["GRAFT_DIE_WITH_PARENT"] == "1" and env["OMP_NUM_THREADS"] == "3" and env["KEEP"] == "1"
    assert env["CUDA_VISIBLE_DEVICES"] == ""


async def test_terminate_all_stops_then_kills_what_does_not_listen(tmp_path: Path) -> None:
    listens, stubborn = tmp_path / "listens", tmp_path / "stubborn"
    listens.write_text("#!/bin/sh\nexec head -c 1 > /dev/null\n")  # exits on the stop message
    stubborn.write_text("#!/bin/sh\ntrap '' TERM\nwhile true; do sleep 0.05; done\n")  # ignores it and SIGTERM
    for f in (listens, stubborn):
        f.chmod(0o755)
    polite = ReplicaProcess("a/0", Device("cpu", 0), "m", 1, {"PATH": os.environ["PATH"]}, python=str(listens))
    deaf = ReplicaProcess("a/1", Device("cpu", 0), "m", 1, {"PATH": os.environ["PATH"]}, python=str(stubborn))
    for p in (polite, deaf):
        await p.start()
        p.loaded = True  # registered: they are sent the stop message only
    await asyncio.sleep(0.2)  # the shell has set its trap
    await asyncio.wait_for(terminate_all([polite, deaf], grace_s=0.5), 10)
    assert polite.exit_code == 0 and deaf.exit_code == -signal.SIGKILL
    assert not alive(polite.proc.pid) and deaf.proc is not None and not alive(deaf.proc.pid)


async def test_a_child_still_loading_is_sent_sigterm_too(tmp_path: Path) -> None:
    # Before the fix only the stop message was sent, which a child still importing torch reads seconds
    # later: an agent stopping meanwhile waited its whole grace (10 s) and then SIGKILLed it.
    importing = tmp_path / "importing"
    importing.write_text("#!/bin/sh\nexec sleep 30\n")  # reads no stdin, like a child busy importing
    importing.chmod(0o755)
    env = {"PATH": os.environ["PATH"]}
    loading = ReplicaProcess("a/0", Device("cpu", 0), "m", 1, env, python=str(importing))
    loaded = ReplicaProcess("a/1", Device("cpu", 0), "m", 1, env, python=str(importing), loaded=True)
    for p in (loading, loaded):
        await p.start()
        await p.stop()
    await asyncio.wait_for(loading.exited.wait(), 2)
    assert loading.exit_code == -signal.SIGTERM
    await asyncio.sleep(0.3)
    assert loaded.alive  # a loaded one finishes what it holds: the message only
    loaded.signal(signal.SIGKILL)
    await asyncio.wait_for(loaded.exited.wait(), 2)


def test_die_with_parent_reaches_a_replica(tmp_path: Path) -> None:
    """The child's side of the lifeline: with GRAFT_DIE_WITH_PARENT=1 a process asks for SIGTERM when its
    parent dies. A middle process starts a grandchild and is SIGKILLed; the grandchild must go too."""
    code = (
        "import os, sys, time\n"
        "from services.lifecycle import die_with_parent\n"
        "die_with_parent()\n"
        f"open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(30)\n"
    )
    middle = (
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {code!r}], env={{**os.environ, 'GRAFT_DIE_WITH_PARENT': '1'}})\n"
        "time.sleep(30)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", middle], cwd=os.getcwd())
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "pid").exists() or not (tmp_path / "pid").read_text():
            assert time.monotonic() < deadline, "the grandchild never started"
            time.sleep(0.05)
        pid = int((tmp_path / "pid").read_text())
        assert alive(pid)
        parent.kill()
        parent.wait(5)
        deadline = time.monotonic() + 5
        while alive(pid):
            assert time.monotonic() < deadline, "the child outlived its parent"
            time.sleep(0.05)
    finally:
        if parent.poll() is None:
            parent.kill()
