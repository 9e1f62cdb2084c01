"""One replica process: ``python -m services.worker.replica --name N --device D --model M --share S``.

A long-lived executor of one model on one device. It loads the whole model once (so it can serve any
cut, and any group of that model the agent hands it), warms up, registers as *standby* and then does
what the agent's assignments on its stdin say (``control.py``): read the assigned streams under the
assigned consumer name, batch by deadline (``loop.BatchLoop``) at the assigned batch size and share,
reply. A new assignment re-targets the running process — no model load, no cold start — which is how
plan switches and takeovers of a dead replica's slot cost milliseconds instead of seconds. It reads
its stdin from the start: an assignment that comes while it loads is applied once loaded.

The share on a GPU (MPS thread percentage) is fixed for the process's life, before CUDA initialises;
on a CPU the share is a thread count, applied with ``torch.set_num_threads`` whenever it changes.
A GPU placement never silently runs on the CPU: without CUDA the process exits with code 2.

Pieces: ``feed.py`` (reading, reclaiming), ``loop.py`` (batching, execution), ``replying.py``
(replies, acks, blobs), and this module (lifecycle, assignments, the registry heartbeat). It stops on
the ``stop`` message, on end-of-file of its stdin (its agent is gone), or on SIGTERM: it stops
reading, finishes what it holds, leaves the registry and exits 0 — at once when that comes while it
is still loading (it holds nothing yet; the loading thread is abandoned).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import structlog
import torch

from common.contract import keys
from common.contract.errors import GraftError
from common.logs import Event, bind, configure
from common.metrics import PLAN_EPOCH, HealthServer
from common.model.executor import WARM_BATCH, FragmentRunner, warm_up
from common.model.timing import prepare_device
from common.settings import Settings
from common.store.connection import TRANSIENT, Client, connect
from common.store.redis_store import RedisStore
from common.store.registry import Registry
from services.lifecycle import die_with_parent, run_loop
from services.worker.control import STOP, Assignment, messages, stdin_reader
from services.worker.device import Device, DeviceError
from services.worker.feed import Feed
from services.worker.intake import Intake
from services.worker.latency import LatencyModel, latency_model, load_profile_model
from services.worker.loop import BatchLoop
from services.worker.process import EXIT_CONFIG, EXIT_CRASH, EXIT_OK, HEARTBEAT_S, REPLICA_TTL_S, cancel_tasks
from services.worker.replying import Replier

log = structlog.get_logger("worker.replica")



class ReplicaConfigError(RuntimeError):
    """The model or device cannot be served here (exit code 2: restarting will not help)."""


class Replica:
    def __init__(self, settings: Settings, *, name: str, device: str, model: str, share: int,
                 redis: Client | None = None, metrics_port: int = 0, heartbeat_s: float = HEARTBEAT_S) -> None:
        self.settings = settings
        self.name = name
        self.device = Device.parse(device)
        self.model = model
        self.share = max(1, share)
        self._redis: Client | None = redis
        self._own_redis = redis is None
        self._metrics_port = metrics_port
        self._heartbeat_s = heartbeat_s
        self._stop = asyncio.Event()
        self._beat_now = asyncio.Event()  # publish the status now (a new assignment, stopping)
        self.state = "starting"
        self.assignment: Assignment | None = None
        self.loop: BatchLoop | None = None
        self.feed: Feed | None = None
        self.runner: FragmentRunner | None = None
        self._profile: Any = None
        self._served_at_assign = 0
        self._batches_at_assign = 0
        self.health_port: int | None = None
        self.exit_code = EXIT_OK
        self._early: Assignment | None = None  # received while loading
        self.load_abandoned = False

    def stop(self) -> None:
        # While still loading, run() returns at once (``_load_unless_stopped``) and the process leaves
        # without waiting for the load; never os._exit here: an in-process caller (a test) would go too.
        if not self._stop.is_set():
            log.info("replica_stopping", replica=self.name)
            self.state = "stopping"
        self._stop.set()
        self._beat_now.set()
        if self.loop is not None:
            self.loop.wake()

    # ---------------------------------------------------------------------------------- lifecycle

    async def run(self, control: AsyncIterator[dict[str, Any]] | None = None) -> int:
        bind(replica=self.name, model=self.model)
        r = self._redis if self._redis is not None else self._connect()
        self._redis = r
        registry = Registry(r, keys.REPLICA_KIND, REPLICA_TTL_S)
        health = await HealthServer(self._ready, host=self.settings.metrics_host, port=self._metrics_port).start()
        self.health_port = health.port
        beat = asyncio.create_task(self._heartbeat(registry), name=f"{self.name}-heartbeat")
        helpers: list[asyncio.Task[None]] = []
        try:
            if control is not None:
                # From the start: a stop, or the agent's death (end of file), must not wait for the model.
                helpers.append(asyncio.create_task(self._follow(control), name=f"{self.name}-control"))
                helpers[-1].add_done_callback(self._helper_done)
            if not await self._load_unless_stopped(r):
                log.info("replica_stopped_while_loading", replica=self.name)
            else:
                assert self.loop is not None and self.feed is not None
                self.state = "standby"
                self._beat_now.set()  # loaded: the agent may hand it a slot
                log.info(Event.SERVICE_STARTED, replica=self.name, device=self.device.name, share=self.share,
                         metrics_port=health.port, latency=self.loop.latency.source)
                helpers.append(asyncio.create_task(self.feed.reap_forever(self._stop), name=f"{self.name}-reap"))
                helpers[-1].add_done_callback(self._helper_done)
                if self._early is not None:
                    self.apply(self._early)
                await self.loop.run(self._stop)
        except ReplicaConfigError as exc:
            log.error("replica_config_error", replica=self.name, error=str(exc))
            self.exit_code = EXIT_CONFIG
        finally:
            self._stop.set()
            if self.feed is not None:
                await self.feed.close()
            if self.loop is not None and self.loop.queue:
                await self.loop.run(self._stop)  # what the last reads brought in
            await cancel_tasks([*helpers, beat])
            with contextlib.suppress(*TRANSIENT, GraftError):
                await registry.leave(self.name)
            await health.stop()
            if self._own_redis:
                await r.aclose()
        log.info(Event.SERVICE_STOPPED, replica=self.name, exit_code=self.exit_code)
        return self.exit_code

    async def _load_unless_stopped(self, r: Client) -> bool:
        """Load the model; False when asked to stop first. Loading runs in a thread nobody can interrupt:
        it is left behind (``load_abandoned``), and the process exits without waiting for it."""
        load = asyncio.ensure_future(self._load(r))
        stopped = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({load, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if load.done():
            load.result()  # ReplicaConfigError
            return True
        load.cancel()
        self.load_abandoned = True
        return False

    def _helper_done(self, task: asyncio.Task[Any]) -> None:
        """A helper (or a stream's reader) that dies leaves a replica that looks alive but no longer reads:
        crash instead."""
        if task.cancelled() or task.exception() is None:
            return
        log.error("replica_helper_failed", task=task.get_name(), exc_info=task.exception())
        self.exit_code = EXIT_CRASH
        self.stop()

    def _connect(self) -> Any:
        if not self.settings.redis_url:
            raise ReplicaConfigError("REDIS_URL is not set")
        return connect(self.settings.redis_url, settings=self.settings, client_name=f"replica:{self.name}")

    async def _ready(self) -> bool:
        return self.state in ("standby", "serving") and self._redis is not None and bool(await self._redis.ping())

    def _torch_device(self) -> str:
        if not self.device.is_gpu:
            return "cpu"
        if torch.cuda.is_available():
            return "cuda"
        raise ReplicaConfigError(f"placed on {self.device.name}, but CUDA is not available in this process "
                                 f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                                 f"a GPU replica never falls back to the CPU")

    async def _load(self, r: Client) -> None:
        device = self._torch_device()
        prepare_device(device)  # cuDNN autotuning on CUDA, as the profiler measured (common.model.timing)
        weights = Path(self.settings.weights_dir) / f"{self.model}.pt" if self.settings.weights_dir else None
        if weights is not None and not weights.exists():
            log.warning("weights_missing", model=self.model, path=str(weights), using="seeded random weights")
            weights = None
        if not self.device.is_gpu:
            torch.set_num_threads(self.share)
        try:
            runner = await asyncio.to_thread(FragmentRunner, self.model, 0, resolution=self.settings.resolution or None,
                                             device=device, weights=weights, seed=self.settings.seed)
        except (GraftError, ValueError) as exc:
            raise ReplicaConfigError(f"cannot build {self.model}: {exc}") from exc
        self._profile = load_profile_model(self.settings, self.model)
        # On CUDA every batch size a plan may assign (the profile's grid tops it): autotuning runs once
        # per input shape, and must not land on a served batch.
        await asyncio.to_thread(warm_up, runner, self._profile.batches[-1] if self._profile else WARM_BATCH)
        # The model and the libraries are loaded for good: keep the collector from rescanning them
        # (a full collection over a model's objects pauses the event loop for tens of milliseconds).
        gc.collect()
        gc.freeze()
        self.runner = runner
        latency = latency_model(self._profile, runner.n_blocks, self.share)
        intake = Intake(runner.info, max_tensor_bytes=self.settings.max_tensor_bytes,
                        max_budget_s=self.settings.max_slo_ms / 1000.0)
        replier = Replier(RedisStore(r))
        self.loop = BatchLoop(runner, latency, replier, max_batch=1, eager=self.settings.batching == "eager")
        self.feed = Feed(r, self.loop, intake, replier, block_ms=self.settings.block_ms,
                         max_deliveries=self.settings.max_deliveries,
                         stream_maxlen=self.settings.stream_maxlen, min_idle_ms=self._min_idle_ms,
                         on_reader_done=self._helper_done)

    def _min_idle_ms(self) -> int:
        """How long an entry must sit unacked at a sibling before this replica takes it: a few batch times."""
        task = self.assignment.active if self.assignment is not None else None
        worst_ms = 3.0 * (task.latency_ms if task is not None else 0.0)
        return int(max(worst_ms, 500.0))

    # -------------------------------------------------------------------------------- assignments

    async def _follow(self, control: AsyncIterator[dict[str, Any]]) -> None:
        async for msg in control:
            if msg.get("kind") == STOP["kind"]:
                break
            if msg.get("kind") == "assign":
                try:
                    a = Assignment.from_wire(msg)
                    if self.state == "starting" or self.loop is None:  # (or stopping while loading)
                        self._early = a  # still loading: the newest one is applied once loaded
                    else:
                        self.apply(a)
                except (KeyError, TypeError, ValueError) as exc:
                    log.error("bad_assignment", error=repr(exc))
        # end of file: the agent is gone (or asked us to stop)
        self.stop()

    def apply(self, a: Assignment) -> None:
        """Re-target this process: consumer, share, batch size, the streams it reads."""
        assert self.loop is not None and self.feed is not None and self.runner is not None
        prev = self.assignment
        # The same group again (a drained stream dropped, say): the loop keeps its latency model, memo of
        # measured compositions included.
        same_task = prev is not None and prev.active == a.active and prev.latency_scale == a.latency_scale
        if a.share != self.share or (a.active is not None and not same_task):
            share_changed = a.share != self.share
            if share_changed and not self.device.is_gpu:
                torch.set_num_threads(a.share)
            if share_changed and self.device.is_gpu:
                log.error("gpu_share_fixed", replica=self.name, share=self.share, asked=a.share)
            else:
                self.share = a.share
            task = a.active
            new = latency_model(self._profile, self.runner.n_blocks, self.share,
                                prior_ms=task.latency_ms / max(a.latency_scale, 1e-9) if task else 0.0,
                                prior_batch=task.batch if task else 1)
            if not share_changed:
                new.carry_from(self.loop.latency)
            self.loop.retarget(max_batch=task.batch if task else self.loop.max_batch, latency=new,
                               group=task.group if task else "")
        self.loop.read_ahead = a.active is not None and a.active.replicas <= 1
        self.feed.assign(a.consumer, a.streams)
        previous = self.assignment
        self.assignment = a
        if a.active is not None and (previous is None or previous.active != a.active):
            self._served_at_assign, self._batches_at_assign = self.loop.served, self.loop.batches
            PLAN_EPOCH.labels(service="replica").set(a.active.epoch)
            bind(epoch=a.active.epoch, group=a.active.group, consumer=a.consumer)
        self.state = "standby" if a.standby else "serving"
        # At once, not at the next beat: the ingress switches a plan, and routes around a dead replica,
        # only once the registry shows a live reader of the stream.
        self._beat_now.set()
        log.info("assigned", replica=self.name, consumer=a.consumer, share=self.share, seq=a.seq,
                 active=None if a.active is None else a.active.stream, draining=list(a.draining))

    # ---------------------------------------------------------------------------------- heartbeat

    def status(self) -> dict[str, Any]:
        loop, a = self.loop, self.assignment
        task = a.active if a is not None else None
        latency: LatencyModel | None = loop.latency if loop is not None else None
        return {"pid": os.getpid(), "device": self.device.name, "model": self.model, "share": self.share,
                "state": self.state, "metrics_port": self.health_port, "seq": 0 if a is None else a.seq,
                "consumer": None if a is None else a.consumer, "streams": [] if self.feed is None else self.feed.streams,
                "epoch": None if task is None else task.epoch, "group": None if task is None else task.group,
                "batch": None if task is None else task.batch,
                "queued": 0 if loop is None else loop.size,
                "batches": 0 if loop is None else loop.batches - self._batches_at_assign,
                "served": 0 if loop is None else loop.served - self._served_at_assign,
                "expired": 0 if loop is None else loop.expired,
                "reclaimed": 0 if self.feed is None else self.feed.reclaimed,
                "dead_lettered": 0 if self.feed is None else self.feed.dead_lettered,
                "latency": None if latency is None else {"source": latency.source, "ratio": latency.ratio,
                                                          "samples": latency.samples}}

    async def _heartbeat(self, registry: Registry) -> None:
        while not self._stop.is_set():
            self._beat_now.clear()
            with contextlib.suppress(*TRANSIENT, GraftError):
                await registry.beat(self.name, self.status())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), self._heartbeat_s)


# ------------------------------------------------------------------------------------------ process


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.worker.replica", description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True, help="registry name (the agent's name and a process index)")
    p.add_argument("--device", default="cpu0", help="gpuN, cpuN, NODE/gpuN or NODE/cpuN, as the plan names it")
    p.add_argument("--model", required=True)
    p.add_argument("--share", type=int, default=1, help="GPU percent (fixed) or CPU threads (initial)")
    p.add_argument("--metrics-port", type=int, default=0)
    return p.parse_args(argv)


async def _serve(replica: Replica) -> int:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, replica.stop)
    control = messages(await stdin_reader()) if not sys.stdin.isatty() else None
    code = await replica.run(control)
    if replica.load_abandoned:
        # Stopped while loading: nothing was read, nothing is held. A normal exit would wait for the
        # loading thread (the interpreter joins it), seconds to minutes for a large model.
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    die_with_parent()
    args = parse_args(argv)
    settings = Settings.from_env()
    configure(settings.log_format, settings.log_level)
    try:
        Device.parse(args.device)
    except DeviceError as exc:
        log.error("replica_config_error", error=str(exc))
        return EXIT_CONFIG
    replica = Replica(settings, name=args.name, device=args.device, model=args.model, share=args.share,
                      metrics_port=args.metrics_port)
    try:
        return run_loop(_serve(replica))
    except Exception:
        log.exception("replica_crashed", replica=args.name)
        return EXIT_CRASH


if __name__ == "__main__":
    sys.exit(main())
