"""formats/state-v1.md: every MUST of the resume-state reader, each with the bad file built here."""

from __future__ import annotations

import json
import re

import pytest
import torch

from neuroada_tools.errors import TrainingError
from neuroada_tools.io.safetensors_file import write_file
from neuroada_tools.io.state import STATE_MAGIC, read_state, state_path, write_state

META = {"step": 3, "epoch": 0, "batch": 3, "total_steps": 10, "tokens": 120, "target_tokens": 40,
        "settings": {"lr": 1e-3}, "index_sha256": "a" * 64, "data_sha256": "b" * 64, "first_loss": 2.0,
        "last_loss": 1.5, "delta_sha256": "c" * 64}


def _good(path, meta=META):
    p = torch.nn.Parameter(torch.arange(6, dtype=torch.float32).view(2, 3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.ones_like(p)
    opt.step()
    write_state(path, [("layer.neuroada_delta", p)], opt, meta)
    _good.param, _good.exp_avg = p.detach().clone(), opt.state[p]["exp_avg"].clone()
    return path


def _write(path, tensors=None, **meta):
    tensors = {"rng.cpu": torch.get_rng_state()} if tensors is None else tensors
    md = {"neuroada.magic": STATE_MAGIC, "neuroada.version": "1", "neuroada.state": json.dumps(META)}
    md.update({k.replace("_", "."): v for k, v in meta.items()})
    md = {k: v for k, v in md.items() if v is not None}
    write_file(path, tensors, md)
    return path


def _raises(message: str):
    return pytest.raises(TrainingError, match="^" + re.escape(message) + "$")


def test_round_trip(tmp_path):
    st = read_state(_good(tmp_path / "x.state.safetensors"))
    assert st.meta == META
    assert sorted(st.tensors) == ["adam.exp_avg.layer.neuroada_delta", "adam.exp_avg_sq.layer.neuroada_delta",
                                  "adam.step.layer.neuroada_delta", "param.layer.neuroada_delta", "rng.cpu"]
    assert torch.equal(st.tensors["param.layer.neuroada_delta"], _good.param)
    assert torch.equal(st.tensors["adam.exp_avg.layer.neuroada_delta"], _good.exp_avg)
    assert torch.equal(st.tensors["rng.cpu"], torch.get_rng_state())


def test_state_path_names():
    assert state_path("out/boolq.delta.safetensors").name == "boolq.state.safetensors"
    assert state_path("out.safetensors").name == "out.state.safetensors"
    assert state_path("weird").name == "weird.state.safetensors"


def test_not_safetensors(tmp_path):
    p = tmp_path / "s.safetensors"
    p.write_bytes(b"\x00" * 3)
    with pytest.raises(TrainingError, match="^s.safetensors: "):
        read_state(p)


@pytest.mark.parametrize("cut", [7, 8, 40, -1])
def test_truncated(tmp_path, cut):
    good = _good(tmp_path / "g.safetensors").read_bytes()
    p = tmp_path / "t.safetensors"
    p.write_bytes(good[:cut])
    with pytest.raises(TrainingError, match="^t.safetensors: "):
        read_state(p)


def test_s4_wrong_or_missing_magic(tmp_path):
    with _raises("a.safetensors: not a train-sparse resume state (magic 'neuroada-delta')"):
        read_state(_write(tmp_path / "a.safetensors", neuroada_magic="neuroada-delta"))
    md = {"neuroada.version": "1", "neuroada.state": json.dumps(META)}
    write_file(tmp_path / "b.safetensors", {"rng.cpu": torch.get_rng_state()}, md)
    with _raises("b.safetensors: not a train-sparse resume state (magic None)"):
        read_state(tmp_path / "b.safetensors")


def test_s5_unknown_version(tmp_path):
    with _raises("a.safetensors: unsupported resume state version '2'"):
        read_state(_write(tmp_path / "a.safetensors", neuroada_version="2"))


def test_s6_invalid_and_nested_json(tmp_path):
    with pytest.raises(TrainingError, match=r"^a.safetensors: neuroada.state is not valid JSON \(Expecting"):
        read_state(_write(tmp_path / "a.safetensors", neuroada_state="{"))
    with _raises("b.safetensors: neuroada.state is nested too deeply"):
        read_state(_write(tmp_path / "b.safetensors", neuroada_state="[" * 100_000 + "]" * 100_000))
    with _raises("c.safetensors: neuroada.state field 'step' missing or not int"):
        read_state(_write(tmp_path / "c.safetensors", neuroada_state="[1, 2]"))


@pytest.mark.parametrize("key, value, message", [
    ("step", None, "field 'step' missing or not int"),
    ("step", True, "field 'step' missing or not int"),
    ("tokens", "12", "field 'tokens' missing or not int"),
    ("settings", [], "field 'settings' missing or not dict"),
    ("index_sha256", 5, "field 'index_sha256' missing or not str"),
    ("batch", -1, "field 'batch' is negative"),
])
def test_s6_fields(tmp_path, key, value, message):
    meta = dict(META)
    if value is None:
        del meta[key]
    else:
        meta[key] = value
    with _raises(f"a.safetensors: neuroada.state {message}"):
        read_state(_write(tmp_path / "a.safetensors", neuroada_state=json.dumps(meta)))


@pytest.mark.parametrize("rng", [None, torch.zeros(4, dtype=torch.float32), torch.zeros(2, 2, dtype=torch.uint8)])
def test_s3_rng(tmp_path, rng):
    tensors = {"param.x": torch.zeros(2)} if rng is None else {"rng.cpu": rng}
    with _raises("a.safetensors: missing or malformed rng.cpu"):
        read_state(_write(tmp_path / "a.safetensors", tensors))
