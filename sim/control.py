"""The serving path outside engine steps and KV bytes: fixed delays of the
controller's RPCs, measured on a real cluster.

Lifecycle: a ``ControlPlane`` rides in the ``SimSpec`` (zero delays by
default: an ideal control plane); ``baton sim calibrate --target cluster``
(sim.cluster_probe) measures one for the local cluster and stores it with
the link it measured under ``"clusters"`` in ``sim/data/profiles.json``;
``cluster_options(name)`` reads it back as ``SimSpec`` fields.

Where each delay sits in a disaggregated request (cluster/controller.py)::

    dispatch   router decision -> journal, decode.reserve, prefill RPC
               -> the prefill worker holds the prompt             (dispatch_s)
    prefill    engine steps (sim.latency); KV streams per layer (sim.transfer)
    result     KV verified at the decode worker -> first token at the
               controller (the prefill RPC returns)               (result_s)
    admit      -> decode.admit RPC -> the decode worker holds it  (admit_s)

On a machine shared with other processes (the local CPU cluster), steps
are slowed at random: the calibration keeps the measured / modelled time of
its prefill steps, and the simulation draws one per prefill step
(``SimSpec.prefill_step_noise``).

Baton's controller delivers a request's first token with the prefill
result, i.e. only once its KV is verified at the decode worker
(``first_token_waits_for_kv``); the published disaggregated systems the
reproductions follow stream it as soon as it is sampled (the default).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from sim.latency import PROFILES_PATH


@dataclass(frozen=True)
class ControlPlane:
    dispatch_s: float = 0.0  # router decision -> the prefill (or mixed) worker holds the prompt
    result_s: float = 0.0  # KV verified at the decode worker -> first token at the controller
    admit_s: float = 0.0  # first token at the controller -> the decode worker holds the request
    first_token_waits_for_kv: bool = False  # first token delivered once the KV has landed

    def __post_init__(self) -> None:
        for f in ("dispatch_s", "result_s", "admit_s"):
            if getattr(self, f) < 0:
                raise ValueError(f"{f}={getattr(self, f)} must be >= 0")


def save_cluster(name: str, options: dict, report: dict, path: Path = PROFILES_PATH) -> None:
    """``options``: the ``SimSpec`` fields ``cluster_options`` gives back."""
    data = json.loads(path.read_text()) if path.exists() else {"profiles": {}, "reports": {}}
    data.setdefault("clusters", {})[name] = {
        **asdict(options["control"]), "link_bandwidth": options["link_bandwidth"],
        "link_latency_s": options["link_latency_s"],
        "prefill_step_noise": list(options["prefill_step_noise"]), "report": report}
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def cluster_options(name: str, path: Path = PROFILES_PATH) -> dict:
    """``SimSpec`` fields (control, link, prefill step noise) of a measured cluster."""
    data = json.loads(path.read_text()).get("clusters", {})
    if name not in data:
        raise ValueError(f"no measured cluster {name!r} in {path}; have: {', '.join(data) or 'none'} "
                         "(run `baton sim calibrate --target cluster`)")
    c = data[name]
    control = ControlPlane(**{f.name: c[f.name] for f in fields(ControlPlane)})
    return {"control": control, "link_bandwidth": c["link_bandwidth"],
            "link_latency_s": c["link_latency_s"],
            "prefill_step_noise": tuple(c.get("prefill_step_noise", ()))}
