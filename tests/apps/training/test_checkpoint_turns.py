"""``sl`` with two devices taking turns: checkpoints cover every step (whose turn it is, each device's
adapters and AdamW state, the adapters handed on), and a resumed run ends with exactly the weights,
optimizer states and losses of an uninterrupted one (fp32).

The programs are the real ones (the settings ``run.programs`` builds, ``client_node`` and the stage
server) in threads of this process, so that no program start-up is paid; the SIGKILL of a whole run
and its orphaned programs is ``test_checkpoint.py``'s.  Here the files are cut back to the moment of
a kill that the write-ahead makes the hard case: the device whose turn just ended has written ahead
over the other's coming turn, the server and the other device have not."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from testbed.apps.training import checkpoint
from testbed.apps.training import wire as tw
from testbed.apps.training.placement import parse_placement
from testbed.apps.training.programs import client_node
from testbed.apps.training.run import TrainOptions, free_ports, prepare_checkpoints, programs
from testbed.apps.training.server import StageServer
from testbed.apps.training.stage import TrainStage
from testbed.spec.errors import SpecError

REPO = Path(__file__).resolve().parents[3]
TEXT = str(REPO / "testbed" / "model" / "data" / "eval_text.txt")
NAMES = ["client0", "client1", "stage1"]
STEPS = 10


def _opt() -> TrainOptions:
    return TrainOptions(steps=STEPS, batch=2, seq=8, lr=2e-2, seed=1, evaluate=False, checkpoint_every=2,
                        clients=["dev1", "dev2"], data=[TEXT, TEXT])


def _run(model: Path, out: Path, resume: bool) -> int:
    """One run of the programs in threads; the step it resumed from."""
    opt = _opt()
    stages = parse_placement("dev1=0:2,mec=2:4", None, 4)
    step = prepare_checkpoints(out / "checkpoints", opt, stages, model, resume, local=False)
    addrs = ["", f"tcp://127.0.0.1:{free_ports(1)[0]}"]
    (server,), clients = programs(stages, addrs, lambda node: None, model, opt, out / "adapters",
                                  checkpoint_dir=out / "checkpoints", resume_step=step)
    s = server.settings
    srv = StageServer(TrainStage(s.model, s.start, s.end, opt.spec(), s.seed, None), s)
    serving = threading.Thread(target=srv.serve, daemon=True)
    serving.start()
    codes: dict[int, int] = {}
    devices = [threading.Thread(target=lambda c=c, p=p: codes.__setitem__(c, client_node(p.settings)))
               for c, p in enumerate(clients)]
    try:
        for t in devices:
            t.start()
        for t in devices:
            t.join(120)
    finally:
        srv.running = False
        serving.join(5)
        srv.close()
    assert codes == {0: 0, 1: 0}
    return step


def test_devices_taking_turns_resume_with_the_same_state(tiny4: Path, tmp_path: Path) -> None:
    whole = tmp_path / "whole"
    assert _run(tiny4, whole, resume=False) == 0
    saved = checkpoint.saved_steps(whole / "checkpoints")
    # devices keep KEEP + C/K files (each writes up to its next turn at once), the server KEEP
    assert saved == {"client0": [4, 6, 8, 10], "client1": [4, 6, 8, 10], "stage1": [6, 8, 10]}, saved

    # killed during step 7 (client1's turn): client0 wrote step 8 after its turn 6, the others reached 6
    cut = tmp_path / "cut"
    shutil.copytree(whole / "checkpoints", cut / "checkpoints")
    for name, last in (("client0", 8), ("client1", 6), ("stage1", 6)):
        for step in saved[name]:
            if step > last:
                checkpoint.path(cut / "checkpoints", name, step).unlink()
    # step 6 is client0's turn, from the adapters client1 hands on again
    assert _run(tiny4, cut, resume=True) == 6

    for name in NAMES:  # every program's final adapters and AdamW state, bit for bit
        a = checkpoint.load(cut / "checkpoints", name, STEPS)
        b = checkpoint.load(whole / "checkpoints", name, STEPS)
        assert torch.equal(a["adapters"], b["adapters"]), name
        for (i, x), (j, y) in zip(a["opt"]["state"].items(), b["opt"]["state"].items(), strict=True):
            assert i == j and all(torch.equal(x[k], y[k]) for k in x), name
    losses = [checkpoint.load(d / "checkpoints", "stage1", STEPS)["rows"][:, tw.F["loss"]]
              for d in (cut, whole)]
    assert len(losses[0]) == STEPS and torch.equal(*losses)
    server = {}
    for dev in ("dev1", "dev2"):  # the saved adapters: the device's own (its last turn's), the server's final
        a = load_file(str(cut / "adapters" / dev / "adapter_model.safetensors"))
        b = load_file(str(whole / "adapters" / dev / "adapter_model.safetensors"))
        assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a), dev
        own = [k for k in a if k.split(".")[4] in ("0", "1")]
        assert max(float(a[k].abs().max()) for k in own if "lora_B" in k) > 1e-3  # really trained
        server[dev] = {k: v for k, v in a.items() if k not in own}
    assert all(torch.equal(v, server["dev2"][k]) for k, v in server["dev1"].items())

    with pytest.raises(SpecError, match="several devices in one process"):
        prepare_checkpoints(tmp_path / "local", _opt(), parse_placement("dev1=0:2,mec=2:4", None, 4), tiny4,
                            False, local=True)
