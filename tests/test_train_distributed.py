"""Two CPU processes on the gloo backend, set up as torchrun sets up its workers: DDP and FSDP training."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train import make_token_dataset

# Each rank trains, then reports a digest of its own final weights; only rank 0 writes the run.
WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    torch.set_num_threads(1)
    from meissonic_cli.train.trainer import Trainer, init_distributed
    from meissonic_cli.train.config import load_train_config

    cfg = load_train_config(None, json.loads(sys.argv[1]))
    env = init_distributed("cpu")
    trainer = Trainer(cfg, env)
    result = trainer.fit()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    state = get_model_state_dict(trainer.module, options=StateDictOptions(full_state_dict=True))
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode()); h.update(state[k].detach().float().contiguous().numpy().tobytes())
    local = {k: hashlib.sha256(v.detach().float().contiguous().numpy().tobytes()).hexdigest()
             for k, v in trainer.module.state_dict().items() if not hasattr(v, "full_tensor")}
    out = {"rank": env.rank, "digest": h.hexdigest(), "losses": result.losses, "cursor": trainer.stream.cursor.to_dict(),
           "shards": [p.name for p in trainer.stream.shards]}
    with open(os.path.join(sys.argv[2], f"rank{env.rank}.json"), "w") as f:
        json.dump(out, f)
    env.close()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tmp_path: Path, overrides: dict, name: str) -> list[dict]:
    """Start two ranks with the environment torchrun gives its workers (without torchrun's agent process)."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    report = tmp_path / name
    report.mkdir()
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(overrides), str(report)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    return [json.loads((report / f"rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.parametrize("mode", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_gloo_processes_end_with_identical_weights(tmp_path, mode):
    data = make_token_dataset(tmp_path / "data", shards=4, per_shard=3)
    run = tmp_path / "run"
    overrides = dict(data=str(data), output=str(run), model="tiny", resolution=64, batch_size=2, grad_accum=2,
                     max_steps=3, checkpoint_every=2, keep_last=0, cond_dropout=0.0, lr=3e-3, device="cpu",
                     ema_decay=0.9, fsdp=mode == "fsdp")
    r0, r1 = _launch(tmp_path, overrides, "first")
    # Each rank read its own shards ...
    assert set(r0["shards"]).isdisjoint(r1["shards"]) and len(r0["shards"]) == len(r1["shards"]) == 2
    # ... yet gradients were averaged, so the replicas (or shards) hold the same model.
    assert r0["digest"] == r1["digest"]
    assert r0["losses"] == r1["losses"]  # the logged loss is the mean over ranks
    # Only rank 0 wrote the run directory, with both ranks' data cursors in each checkpoint.
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000002", "step-00000003"]
    cursors = json.loads((run / "step-00000003" / "data_cursor.json").read_text())
    assert cursors["world_size"] == 2
    assert [c["offset"] for c in cursors["ranks"]] == [r0["cursor"]["offset"], r1["cursor"]["offset"]]
    assert cursors["ranks"][0]["shard"] in r0["shards"] and cursors["ranks"][1]["shard"] in r1["shards"]
    assert (run / "step-00000003" / "rng" / "rank-00001.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3

    if mode == "ddp":
        return  # the single-process tests cover resuming an unsharded model
    # Continuing from step 2 in a new run directory redoes step 3 exactly (sharded weights, optimizer, EMA, data, RNG).
    again = dict(overrides, output=str(tmp_path / "again"), resume=str(run / "step-00000002"))
    a0, a1 = _launch(tmp_path, again, "again")
    assert a0["losses"] == {"3": r0["losses"]["3"]}
    assert a0["digest"] == a1["digest"] == r0["digest"]
