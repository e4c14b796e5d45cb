"""KV transfer from prefill to decode workers over shared links.

Lifecycle of one transfer::

    planned   the prefill step that completes a prompt is planned: its KV
              streams layer by layer while that step runs, so the flow is
              registered to start at the latest time it could start and
              still send every layer right after it is computed
    active    it shares its sender's and its receiver's NIC with the other
              active flows (processor sharing: a flow's rate is the smaller
              of its two fair shares); each start or end re-rates the flows
              on those NICs
    done      last byte sent + the link latency: the decode worker admits
              the request, the prefill worker frees its blocks

Timing of the overlap, for a prompt whose last prefill step runs [t0, t1]
over L layers with s bytes per layer on an uncontended link of bandwidth B:
layer l is ready at t0 + (l+1)(t1-t0)/L; sending back to back from
``start = max(t0 + (t1-t0)/L, t1 - (L-1) s / B)`` never waits for a layer,
and the last layer leaves at ``max(t1 + s/B, start + L s / B)``, as in
layer-wise KV streaming (Splitwise, ISCA 2024; DistServe, OSDI 2024).
"""

from __future__ import annotations

from collections.abc import Callable

from sim.events import LANDED, Clock, EventQueue


class Link:
    """One NIC direction: a sender's egress or a receiver's ingress."""

    def __init__(self, name: str, bandwidth: float):
        if bandwidth <= 0:
            raise ValueError(f"link {name}: bandwidth {bandwidth} must be > 0")
        self.name = name
        self.bandwidth = bandwidth  # bytes/s
        self.flows: set[Flow] = set()
        self.bytes_sent = 0.0


class Flow:
    __slots__ = ("serial", "src", "dst", "remaining", "rate", "updated_s", "version", "on_done",
                 "nbytes")

    def __init__(self, serial: int, src: Link, dst: Link, nbytes: float,
                 on_done: Callable[[], None]):
        self.serial = serial  # creation order: the deterministic tie-break between flows
        self.src, self.dst = src, dst
        self.nbytes = nbytes
        self.remaining = nbytes  # bytes not yet sent
        self.rate = 0.0  # bytes/s now
        self.updated_s = 0.0  # when ``remaining`` was last brought up to date
        self.version = 0
        self.on_done = on_done


class TransferNetwork:
    def __init__(self, events: EventQueue, clock: Clock, latency_s: float):
        if latency_s < 0:
            raise ValueError(f"link latency {latency_s} must be >= 0")
        self.events, self.clock, self.latency_s = events, clock, latency_s
        self.transfers = 0
        self.total_bytes = 0.0

    def plan(self, src: Link, dst: Link, nbytes: float, layers: int, t0: float, t1: float,
             on_done: Callable[[], None]) -> None:
        """A prompt's KV (``nbytes`` over ``layers``), computed in the step [t0, t1]."""
        bw = min(src.bandwidth, dst.bandwidth)
        per_layer = nbytes / layers
        start = max(t0 + (t1 - t0) / layers, t1 - (layers - 1) * per_layer / bw)
        self.transfers += 1
        flow = Flow(self.transfers, src, dst, nbytes, on_done)
        self.total_bytes += nbytes
        self.events.push(start, LANDED, self._begin, flow)

    def _begin(self, flow: Flow) -> None:
        now = self.clock.now
        flow.updated_s = now
        affected = flow.src.flows | flow.dst.flows
        flow.src.flows.add(flow)
        flow.dst.flows.add(flow)
        self._rerate(affected | {flow}, now)

    def _rerate(self, flows: set[Flow], now: float) -> None:
        for f in sorted(flows, key=_serial):
            f.remaining -= f.rate * (now - f.updated_s)
            f.updated_s = now
            f.rate = min(f.src.bandwidth / len(f.src.flows), f.dst.bandwidth / len(f.dst.flows))
            f.version += 1
            done = now + max(f.remaining, 0.0) / f.rate
            self.events.push(done, LANDED, self._end, (f, f.version))

    def _end(self, arg: tuple[Flow, int]) -> None:
        flow, version = arg
        if version != flow.version:
            return
        now = self.clock.now
        flow.src.flows.discard(flow)
        flow.dst.flows.discard(flow)
        flow.src.bytes_sent += flow.nbytes
        flow.remaining = 0.0
        flow.version += 1
        self._rerate(flow.src.flows | flow.dst.flows, now)
        self.events.push(now + self.latency_s, LANDED, _call, flow.on_done)


def _serial(flow: Flow) -> int:
    """Sets iterate by memory address: sort flows to keep runs identical."""
    return flow.serial


def _call(fn: Callable[[], None]) -> None:
    fn()
