"""Link traces in the mahimahi format: when the uplink can carry each 1500-byte packet.

A trace file holds one integer per line, a time in ms from the start; each line is one opportunity
to send one MTU-sized packet, and a repeated time means several packets fit in that millisecond. Like
mahimahi's ``mm-link`` the trace loops: its period is the last timestamp, and loop ``k`` offers the
same opportunities shifted by ``k`` periods. Everything here is arithmetic on the sorted opportunity
times, so an upload of any size from any start time costs one binary search.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

PACKET_BYTES = 1500


class TraceError(ValueError):
    """A trace file is malformed, or a trace is asked for something it cannot answer."""


@dataclass(frozen=True)
class LinkTrace:
    opportunities_ms: npt.NDArray[np.int64] = field(repr=False)  # sorted, one entry per packet
    period_ms: int
    name: str = "trace"
    packet_bytes: int = PACKET_BYTES

    def __post_init__(self) -> None:
        ts = self.opportunities_ms
        if ts.ndim != 1 or len(ts) == 0:
            raise TraceError(f"{self.name}: a trace needs at least one delivery opportunity")
        if ts[0] < 0 or np.any(np.diff(ts) < 0):
            raise TraceError(f"{self.name}: timestamps must be non-negative and non-decreasing")
        if self.period_ms <= 0 or ts[-1] > self.period_ms:
            raise TraceError(f"{self.name}: period {self.period_ms} ms must be positive and cover the trace")

    # ------------------------------------------------------------------------------ constructors

    @classmethod
    def from_mahimahi(cls, path: str | Path) -> LinkTrace:
        p = Path(path)
        try:
            lines = p.read_text().split()
        except OSError as exc:
            raise TraceError(f"cannot read trace {p}: {exc}") from None
        try:
            ts = np.array([int(x) for x in lines], dtype=np.int64)
        except ValueError:
            raise TraceError(f"{p}: every line of a mahimahi trace must be an integer (ms)") from None
        if len(ts) == 0:
            raise TraceError(f"{p}: the trace is empty")
        # mahimahi refuses a trace ending at 0 ms; a single "0" would otherwise have no period.
        return cls(ts, period_ms=max(int(ts[-1]), 1), name=p.name)

    @classmethod
    def constant(cls, mbps: float, seconds: float = 1.0, name: str = "constant") -> LinkTrace:
        return cls.synthetic(mbps, seconds, seed=0, variability=0.0, name=name)

    @classmethod
    def synthetic(cls, mean_mbps: float, seconds: float, seed: int = 0, variability: float = 0.3,
                  step_s: float = 0.5, name: str | None = None) -> LinkTrace:
        """A trace whose mean is ``mean_mbps`` exactly (up to one packet) and whose rate wanders.

        The rate is a log-normal AR(1) process, one value per ``step_s``, normalised to mean 1, so
        ``variability`` is roughly the coefficient of variation of the per-step bandwidth (0: constant).
        Packets are placed where the cumulative capacity crosses each multiple of 1500 bytes.
        """
        if mean_mbps <= 0 or seconds <= 0:
            raise TraceError("a synthetic trace needs a positive mean rate and duration")
        period_ms = max(1, round(seconds * 1000))
        n_steps = max(1, math.ceil(period_ms / (step_s * 1000)))
        rng = np.random.default_rng(seed)
        z = np.empty(n_steps)
        z[0] = rng.standard_normal()
        rho = 0.7  # consecutive steps are correlated, like a phone moving through cells
        for i in range(1, n_steps):
            z[i] = rho * z[i - 1] + math.sqrt(1 - rho * rho) * rng.standard_normal()
        sigma = math.sqrt(math.log1p(variability * variability))
        weights = np.exp(sigma * z)
        weights /= weights.mean()
        per_ms = np.repeat(weights, math.ceil(period_ms / n_steps))[:period_ms]
        per_ms *= period_ms / per_ms.sum()
        bytes_per_ms = mean_mbps * 1e6 / 8 / 1000
        cumulative = np.cumsum(per_ms * bytes_per_ms)  # capacity delivered by the end of ms i+1
        n_packets = max(1, int(cumulative[-1] // PACKET_BYTES))
        marks = np.arange(1, n_packets + 1) * PACKET_BYTES
        ts = np.minimum(np.searchsorted(cumulative, marks - 1e-6, side="left").astype(np.int64) + 1, period_ms)
        ts[-1] = period_ms  # as in a mahimahi file, the last opportunity marks the period
        return cls(ts, period_ms=period_ms,
                   name=name or f"synthetic-{mean_mbps:g}mbps-seed{seed}")

    def write_mahimahi(self, path: str | Path) -> None:
        Path(path).write_text("\n".join(str(int(t)) for t in self.opportunities_ms) + "\n")

    # ------------------------------------------------------------------------------ queries

    @property
    def duration_s(self) -> float:
        return self.period_ms / 1000.0

    @property
    def packets(self) -> int:
        return len(self.opportunities_ms)

    @property
    def mean_bps(self) -> float:
        return self.packets * self.packet_bytes * 8 / self.duration_s

    def _used(self, t_ms: float) -> int:
        """Opportunities at or before ``t_ms`` (looping), counted from time 0.

        A packet ready at ``t`` leaves at the first opportunity strictly after ``t``, so one packet on
        a one-packet-per-ms link always takes 1 ms, whatever the start time.
        """
        loops, pos = divmod(t_ms, self.period_ms)
        return int(loops) * self.packets + int(np.searchsorted(self.opportunities_ms, pos, side="right"))

    def bandwidth_bps(self, t_s: float, window_s: float = 1.0) -> float:
        """Capacity over ``(t_s, t_s + window_s]``: what an upload starting at ``t_s`` would see."""
        if window_s <= 0:
            raise TraceError("the bandwidth window must be positive")
        start = t_s * 1000.0
        n = self._used(start + window_s * 1000.0) - self._used(start)
        return n * self.packet_bytes * 8 / window_s

    def upload_ms(self, nbytes: int, start_s: float = 0.0) -> float:
        """Time to push ``nbytes`` through the link from ``start_s``: until the last packet's opportunity."""
        if nbytes < 0:
            raise TraceError("cannot upload a negative number of bytes")
        if nbytes == 0:
            return 0.0
        start = start_s * 1000.0
        needed = math.ceil(nbytes / self.packet_bytes)
        last = self._used(start) + needed - 1  # global index of the packet that completes it
        loops, idx = divmod(last, self.packets)
        return float(loops * self.period_ms + int(self.opportunities_ms[idx]) - start)

    def segments(self, window_s: float = 1.0) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
        """Bandwidth series over one period: (window start times in s, bits/s in each window)."""
        if window_s <= 0:
            raise TraceError("the segment window must be positive")
        edges = np.arange(0.0, self.period_ms, window_s * 1000.0)
        ends = np.minimum(edges + window_s * 1000.0, self.period_ms)
        counts = (np.searchsorted(self.opportunities_ms, ends, side="right")
                  - np.searchsorted(self.opportunities_ms, edges, side="right"))
        # An opportunity at 0 ms happens at the end of the previous loop: it belongs to the last window.
        counts[-1] += int(np.sum(self.opportunities_ms == 0))
        return edges / 1000.0, counts * self.packet_bytes * 8 / ((ends - edges) / 1000.0)


def shared_traces_dir() -> Path:
    """Where the workspace's real uplink traces live (they are never copied into the repository):
    ``$GRAFT_TRACES_DIR``, else ``../shared/traces`` beside the checkout, else ``/work/shared/traces``.
    Returns the first that exists (or the first candidate, for error messages)."""
    env = os.environ.get("GRAFT_TRACES_DIR")
    if env:
        return Path(env)
    candidates = [Path(__file__).resolve().parents[2] / "shared" / "traces", Path("/work/shared/traces")]
    return next((c for c in candidates if c.is_dir()), candidates[0])
