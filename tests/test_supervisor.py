"""``graft up``'s process supervisor with tiny real child processes: restarts, backoff, logs and stopping."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from structlog.testing import capture_logs

from common.logs import Event
from tests.helpers import alive, until
from tools.supervisor import ChildSpec, Supervisor, service_argv


def py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


# Appends its pid to $RUNS; crashes (exit 3) on its first two runs, then stays up.
FLAKY = """
import os, sys, time
runs = os.environ["RUNS"]
with open(runs, "a") as f:
    f.write(f"{os.getpid()}\\n")
n = len(open(runs).read().split())
print(f"run {n} of {os.environ['WHO']}", flush=True)
if n <= 2:
    sys.exit(3)
time.sleep(60)
"""


async def test_restarts_a_crashed_child_and_stops_it_cleanly(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    steady = ChildSpec("steady", py("import time; print('steady up', flush=True); time.sleep(60)"))
    flaky = ChildSpec("flaky", py(FLAKY), env={"RUNS": str(runs), "WHO": "flaky"})
    sup = Supervisor([steady, flaky], base_env={**os.environ, "WHO": "base"}, log_dir=tmp_path / "logs",
                     max_backoff_s=0.1)
    with capture_logs() as logs:
        await sup.start()
        try:
            await until(lambda: sup.status()["flaky"]["restarts"] == 2 and sup.status()["flaky"]["running"]
                        and len(runs.read_text().split()) == 3, 15, "two restarts of the crashing child")
            st = sup.status()
            assert st["flaky"]["last_exit"] == 3 and st["steady"] == {
                "pid": st["steady"]["pid"], "running": True, "restarts": 0, "last_exit": None}
            pids = [int(p) for p in runs.read_text().split()]
            assert len(pids) == 3 and len(set(pids)) == 3 and pids[-1] == st["flaky"]["pid"]
            steady_pid, flaky_pid = st["steady"]["pid"], st["flaky"]["pid"]
            assert isinstance(steady_pid, int) and isinstance(flaky_pid, int)
            # Each child runs in its own session (so a SIGKILL can take its whole process group).
            assert os.getsid(flaky_pid) == flaky_pid and os.getsid(steady_pid) == steady_pid
            await until(lambda: "run 3" in (tmp_path / "logs" / "flaky.log").read_text(), 5, "the third run's log")
            assert not open_files_under(tmp_path / "logs")  # no descriptor kept per (re)start
        finally:
            started = time.monotonic()
            await sup.stop()
    assert time.monotonic() - started < 5  # both exit on SIGTERM at once: no grace period spent
    # Every run appended to the child's own log; the spec's env wins over the base env.
    assert (tmp_path / "logs" / "flaky.log").read_text().splitlines() == [f"run {i} of flaky" for i in (1, 2, 3)]
    assert (tmp_path / "logs" / "steady.log").read_text() == "steady up\n"
    st = sup.status()
    assert not st["flaky"]["running"] and not st["steady"]["running"]
    assert st["flaky"]["last_exit"] == -signal.SIGTERM and st["steady"]["last_exit"] == -signal.SIGTERM
    assert st["flaky"]["restarts"] == 2  # stopping is not a crash: no restart
    assert not alive(steady_pid) and not alive(flaky_pid)
    exits = [e for e in logs if e["event"] == Event.REPLICA_EXITED]
    assert [(e["child"], e["code"]) for e in exits] == [("flaky", 3), ("flaky", 3)]


async def test_backoff_doubles_up_to_the_cap(tmp_path: Path) -> None:
    sup = Supervisor([ChildSpec("crasher", py("raise SystemExit(7)"))], max_backoff_s=0.8)
    with capture_logs() as logs:
        await sup.start()
        try:
            await until(lambda: sup.children["crasher"].restarts >= 4, 15, "four crashes")
        finally:
            await sup.stop()
    delays = [e["restart_in_s"] for e in logs if e["event"] == Event.REPLICA_EXITED]
    assert delays[:4] == [0.5, 0.8, 0.8, 0.8]
    assert sup.status()["crasher"]["last_exit"] == 7


async def test_a_child_that_ignores_sigterm_is_killed_with_its_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "grandchild"
    stubborn = py(f"""
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
gc = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                       "time.sleep(60)"])
open({str(pidfile)!r}, "w").write(str(gc.pid))
time.sleep(60)
""")
    sup = Supervisor([ChildSpec("stubborn", stubborn)], grace_s=0.5)
    await sup.start()
    try:
        await until(lambda: pidfile.exists() and pidfile.read_text(), 15, "the grandchild")
        grandchild = int(pidfile.read_text())
        child = sup.status()["stubborn"]["pid"]
        assert isinstance(child, int) and alive(grandchild) and alive(child)
    finally:
        started = time.monotonic()
        await sup.stop()
    assert 0.5 <= time.monotonic() - started < 5  # the grace period, then SIGKILL
    assert sup.status()["stubborn"]["last_exit"] == -signal.SIGKILL
    await until(lambda: not alive(grandchild), 5, "the grandchild's death")  # reaped by init: poll
    assert not alive(child)


async def test_a_child_that_cannot_start_is_retried_and_does_not_block_the_others(tmp_path: Path) -> None:
    missing = ChildSpec("missing", [str(tmp_path / "no-such-binary")])
    ok = ChildSpec("ok", py("import time; time.sleep(60)"))
    sup = Supervisor([missing, ok], log_dir=tmp_path, max_backoff_s=0.05)
    with capture_logs() as logs:
        await sup.start()
        try:
            await until(lambda: sup.children["missing"].restarts >= 3, 10, "retries of the missing binary")
            st = sup.status()
            assert st["missing"]["running"] is False and st["missing"]["pid"] is None
            assert st["ok"]["running"] is True
            # The children hold their log files; the supervisor keeps no descriptor per (re)start.
            assert not open_files_under(tmp_path)
        finally:
            await sup.stop()
    failed = [e for e in logs if e["event"] == Event.REPLICA_EXITED and e["child"] == "missing"]
    assert failed and failed[0]["code"] is None and "no-such-binary" in failed[0]["error"]
    # One log file per child, however often it was (re)started; none is left open by the supervisor.
    assert logs_in(tmp_path) == ["missing.log", "ok.log"]
    assert not open_files_under(tmp_path)


def logs_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".log")


def open_files_under(folder: Path) -> list[str]:
    """Files under ``folder`` this process holds open."""
    fds = Path("/proc/self/fd")
    targets = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            targets.append(str(fd.readlink()))
    return [t for t in targets if t.startswith(str(folder))]


async def test_stop_right_after_start_leaves_no_child_behind(tmp_path: Path) -> None:
    for attempt in range(5):
        pidfile = tmp_path / f"pid{attempt}"
        spec = ChildSpec("c", py(f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid())); "
                                 "time.sleep(60)"))
        sup = Supervisor([spec], grace_s=5.0)
        await sup.start()
        for _ in range(attempt):  # let the spawn get a little further each attempt
            await asyncio.sleep(0)
        started = time.monotonic()
        await sup.stop()
        assert time.monotonic() - started < 2.5, f"attempt {attempt}: stop() waited out the grace period"
        proc = sup.children["c"].proc
        assert proc is None or proc.returncode is not None, f"attempt {attempt}: a child is still running"
        await asyncio.sleep(0.3)  # a child spawned behind stop()'s back would have written its pid by now
        if pidfile.exists() and pidfile.read_text():
            assert not alive(int(pidfile.read_text())), f"attempt {attempt}: orphaned child"


def test_service_argv_runs_the_service_module_with_this_interpreter() -> None:
    assert service_argv("worker", "--devices", "auto") == [sys.executable, "-m", "services.worker", "--devices",
                                                           "auto"]
