"""Admission: whether a new request may join the controller's waiting queue.

Lifecycle: called once per arriving request, before it is journaled; a
refusal becomes an "overloaded" error for the client (RESOURCE_EXHAUSTED /
HTTP 429) and changes nothing else.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from cluster.policies.types import AdmissionDecision, RequestView

_ACCEPTED = AdmissionDecision(True)  # frozen: one serves every admitted request


class AdmissionPolicy(ABC):
    @abstractmethod
    def admit(self, queue_depth: int, request: RequestView) -> AdmissionDecision: ...


class BoundedQueue(AdmissionPolicy):
    def __init__(self, max_waiting: int):
        if max_waiting <= 0:
            raise ValueError(f"max_waiting={max_waiting} must be > 0")
        self.max_waiting = max_waiting

    def admit(self, queue_depth: int, request: RequestView) -> AdmissionDecision:
        if queue_depth >= self.max_waiting:
            return AdmissionDecision(
                False, f"overloaded: {queue_depth} requests waiting (limit {self.max_waiting})")
        return _ACCEPTED
