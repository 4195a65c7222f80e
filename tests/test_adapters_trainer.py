"""NeuroAdaTrainer on the tiny Llama: only deltas train, checkpoints hold the delta sidecar and never
the base, resume_from_checkpoint equals a straight run, and 2 DDP processes (torchrun, gloo)
equal 1 process with the same global batch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import neuroada_tools
from neuroada_tools.errors import ModelError, SidecarError
from neuroada_tools.io.sidecar import read_delta
from tests.adapterkit import assert_same, index_file, load, random_delta, snapshot
from tests.adapters_ddp import run

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama(fixture_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("trainer")
    ipath = d / "llama.index.safetensors"
    index = index_file(fixture_models["llama"], ipath, 4)
    return fixture_models["llama"], ipath, index


def _deltas(trainer) -> dict[str, torch.Tensor]:
    return neuroada_tools.save_delta(trainer.model, Path(trainer.args.output_dir) / "final.delta.safetensors").deltas


def test_only_deltas_train_and_checkpoints_hold_only_the_sidecar(llama, tmp_path):
    model_dir, ipath, index = llama
    trainer = run(str(model_dir), str(ipath), str(tmp_path / "run"), 4, 4, save_steps=2)
    model = trainer.model
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(n.endswith(".neuroada_delta") for n in trained)
    in_optimizer = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in trained}
    for step in (2, 4):
        ckpt = tmp_path / "run" / f"checkpoint-{step}"
        assert sorted(p.name for p in ckpt.iterdir()) == [
            "neuroada.delta.safetensors", "optimizer.pt", "rng_state.pth", "scheduler.pt", "trainer_state.json"]
    last = read_delta(tmp_path / "run" / "checkpoint-4" / "neuroada.delta.safetensors", index)
    now = _deltas(trainer)
    assert all(torch.equal(last.deltas[n], now[n]) for n in now)
    assert any(bool(t.abs().sum() > 0) for t in now.values())
    trainer.save_model(str(tmp_path / "final"))  # save_model too writes the sidecar alone
    assert sorted(p.name for p in (tmp_path / "final").iterdir()) == ["neuroada.delta.safetensors"]
    neuroada_tools.remove(model)  # training never wrote the base
    assert_same(model, snapshot(load(model_dir)))


def test_resume_from_a_checkpoint_equals_the_straight_run(llama, tmp_path):
    model_dir, ipath, index = llama
    straight = run(str(model_dir), str(ipath), str(tmp_path / "a"), 4, 6, save_steps=3)  # 6 steps: 1.5 epochs
    resumed = run(str(model_dir), str(ipath), str(tmp_path / "b"), 4, 6, save_steps=3,
                  resume=str(tmp_path / "a" / "checkpoint-3"))  # a fresh model: zero deltas until loaded
    assert resumed.state.global_step == 6
    a, b = _deltas(straight), _deltas(resumed)
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-7)
    # stopped after step 3: the resumed deltas differ from step 3's
    three = read_delta(tmp_path / "a" / "checkpoint-3" / "neuroada.delta.safetensors", index).deltas
    assert not all(torch.equal(three[n], a[n]) for n in a)


def test_activation_checkpointing_trains_the_same_deltas(llama, tmp_path):
    model_dir, ipath, _ = llama
    plain = _deltas(run(str(model_dir), str(ipath), str(tmp_path / "a"), 4, 2))
    recomputed = _deltas(run(str(model_dir), str(ipath), str(tmp_path / "b"), 4, 2, activation_checkpointing=True))
    assert any(bool(t.abs().sum() > 0) for t in plain.values())
    for n in plain:
        torch.testing.assert_close(recomputed[n], plain[n], rtol=1e-5, atol=1e-7)


def test_load_best_model_at_end_reads_the_best_checkpoints_sidecar(llama, tmp_path):
    model_dir, ipath, index = llama
    trainer = run(str(model_dir), str(ipath), str(tmp_path / "run"), 4, 4, save_steps=1, evaluate=True,
                  eval_strategy="steps", eval_steps=1, load_best_model_at_end=True, metric_for_best_model="loss",
                  greater_is_better=True)  # "best" = the highest loss, an early checkpoint: not the last one
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith("checkpoint-4")
    kept = read_delta(Path(best) / "neuroada.delta.safetensors", index).deltas
    now = _deltas(trainer)
    assert all(torch.equal(kept[n], now[n]) for n in now)


def test_resume_refuses_a_folder_without_sidecar_or_one_of_another_index(llama, fixture_models, tmp_path):
    from neuroada_tools.adapters.trainer import load_checkpoint_delta

    model_dir, ipath, index = llama
    model = neuroada_tools.apply(load(model_dir), ipath)
    (tmp_path / "plain").mkdir()
    with pytest.raises(ModelError, match=re.escape(f"{tmp_path / 'plain'}: no neuroada.delta.safetensors (not a "
                                                   "checkpoint of NeuroAdaTrainer)")):
        load_checkpoint_delta(model, tmp_path / "plain")
    other = index_file(model_dir, tmp_path / "k2.index.safetensors", 2)
    (tmp_path / "other").mkdir()
    random_delta(other, tmp_path / "other" / "neuroada.delta.safetensors", seed=1)
    with pytest.raises(SidecarError, match=r"^neuroada\.delta\.safetensors: made for index sha256 "):
        load_checkpoint_delta(model, tmp_path / "other")
    with pytest.raises(ModelError, match=r"^model has no NeuroAda adapters; call neuroada_tools\.apply\(\) first$"):
        neuroada_tools.NeuroAdaTrainer(model=load(model_dir))


def test_two_ddp_processes_equal_one_with_the_same_global_batch(llama, tmp_path):
    """torchrun, 2 CPU processes on gloo, per-device batch 2, against 1 process with batch 4."""
    model_dir, ipath, index = llama
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = tmp_path / "ddp" / "d.delta.safetensors"
    out.parent.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "adapters_ddp.py"), str(model_dir), str(ipath), str(out), "2", "3"]
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    two = read_delta(out, index).deltas
    one = _deltas(run(str(model_dir), str(ipath), str(tmp_path / "one"), 4, 3))
    assert any(bool(t.abs().sum() > 0) for t in one.values())
    for n in one:
        torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-6)
