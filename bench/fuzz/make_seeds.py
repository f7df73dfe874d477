"""Write the seed corpus of every fuzz target into ``tests/`` (small valid and near-valid inputs).

``python bench/fuzz/make_seeds.py``: rewrites the ``seed-*`` files; crash reproducers (``crash-*``)
are kept as they are.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path[:0] = [str(REPO), str(HERE)]

import torch  # noqa: E402
from targets import pack_frames  # noqa: E402

from testbed.apps.inference.activations import hidden_message  # noqa: E402
from testbed.wire import message as m  # noqa: E402

TOPOLOGIES = {
    "two-node": "nodes: {phone: {role: device}, mec: {role: edge}}\nlinks:\n  - between: [phone, mec]\n"
                "    up: {bw_mbit: 10, delay_ms: 20, jitter_ms: 2, loss_pct: 0.5, queue_pkts: 100}\n"
                "    down: {bw_mbit: 50, delay_ms: 20}\n",
    "curve": "name: sec\nsecurity: curve\ntcp_cc: bbr\n"
             "nodes:\n  phone: {role: device, cpu: 0.5, memory_mb: 512}\n"
             "  mec: {role: edge, runtime: process}\nlinks: [{between: [phone, mec]}]\n",
    "cell": "nodes:\n  a: {role: device}\n  b: {role: device}\n  c1: {role: cell}\n  e: {role: edge}\n"
            "links:\n  - {between: [a, c1]}\n  - {between: [b, c1], up: {bw_mbit: 1e3}}\n"
            "  - {between: [c1, e]}\n",
    "traces": "nodes: {d: {role: device}, e: {role: edge}}\nlinks:\n  - between: [d, e]\n"
              "    up: {trace: tr.csv, delay_ms: 5}\n    down: {trace: tr.mm, format: mahimahi}\n",
    "anchors": "nodes: {d: {role: device}, e: {role: edge}}\n"
               "links: [{between: [d, e], up: &l {bw_mbit: 5}, down: {<<: *l, delay_ms: 1}}]\n",
}
SUITES = {
    "quick": "name: quick\ntopology: t.yaml\nmodel: tiny\nworkload: {prompts: p.yaml, max_new_tokens: 8}\n"
             "baselines: [on-device, edge-offload, cloud-offload]\n"
             "placements: {split: 'phone=0:{cut},mec={cut}:{layers}'}\n"
             "params: {prompt: a, cut: 4, codec: fp32, quant: none, kv_cache: true}\n"
             "sweep: {mode: cartesian, uplink_mbit: [2, 20]}\nrepeats: 1\nshaper: auto\n"
             "analytic: {band: [0.5, 2.0]}\n",
    "links": "topology: t.yaml\nmodel: tiny\nroles: {device: phone, edge: mec, cloud: cloud}\n"
             "workload: {prompts: p.yaml, devices: 1}\nbaselines: [edge-offload]\n"
             "params: {links.phone-mec.up.delay_ms: 3, nodes.mec.cpu: 0.5, trace: tr.csv}\n"
             "sweep: {mode: zip, loss_pct: [0, 1], codec: [int8, bf16]}\n"
             "energy: {compute_w: 2, idle_w: 0.1, tx_nj_per_bit: 90, rx_nj_per_bit: 40}\n",
}
TRACES = {
    "mahimahi": b"\x00" + b"1\n2\n2\n3\n10\n",
    "mahimahi-crlf": b"\x00" + b"0\r\n5\r\n5\r\n\r\n12\r\n",
    "csv": b"\x01" + b"time_s,bw_mbit,delay_ms,loss_pct\n0,10,5,0\n1.5,0\n2,100,,1 # comment\n",
    "csv-one-row": b"\x01" + b"0,12\n",
}


def wire_seeds() -> dict[str, list]:
    x = torch.randn(1, 3, 8)
    return {
        "tokens": m.forward_tokens(7, 0, 0, torch.tensor([[1, 2, 3]]), True).frames(),
        **{f"hidden-{c}": hidden_message(7, 1, 3, x, c, True).frames()
           for c in ("fp32", "fp16", "bf16", "int8")},
        "result-hops": m.result(7, 2, 42, [m.Hop(1.5, 0.1, 2.0, 0.4, 100, 20), m.Hop()]).frames(),
        "error": m.error(7, 2, "layers 1:2: no such thing").frames(),
        "ping": m.control(m.Kind.PING).frames(),
        "close": m.control(m.Kind.CLOSE, 7).frames(),
        "pong": m.pong([1, 2, 3, 4]).frames(),
    }


def main() -> None:
    out = {"tests/wire/fuzz_corpus": {k: pack_frames([bytes(f) for f in v]) for k, v in wire_seeds().items()},
           "tests/spec/fuzz_corpus/topology": {k: v.encode() for k, v in TOPOLOGIES.items()},
           "tests/spec/fuzz_corpus/suite": {k: v.encode() for k, v in SUITES.items()},
           "tests/spec/fuzz_corpus/trace": TRACES}
    for folder, files in out.items():
        d = REPO / folder
        d.mkdir(parents=True, exist_ok=True)
        for old in d.glob("seed-*"):
            old.unlink()
        for name, data in files.items():
            (d / f"seed-{name}").write_bytes(data)
        print(f"{folder}: {len(files)} seeds")


if __name__ == "__main__":
    main()
