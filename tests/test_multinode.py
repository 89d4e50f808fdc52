"""Two nodes on one machine: `torchrun --nnodes 2 --nproc-per-node 1`, where LOCAL_RANK is 0 on both ranks.

On one node LOCAL_RANK == RANK, so a rank that splits its data or seeds its randomness by the local
rank looks right there and is wrong on a cluster: both nodes read the same shards and draw the same
masks. Each rank here records what it read and the masks it drew, and the test checks that every shard
is read by exactly one rank in every epoch, that the ranks' masks differ, and that each rank's shard
order is shuffled afresh every epoch. `tokenize` is launched the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_train import make_token_dataset
from test_train_distributed import _free_port

from meissonic_cli.data.shards import list_token_shards, read_token_shard

SHARDS, PER_SHARD = 4, 3

# Runs as one torchrun worker: trains a few steps and reports, per batch, the captions it read (they
# name their sample, hence their shard) and a digest of the mask it drew, plus its rank variables.
WORKER = textwrap.dedent(
    """
    import hashlib, json, os, sys
    import torch
    torch.set_num_threads(1)
    import meissonic_cli.train.trainer as trainer_module
    from meissonic_cli.train.trainer import Trainer, init_distributed
    from meissonic_cli.train.config import load_train_config

    cfg = load_train_config(None, json.loads(sys.argv[1]))
    env = init_distributed("cpu")
    masks, captions = [], []
    real_mask_tokens = trainer_module.mask_tokens
    def recording_mask_tokens(codes, rates, mask_id, generator):
        inputs, labels = real_mask_tokens(codes, rates, mask_id, generator)
        masks.append(hashlib.sha256((inputs == mask_id).numpy().tobytes()).hexdigest())
        return inputs, labels
    trainer_module.mask_tokens = recording_mask_tokens
    trainer = Trainer(cfg, env)
    real_next_batch = trainer.next_batch
    def recording_next_batch():
        batch = real_next_batch()
        captions.extend(batch.captions)
        return batch
    trainer.next_batch = recording_next_batch
    trainer.fit()
    out = {"rank": env.rank, "local_rank": int(os.environ["LOCAL_RANK"]), "world": env.world_size,
           "captions": captions, "masks": masks}
    with open(os.path.join(sys.argv[2], f"rank{env.rank}.json"), "w") as f:
        json.dump(out, f)
    env.close()
    """
)


def torchrun_two_nodes(args: list[str], cwd: Path, timeout: float = 300) -> list[str]:
    """Run `torchrun --nnodes 2 --nproc-per-node 1 ARGS` as two node agents on 127.0.0.1; returns their outputs."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                          "--node-rank", str(node), "--master-addr", "127.0.0.1", "--master-port", str(port), *args],
                         cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-3000:] for o in outputs)
    return outputs


def _shard_of(caption: str) -> int:
    return int(caption.rsplit(" ", 1)[1]) // PER_SHARD  # make_token_dataset: "a picture number {k}"


@pytest.fixture(scope="module")
def two_node_run(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("multinode")
    data = make_token_dataset(tmp / "data", shards=SHARDS, per_shard=PER_SHARD)
    (tmp / "report").mkdir()
    (tmp / "worker.py").write_text(WORKER)
    # 2 shards x 3 samples per rank and epoch, batch 3: two steps an epoch, three epochs.
    overrides = dict(data=str(data), output=str(tmp / "run"), model="tiny", resolution=64, batch_size=3, grad_accum=1,
                     max_steps=6, checkpoint_every=6, keep_last=0, cond_dropout=0.0, lr=1e-3, device="cpu",
                     shuffle=True)
    torchrun_two_nodes([str(tmp / "worker.py"), json.dumps(overrides), str(tmp / "report")], cwd=tmp)
    return [json.loads((tmp / "report" / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_two_nodes_have_local_rank_zero_on_both_ranks(two_node_run):
    # The launch really is two nodes: if it were one node, the checks below could pass by the local rank.
    assert [(r["rank"], r["local_rank"], r["world"]) for r in two_node_run] == [(0, 0, 2), (1, 0, 2)]


def test_each_shard_is_read_by_exactly_one_rank_in_every_epoch(two_node_run):
    per_epoch = SHARDS // 2 * PER_SHARD  # samples one rank reads in one epoch
    epochs = len(two_node_run[0]["captions"]) // per_epoch
    assert epochs == 3
    for e in range(epochs):
        read = [[_shard_of(c) for c in r["captions"][e * per_epoch:(e + 1) * per_epoch]] for r in two_node_run]
        shards = [set(x) for x in read]
        assert shards[0].isdisjoint(shards[1]), f"epoch {e}: both ranks read shards {shards[0] & shards[1]}"
        assert shards[0] | shards[1] == set(range(SHARDS)), f"epoch {e}: shards read {shards}"
        # ... and every sample of a rank's shards exactly once.
        for r in two_node_run:
            samples = r["captions"][e * per_epoch:(e + 1) * per_epoch]
            assert len(set(samples)) == per_epoch


def test_ranks_draw_different_masks(two_node_run):
    m0, m1 = (r["masks"] for r in two_node_run)
    assert len(m0) == len(m1) == 6
    assert all(a != b for a, b in zip(m0, m1)), "the two ranks drew the same masks at some step"
    assert len(set(m0)) == len(m0), "a rank drew the same mask twice"


def test_train_shuffles_afresh_every_epoch(two_node_run):
    """`--shuffle` promises a new order every epoch: no epoch repeats the previous one's sample order."""
    per_epoch = SHARDS // 2 * PER_SHARD
    for r in two_node_run:
        epochs = [r["captions"][e * per_epoch:(e + 1) * per_epoch] for e in range(3)]
        assert all(sorted(a) == sorted(epochs[0]) for a in epochs)  # the same samples ...
        assert len({tuple(a) for a in epochs}) == 3, f"rank {r['rank']} repeated an epoch's order: {epochs}"


@pytest.mark.slow
def test_tokenize_under_two_node_torchrun_splits_input_shards_by_global_rank(tmp_path):
    from test_tokenize import _img2dataset_tar

    from meissonic_cli.model.text_encoder import TextEncoder
    from meissonic_cli.model.vq.vqgan import VQTokenizer

    model = tmp_path / "model"
    VQTokenizer.tiny(seed=0).save_pretrained(model / "vqvae")
    TextEncoder.tiny(seed=0).save_pretrained(model / "text_encoder")
    shards = tmp_path / "shards"
    shards.mkdir()
    counts = {0: 3, 10: 2, 20: 1, 30: 2}
    for index, (start, n) in enumerate(counts.items()):
        _img2dataset_tar(shards / f"{index:05d}.tar", start, n)
    out = tmp_path / "tokens"
    outputs = torchrun_two_nodes(["-m", "meissonic_cli", "tokenize", str(shards), "--out", str(out), "--model",
                                  str(model), "--resolution", "32", "--text-features", "none", "--device", "cpu"],
                                 cwd=tmp_path)
    written = list_token_shards(out)
    assert [p.name for p in written] == [f"tokens-{i:05d}.tar" for i in range(4)], outputs
    keys = [s.key for p in written for s in read_token_shard(p)]
    expected = [f"{start + i:09d}" for start, n in counts.items() for i in range(n)]
    assert sorted(keys) == sorted(expected)  # every image once: no shard twice, none missing
