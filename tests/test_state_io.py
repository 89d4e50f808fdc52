"""state_io: one weight loader with one key policy; sharded indexes stay inside the model folder; no pickle runs."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from meissonic_cli.errors import ModelFormatError
from meissonic_cli.model.state_io import load_state_into, load_weights_into, read_torch_file, read_weights
from meissonic_cli.model.transformer import MeissonicTransformer, from_pretrained, meissonic_tiny


def _two_layers() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))


def test_strict_by_default_and_allow_lists_name_the_exceptions():
    source = _two_layers().state_dict()
    target = _two_layers()
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    missing = {k: v for k, v in source.items() if k != "1.bias"}
    with pytest.raises(ModelFormatError, match=r"1 missing key\(s\) \(e\.g\. 1\.bias\)"):
        load_state_into(target, missing, "src")
    extra = {**source, "2.weight": torch.zeros(1)}
    with pytest.raises(ModelFormatError, match=r"1 unexpected key\(s\) \(e\.g\. 2\.weight\)"):
        load_state_into(target, extra, "src")
    wrong = {**source, "0.weight": torch.zeros(4, 4)}
    with pytest.raises(ModelFormatError, match=r"shape mismatch.*0\.weight \(4, 4\) != \(4, 3\)"):
        load_state_into(target, wrong, "src")
    assert all(float(p.detach().abs().sum()) == 0 for p in target.parameters())  # nothing loaded by the failures

    load_state_into(target, missing, "src", allow_missing=["1.*"], assign=False)
    load_state_into(target, extra, "src", allow_unexpected=["2.*"], assign=False)
    assert torch.equal(target[0].weight, source["0.weight"]) and torch.equal(target[1].bias, source["1.bias"])


def _sharded_transformer(root):
    torch.manual_seed(0)
    tdir = MeissonicTransformer(meissonic_tiny()).save_pretrained(root / "transformer", max_shard_size="40KB")
    index = tdir / "diffusion_pytorch_model.safetensors.index.json"
    assert index.is_file()
    return tdir, index


@pytest.mark.parametrize("escape", ["parent", "absolute", "symlink"])
def test_a_sharded_index_cannot_name_files_outside_the_model_folder(tmp_path, escape):
    tdir, index = _sharded_transformer(tmp_path / "model")
    data = json.loads(index.read_text())
    victim_key, victim_file = next(iter(data["weight_map"].items()))
    # A real safetensors file outside the folder, so only the path check stands in the way.
    outside = tmp_path / "x.safetensors"
    save_file({victim_key: torch.zeros(1)}, str(outside))
    if escape == "parent":
        name = "../../x.safetensors"
    elif escape == "absolute":
        name = str(outside)
    else:
        os.symlink(outside, tdir / "link.safetensors")
        name = "link.safetensors"
    data["weight_map"][victim_key] = name
    index.write_text(json.dumps(data))
    with pytest.raises(ModelFormatError, match="outside the model folder|must be a file name inside"):
        from_pretrained(tmp_path / "model")
    with pytest.raises(ModelFormatError, match="outside the model folder|must be a file name inside"):
        read_weights(tdir, "diffusion_pytorch_model.safetensors", index.name)


def test_sharded_weights_load_through_the_one_routine(tmp_path):
    tdir, index = _sharded_transformer(tmp_path / "model")
    single = MeissonicTransformer(meissonic_tiny())
    load_weights_into(single, tdir, "diffusion_pytorch_model.safetensors", index.name)
    reference = from_pretrained(tmp_path / "model")
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in single.state_dict().items())


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "weights.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": _Payload(str(marker))}, f)
    torch.save({"state_dict": {"w": torch.zeros(1)}, "evil": _Payload(str(marker))}, tmp_path / "zipped.pt")
    assert not marker.exists()  # writing the payload does not run it; loading it would
    for file in (path, tmp_path / "zipped.pt"):
        with pytest.raises(ModelFormatError, match="refused without loading it") as err:
            read_torch_file(file)
        assert "weights_only" not in str(err.value)
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    assert torch.equal(read_torch_file(tmp_path / "plain.pt")["w"], torch.ones(2))
