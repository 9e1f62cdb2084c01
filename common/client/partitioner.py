"""Neurosurgeon-style cut choice for one device: where to split the model, and the server's budget.

For every valid cut ``c`` (0..N-1) the device spends ``t_device(c)`` on blocks ``0..c-1``, uploads
``upload_bytes(c)``, the server runs ``c..N-1`` and the reply comes back. The server's budget is
``T = SLO − t_device − t_upload − t_reply`` (design.md section 1). A cut is feasible only when
``T ≥ server_factor · server_ms(c)``: with the default factor 2 that is exactly the planner's latency
rule ``2·L(B, g) ≤ T`` (section 4) at its most generous point (batch 1, the full share), so a cut
this module picks is one the planner can serve; a cut it refuses could never be served in time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from common.client.phones import DeviceClass, device_profile
from common.profiles import ModelProfile

Mode = Literal["latency", "energy"]


@dataclass(frozen=True)
class CutChoice:
    cut: int
    device_ms: float
    upload_ms: float  # transfer plus half the round trip
    reply_ms: float  # transfer plus half the round trip
    server_ms_est: float
    budget_ms: float
    e2e_ms: float  # device + upload + server + reply
    feasible: bool
    device_flops: int = 0


def cut_options(model: ModelProfile, device: DeviceClass, bandwidth_bps: float, slo_ms: float, *,
                rtt_ms: float = 20.0, reply_bytes: int = 4096, downlink_bps: float | None = None,
                server_ms: Callable[[int], float] | None = None,
                upload_time_ms: Callable[[int], float] | None = None,
                server_factor: float = 2.0) -> list[CutChoice]:
    """Every valid cut with its times and budget, in cut order.

    ``downlink_bps`` defaults to the uplink bandwidth (a pessimistic reply time). ``upload_time_ms``
    maps bytes to transfer ms and replaces ``bytes / bandwidth`` (e.g. ``LinkTrace.upload_ms`` at the
    request's start time). ``server_ms(cut)`` defaults to the profile's suffix latency at batch 1 and
    the largest share.
    """
    if bandwidth_bps <= 0 and upload_time_ms is None:
        raise ValueError("bandwidth must be positive")
    if slo_ms <= 0:
        raise ValueError("the SLO must be positive")
    down = downlink_bps if downlink_bps is not None else bandwidth_bps
    if down <= 0:
        raise ValueError("downlink bandwidth must be positive")
    full_share = max(model.shares)
    server = server_ms or (lambda c: model.suffix_latency(c, 1, full_share))
    on_device = device_profile(model, device)
    reply_ms = reply_bytes * 8 / down * 1e3 + rtt_ms / 2
    out: list[CutChoice] = []
    device_ms = 0.0
    device_flops = 0
    for c in model.cuts:
        if c > 0:
            device_ms += on_device[c - 1]
            device_flops += model.blocks[c - 1].flops
        nbytes = model.upload_bytes(c)
        transfer = upload_time_ms(nbytes) if upload_time_ms is not None else nbytes * 8 / bandwidth_bps * 1e3
        upload_ms = transfer + rtt_ms / 2
        s_ms = float(server(c))
        budget = slo_ms - device_ms - upload_ms - reply_ms
        out.append(CutChoice(cut=c, device_ms=device_ms, upload_ms=upload_ms, reply_ms=reply_ms,
                             server_ms_est=s_ms, budget_ms=budget,
                             e2e_ms=device_ms + upload_ms + s_ms + reply_ms,
                             feasible=budget >= server_factor * s_ms, device_flops=device_flops))
    return out


def choose_cut(model: ModelProfile, device: DeviceClass, bandwidth_bps: float, slo_ms: float,
               mode: Mode = "latency", **kw: Any) -> CutChoice | None:
    """The best feasible cut, or ``None`` when no cut leaves the server enough budget.

    ``latency``: least end-to-end time. ``energy``: least on-device work (FLOPs, then device ms) among
    the feasible cuts; ties go to the faster end-to-end time. Remaining keywords go to ``cut_options``.
    """
    options = [o for o in cut_options(model, device, bandwidth_bps, slo_ms, **kw) if o.feasible]
    if not options:
        return None
    if mode == "latency":
        return min(options, key=lambda o: (o.e2e_ms, o.cut))
    if mode == "energy":
        return min(options, key=lambda o: (o.device_flops, o.device_ms, o.e2e_ms, o.cut))
    raise ValueError(f"unknown partitioning mode {mode!r} (latency or energy)")
