"""The caching app's commands: ``testbed catalogue build|check`` and ``testbed cache-run``.

``cache-run --replay`` runs here (:mod:`testbed.apps.caching.replay`); without ``--replay`` the run is
emulated (real blocks over the emulated links) by ``testbed.apps.caching.emulated.run(args) -> int``,
which takes the same parsed arguments and prints the same fields (``replay.Metrics`` with
``mode="emulated"``); until that module exists the command says so (exit 1).
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

from testbed.spec.errors import TestbedError


def _print(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(result, indent=1))
        return
    for k, v in result.items():
        if k != "per_model":
            print(f"{k:24s} {v}")
    for m in result.get("per_model", []):
        extra = " ".join(f"{k}={m[k]}" for k in ("rank", "target_modules", "shared_layers") if k in m)
        tag = " generated" if m["generated"] else ""
        print(f"  {m['name']:24s} {m['kind']:8s} {m['bytes'] / 1e6:10.3f} MB  own "
              f"{m['own_bytes'] / 1e6:9.3f} MB{tag} {extra}")


def catalogue(args: argparse.Namespace) -> int:
    from testbed.apps.caching.catalogue import build_catalogue, load_catalogue

    if args.action == "build":
        cat = build_catalogue(args.out, args.adapters, args.partial, base=args.base, seed=args.seed,
                              shared_layers=args.shared_layers)
    else:
        cat = load_catalogue(args.dir, verify=args.verify)
    _print({"catalogue": str(cat.root), **cat.summary()}, args.json)
    return 0


def cache_run(args: argparse.Namespace) -> int:
    if not args.replay:
        try:
            emulated = importlib.import_module("testbed.apps.caching.emulated")
        except ModuleNotFoundError as e:
            if e.name != "testbed.apps.caching.emulated":
                raise
            raise TestbedError("emulated mode is not part of this build; add --replay") from None
        return int(emulated.run(args) or 0)
    from testbed.apps.caching.analytic import cache_network
    from testbed.apps.caching.catalogue import load_catalogue
    from testbed.apps.caching.replay import run_replay
    from testbed.spec.topology import load_topology

    net = cache_network(load_topology(args.topo))
    cat = load_catalogue(args.catalogue)
    result = run_replay(cat, net, args.policy, int(args.capacity_mb * 1e6), zipf=args.zipf,
                        requests=args.requests, mobility=args.mobility, seed=args.seed, window=args.window)
    _print(result, args.json)
    return 0
