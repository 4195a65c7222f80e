"""kill -9 at random moments of ``merge`` (both targets) and ``train-sparse``, run as subprocesses.

For each command, a chain of runs on one output path, each killed with SIGKILL at a seeded random
moment, then one run left to finish. After every kill:

- the final output path either does not exist or holds a complete result (merged safetensors
  byte-identical to an uninterrupted merge; an ONNX folder that passes the parity check against the
  unmerged model; a delta sidecar that ``read_delta(path, index)`` accepts);
- everything else the run left is a temporary name (``.NAME.tmp-*``, ``.NAME.merged-*``,
  ``.NAME.old-*``), which the next run ignores;
- the next run (``--force`` where an output exists; ``--resume`` for training once a resume state
  exists) succeeds.

At the end: the chain's merged output equals the uninterrupted merge byte for byte; the chain's
deltas, trained in pieces through kills and ``--resume``, equal an uninterrupted run's with the
same seed (``torch.equal``; both single-threaded so the float sums are the same).

Kill moments are events, not wall-clock guesses, so they land in the interesting phase however
loaded the machine is: merge --to safetensors at a random share of the output bytes written (up to
just past 100%: the config copies and the rename), first with no output yet, then with ``--force``
over a complete output; merge --to onnx during the staging merge (random share of its bytes), a
random few ms after the graph starts being written, and (full run) at random moments of the
export's tracing; train-sparse while the first checkpoint is written, then a random few ms after
random later steps.

Inputs: Llama checkpoints built here with ``StreamingWriter`` (the ``llama`` fixture's tokenizer):
~215 MB (hidden 1024 x 4 layers, vocab 32000, bf16, two shards) for merge --to safetensors, small
ones for --to onnx (an export costs ~10 s of tracing whatever the size) and train-sparse. The
regular suite kills merge --to safetensors at 3 + 1 (--force) moments, merge --to onnx at 2, and
train-sparse at 3 (``NEUROADA_KILL_POINTS``); with ``NEUROADA_INTERRUPT_FULL=1`` the ONNX chain
uses the ~215 MB checkpoint and the counts are 8 + 4, 8 + 2 and 8 (a few minutes).
Work folders live in /dev/shm where it exists (fsync-free, so a checkpoint per step is cheap).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from neuroada_tools.check.run import run_check
from neuroada_tools.export.merge import merge_to_folder
from neuroada_tools.index.build import run_index
from neuroada_tools.io.checkpoint import open_checkpoint
from neuroada_tools.io.safetensors_file import StreamingWriter, read_header
from neuroada_tools.io.sidecar import DeltaSidecar, read_delta, read_index, write_delta
from neuroada_tools.train.loop import TrainConfig, train

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("NEUROADA_INTERRUPT_FULL", "") not in ("", "0")
KILLS = int(os.environ.get("NEUROADA_KILL_POINTS", "8" if FULL else "3"))
ONNX_KILLS = max(2, KILLS - 1)  # regular suite: every ONNX run costs ~10 s of export tracing
TEMP = re.compile(r"^\.(?P<name>.+)\.(tmp|merged|onnx|old)-[^/]+$")
RESULTS: list[str] = []  # one line per command, printed at the end of the module (pytest -s)


# ---------------------------------------------------------------- building checkpoints


def build_llama(folder: Path, tokenizer_from: Path, *, hidden: int, inter: int, layers: int, vocab: int,
                dtype: torch.dtype, shards: int = 1, seed: int = 0) -> Path:
    """A Llama checkpoint written tensor by tensor (never a whole model in memory), with config and
    the tokenizer files of ``tokenizer_from``. Weights uniform in +-1/sqrt(fan_in), norms 1."""
    folder.mkdir(parents=True)
    heads = max(1, hidden // 64)
    kv = max(1, heads // 2)
    cfg = json.loads((tokenizer_from / "config.json").read_text())
    cfg.update(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
               num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
               max_position_embeddings=128, dtype=str(dtype).removeprefix("torch."))
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in tokenizer_from.iterdir():
        if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
            shutil.copyfile(f, folder / f.name)
    st = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}[dtype]
    entries = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        kv_rows = kv * (hidden // heads)
        entries += [(p + "self_attn.q_proj.weight", (hidden, hidden)),
                    (p + "self_attn.k_proj.weight", (kv_rows, hidden)),
                    (p + "self_attn.v_proj.weight", (kv_rows, hidden)),
                    (p + "self_attn.o_proj.weight", (hidden, hidden)),
                    (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                    (p + "mlp.down_proj.weight", (hidden, inter)), (p + "input_layernorm.weight", (hidden,)),
                    (p + "post_attention_layernorm.weight", (hidden,))]
    entries += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    entries.sort()
    per = math.ceil(len(entries) / shards)
    parts = [entries[i : i + per] for i in range(0, len(entries), per)]
    names = (
        ["model.safetensors"]
        if shards == 1
        else [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    )
    g = torch.Generator().manual_seed(seed)
    weight_map = {}
    for fname, part in zip(names, parts):
        w = StreamingWriter(folder / fname, [(n, st, s) for n, s in part], {"format": "pt"})
        for n, shape in part:
            if len(shape) == 1:
                t = torch.ones(shape)
            else:
                a = 1 / math.sqrt(shape[1])
                t = torch.empty(shape).uniform_(-a, a, generator=g)
            w.write(n, t.to(dtype))
            weight_map[n] = fname
        w.close()
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2)
        )
    return folder


def make_sidecars(model: Path, work: Path, k: int = 4, seed: int = 0, include=()) -> tuple[Path, Path]:
    ip, dp = work / f"{model.name}.index.safetensors", work / f"{model.name}.delta.safetensors"
    run_index(model, k, ip, include=include)
    index = read_index(ip)
    g = torch.Generator().manual_seed(seed)
    deltas = {n: torch.randn(t.shape, generator=g) * 0.01 for n, t in index.indices.items()}
    write_delta(dp, DeltaSidecar(index_digest=index.digest, deltas=deltas, task="causal-lm"))
    return ip, dp


@pytest.fixture
def work(tmp_path):
    """A scratch folder on tmpfs (/dev/shm) when there is one, else ``tmp_path``."""
    import tempfile

    if os.access("/dev/shm", os.W_OK):
        d = Path(tempfile.mkdtemp(prefix="neuroada-kill-", dir="/dev/shm"))
        yield d
        shutil.rmtree(d, ignore_errors=True)
    else:
        yield tmp_path


@pytest.fixture(scope="module")
def models(fixture_models, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("interrupt-models")
    tok = fixture_models["llama"]
    t0 = time.perf_counter()
    big = build_llama(d / "big", tok, hidden=1024, inter=2816, layers=4, vocab=32000, dtype=torch.bfloat16, shards=2)
    out = {"big": big}
    small = dict(hidden=128, inter=256, layers=2, vocab=384, dtype=torch.float32)
    out["onnx"] = big if FULL else build_llama(d / "onnx", tok, **small, shards=2, seed=1)
    out["train"] = build_llama(d / "train", tok, **small, seed=2)
    size = sum(f.stat().st_size for f in big.iterdir()) / 2**20
    RESULTS.append(f"checkpoints built in {time.perf_counter() - t0:.1f} s (merge: {size:.0f} MB)")
    return out


# ---------------------------------------------------------------- running and killing


def start(args: list) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "neuroada_tools", *map(str, args)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def finish(p: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    _, err = p.communicate(timeout=timeout)
    return p.returncode, err.decode(errors="replace")


def temp_entries(folder: Path, final: Path) -> list[Path]:
    stem = final.name.split(".")[0]
    return [
        folder / e for e in os.listdir(folder) if TEMP.match(e) and TEMP.match(e)["name"].lstrip(".").startswith(stem)
    ]


def temp_bytes(folder: Path, final: Path) -> int:
    """Bytes written so far under the temporary names of ``final`` (files, or folders one level deep)."""
    total = 0
    for t in temp_entries(folder, final):
        try:
            if t.is_dir():
                total += sum(e.stat().st_size for e in os.scandir(t) if e.is_file())
            else:
                total += t.stat().st_size
        except OSError:  # renamed or removed while we looked
            pass
    return total


def after_first_file(out: Path, delay: float):
    """A kill trigger: ``delay`` seconds after a temporary or final file of ``out`` appears."""
    seen: list[float] = []

    def trigger() -> bool:
        if not seen and (out.exists() or temp_entries(out.parent, out)):
            seen.append(time.perf_counter())
        return bool(seen) and time.perf_counter() - seen[0] >= delay

    return trigger


def at_bytes(out: Path, nbytes: int):
    """A kill trigger: once ``nbytes`` have been written under the temporary names of ``out``."""
    return lambda: temp_bytes(out.parent, out) >= nbytes


def kill_when(args: list, trigger) -> tuple[bool, int, str]:
    """Start ``args``, SIGKILL its process group as soon as ``trigger()`` is true; (killed?, code, stderr)."""
    p = start(args)
    killed = False
    while p.poll() is None:
        if trigger():
            os.killpg(p.pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    code, err = finish(p)
    return killed, code, err


def fractions(n: int, seed: int) -> list[float]:
    """``n`` seeded random numbers in [0, 1), one in each of n equal strata (so they don't bunch)."""
    rng = random.Random(seed)
    return [(i + rng.random()) / n for i in range(n)]


def check_leftovers(folder: Path, final: Path, allowed: set[str]) -> list[str]:
    """Everything in ``folder`` is an input, the final output, or a temporary name of it."""
    temps = []
    for e in os.listdir(folder):
        if e in allowed or e == final.name:
            continue
        m = TEMP.match(e)
        assert m and final.name.split(".")[0] in m["name"], f"unexpected file after kill -9: {folder / e}"
        temps.append(e)
    return temps


# ---------------------------------------------------------------- the merge chains


def stat_tree(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file: any write to the base would change one of them."""
    return {str(f.relative_to(folder)): (f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(folder.rglob("*"))}


def _same_tree(a: Path, b: Path) -> bool:
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


EXPORT_SECONDS = 40.0 if FULL else 12.0  # about how long the export (mostly tracing) takes here


def _export_dirs(out: Path) -> list[Path]:
    """The export's temporary folder(s) (``.NAME.onnx-PID`` and the folder staged inside it; not the staging merge)."""
    return [t for t in temp_entries(out.parent, out) if ".merged-" not in t.name]


def after_export_began(out: Path, delay: float):
    """A kill trigger: ``delay`` s after the export's temporary folder appears."""
    seen: list[float] = []

    def trigger() -> bool:
        if not seen and _export_dirs(out):
            seen.append(time.perf_counter())
        return bool(seen) and time.perf_counter() - seen[0] >= delay

    return trigger


def export_writing(out: Path, delay: float):
    """A kill trigger: ``delay`` s after the first byte of the graph lands in the export folder."""
    seen: list[float] = []

    def trigger() -> bool:
        if not seen:
            for d in _export_dirs(out):
                try:
                    if any(e.stat().st_size for e in os.scandir(d) if e.is_file()):
                        seen.append(time.perf_counter())
                        break
                except OSError:
                    pass
        return bool(seen) and time.perf_counter() - seen[0] >= delay

    return trigger


def _merge_trigger(to: str, i: int, f: float, out: Path, ref_bytes: int, rng: random.Random):
    if to == "safetensors":  # at a random share of the bytes written (> 100%: around the rename)
        return at_bytes(out, int(f * 1.02 * ref_bytes)), f"{102 * f:.0f}% of the bytes"
    if i == 0:  # during the staging merge, at a random share of its bytes
        return at_bytes(out, int(f * ref_bytes)), f"staging merge at {100 * f:.0f}%"
    if i == 1:  # while the graph is written, or just after (checker, copies, rename)
        delay = rng.uniform(0, 0.3)
        return export_writing(out, delay), f"graph write + {1000 * delay:.0f} ms"
    delay = rng.uniform(0, EXPORT_SECONDS)  # a random moment of the export (tracing)
    return after_export_began(out, delay), f"export + {delay:.1f}s"


@pytest.mark.parametrize("to", ["safetensors", "onnx"])
def test_merge_killed_at_random_moments(models, work, to):
    model = models["big" if to == "safetensors" else "onnx"]
    # the big model: adapt q_proj only (indexing every projection of 215 MB costs seconds; the merge
    # streams and rewrites every tensor either way)
    ip, dp = make_sidecars(model, work, include=("q_proj",) if model == models["big"] else ())
    ref = work / "ref"
    t0 = time.perf_counter()
    merge_to_folder(model, ip, dp, ref)  # what an uninterrupted merge writes
    ref_bytes = sum(f.stat().st_size for f in ref.iterdir())
    base = ["merge", "--model", model, "--index", ip, "--delta", dp, "--to", to, "--no-check", "-q"]
    base_stat = stat_tree(model)

    def complete(out: Path) -> str:
        if to == "safetensors":
            assert _same_tree(out, ref), "a merged output exists but differs from an uninterrupted merge"
            open_checkpoint(out)
            return "complete"
        assert (out / "model.onnx").is_file() and (out / "config.json").is_file(), sorted(os.listdir(out))
        r = run_check(model, ip, dp, onnx_dir=out)  # raises ParityError if the graph is wrong
        return f"complete, parity {r.comparisons['onnx_vs_unmerged']['max_abs']:.1e}"

    out = work / "out"
    allowed = {ip.name, dp.name, "ref"}
    rng = random.Random(1 if to == "safetensors" else 2)
    if to == "safetensors":
        fresh, forced = KILLS, (KILLS // 2 if FULL else 1)
    else:
        fresh, forced = (KILLS, KILLS // 4) if FULL else (ONNX_KILLS, 0)
    lines = []
    # phase 1: no output yet; phase 2: --force over a complete output (it is moved aside only at the end)
    for phase, n in (("fresh", fresh), ("--force over a complete output", forced)):
        if n == 0:
            continue
        outcomes = []
        for i, f in enumerate(fractions(n, seed=rng.randrange(2**32))):
            trigger, where = _merge_trigger(to, i, f, out, ref_bytes, rng)
            killed, code, err = kill_when(base + ["-o", out] + (["--force"] if out.exists() else []), trigger)
            assert killed or code == 0, err
            state = complete(out) if out.exists() else "absent"
            check_leftovers(work, out, allowed)
            outcomes.append(f"{where}: {'killed' if killed else 'finished'}, output {state}")
        if out.exists():  # the last kill came after the rename: the run after the kills finished its work
            lines.append(f"{phase}: {'; '.join(outcomes)}")
            continue
        t1 = time.perf_counter()
        code, err = finish(start(base + ["-o", out] + (["--force"] if out.exists() else [])))
        assert code == 0, err  # the next run succeeds, whatever the kills left
        final = complete(out)
        lines.append(f"{phase}: {'; '.join(outcomes)}; next run OK in {time.perf_counter() - t1:.1f} s, output {final}")
    assert out.exists()
    temps = check_leftovers(work, out, allowed)
    assert stat_tree(model) == base_stat, "the base checkpoint was written"
    RESULTS.append(
        f"merge --to {to} ({ref_bytes / 2**20:.0f} MB merged): "
        + " | ".join(lines)
        + f"; {len(temps)} temporary leftovers ignored; {time.perf_counter() - t0:.1f} s in all"
    )


# ---------------------------------------------------------------- the training chain


def _state_step(state: Path) -> int | None:
    if not state.exists():
        return None
    h = read_header(state)
    assert h.metadata["neuroada.magic"] == "neuroada-train-state"
    return json.loads(h.metadata["neuroada.state"])["step"]


def after_step(state: Path, step: int, extra: float):
    """A kill trigger: ``extra`` s after the resume state first reports ``step`` (or later)."""
    seen: list[float] = []

    def trigger() -> bool:
        if not seen:
            try:
                reached = (_state_step(state) or 0) >= step
            except Exception:  # noqa: BLE001 - replaced while we read it; look again
                reached = False
            if reached:
                seen.append(time.perf_counter())
        return bool(seen) and time.perf_counter() - seen[0] >= extra

    return trigger


def test_train_sparse_killed_then_resumed_equals_straight(models, work):
    model = models["train"]
    ip = work / "t.index.safetensors"
    run_index(model, 4, ip)
    index = read_index(ip)
    data = work / "train.jsonl"
    words = "the quick brown fox jumps over the lazy dog and a small model learns a few words".split()
    rng = random.Random(0)
    data.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=12))}) + "\n" for _ in range(48)))
    steps = 16
    settings = dict(max_steps=steps, batch_size=4, max_length=24, lr=1e-2, seed=3, save_every=1)
    t0 = time.perf_counter()
    ref = work / "ref.delta.safetensors"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the children (OMP_NUM_THREADS=1): the same float sums
    try:
        train(TrainConfig(model=model, index=ip, data=data, output=ref, device="cpu", **settings))
    finally:
        torch.set_num_threads(threads)
    want = read_delta(ref, index)
    base = [
        "train-sparse",
        "--model",
        model,
        "--index",
        ip,
        "--data",
        data,
        "--max-steps",
        steps,
        "--batch-size",
        "4",
        "--max-length",
        "24",
        "--lr",
        "1e-2",
        "--seed",
        "3",
        "--save-every",
        "1",
        "--device",
        "cpu",
        "-q",
    ]
    base_stat = stat_tree(model)
    out = work / "chain.delta.safetensors"
    state = work / "chain.state.safetensors"
    allowed = {ip.name, data.name, ref.name, "ref.state.safetensors"}

    def next_args() -> list:
        if _state_step(state) is not None:
            return base + ["-o", out, "--resume"]
        return base + ["-o", out] + (["--force"] if out.exists() else [])

    # kill 1 while the first checkpoint is written; then each a few ms after a random later step
    outcomes = []
    for i in range(KILLS):
        now = _state_step(state) or 0
        if now == steps:
            break
        if i == 0:
            trigger, where = after_first_file(out, 0.0), "first checkpoint being written"
        else:
            s, extra = rng.randint(now + 1, max(now + 1, (now + steps) // 2)), rng.uniform(0, 0.05)
            trigger, where = after_step(state, s, extra), f"step {s} + {1000 * extra:.0f} ms"
        killed, code, err = kill_when(next_args(), trigger)
        assert killed or code == 0, err
        if out.exists():
            read_delta(out, index)  # complete and valid, whatever step it holds
        check_leftovers(work, out, allowed | {state.name})
        outcomes.append(f"{where}: {'killed' if killed else 'finished'}, state at step {_state_step(state)}")
    t1 = time.perf_counter()
    if _state_step(state) != steps:
        code, err = finish(start(next_args()))
        assert code == 0, err
    got = read_delta(out, index)
    assert got.deltas.keys() == want.deltas.keys()
    for n in want.deltas:
        assert torch.equal(got.deltas[n], want.deltas[n]), n
    temps = check_leftovers(work, out, allowed | {state.name})
    assert stat_tree(model) == base_stat, "the base checkpoint was written"
    RESULTS.append(
        f"train-sparse ({steps} steps, --save-every 1): kills: {'; '.join(outcomes)}; resumed to the "
        f"end in {time.perf_counter() - t1:.1f} s: deltas torch.equal to the straight run; "
        f"{len(temps)} temporary leftovers; {time.perf_counter() - t0:.1f} s in all"
    )


def test_zz_report():
    """Print what the chains did (visible with ``pytest -s``)."""
    for line in RESULTS:
        print(line)
