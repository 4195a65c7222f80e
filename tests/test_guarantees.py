"""Guarantees that are properties of the whole package rather than of one command.

- No unpickling anywhere: an AST scan of ``neuroada_tools/`` for pickle-family imports,
  ``torch.load``, ``weights_only=False``, ``allow_pickle``, ``eval``/``exec``, ``yaml.load``; and a
  hostile model folder (a pickle bomb ``pytorch_model.bin``, ``auto_map`` code) taken through
  index (magnitude and gradient), train-sparse, merge and check without running any of it.
- ``trust_remote_code`` is only ever the user's ``--trust-remote-code`` flag (default off).
- Disk full: ``index``, ``train-sparse`` and ``merge`` (both targets) writing to a 4 MB tmpfs give
  one line, exit 2, and leave nothing in the output folder. Skipped (with the reason) where the
  machine cannot mount one (not root / no CAP_SYS_ADMIN).
- Merge refuses a delta that overflows the output dtype (``1e38`` on an fp16 base), naming the tensor.

The in-process runs use click's ``CliRunner`` with ``catch_exceptions=False``: an exception that
``handle_errors`` does not turn into one line fails the test with its traceback.
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import neuroada_tools
from neuroada_tools.cli import main
from neuroada_tools.errors import SidecarError
from neuroada_tools.export.merge import merge_tensor
from neuroada_tools.index.build import run_index
from neuroada_tools.io.sidecar import DeltaSidecar, read_index, write_delta

PKG = Path(neuroada_tools.__file__).resolve().parent
ROOT = PKG.parent


def cli(*args) -> tuple[int, str, str]:
    r = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return r.exit_code, r.stdout, r.stderr


def one_line_error(code: int, err: str, pattern: str = "") -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    if pattern:
        assert pattern in lines[0], lines[0]
    return lines[0]


# ================================================================ no unpickling, no remote code

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "dill", "joblib", "cloudpickle", "marshal", "shelve",
                  "pickletools", "copyreg", "jsonpickle"}
DANGEROUS_BUILTINS = {"eval", "exec", "compile", "__import__"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _flag_source(value: ast.AST) -> bool:
    """A trust_remote_code value that is allowed: ``False`` or the user's flag passed along."""
    if isinstance(value, ast.Constant):
        return value.value is False
    return (isinstance(value, ast.Name) and value.id == "trust_remote_code") or (
        isinstance(value, ast.Attribute) and value.attr == "trust_remote_code"
    )


def scan_source(source: str, filename: str = "<src>") -> list[str]:
    """Every unpickling or remote-code hazard in ``source``, as ``file:line: what``."""
    found: list[str] = []
    tree = ast.parse(source, filename)

    def hit(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', 0)}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in PICKLE_MODULES:
                    hit(node, f"import {a.name}")
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[0] in PICKLE_MODULES:
                hit(node, f"from {mod} import ...")
            if mod in ("torch", "torch.serialization") and any(a.name == "load" for a in node.names):
                hit(node, f"from {mod} import load")
            if mod == "numpy" and any(a.name == "load" for a in node.names):
                hit(node, "from numpy import load")
        elif isinstance(node, ast.Attribute):
            name = _dotted(node)
            if name in ("torch.load", "torch.serialization.load", "yaml.load", "yaml.unsafe_load",
                        "yaml.full_load") or name.split(".")[0] in PICKLE_MODULES:
                hit(node, name)
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in DANGEROUS_BUILTINS:
                hit(node, f"{node.func.id}()")
            if isinstance(node.func, ast.Name) and node.func.id == "getattr" and any(
                isinstance(a, ast.Constant) and a.value in ("load", "loads", "Unpickler") for a in node.args[1:]
            ):
                hit(node, "getattr(..., 'load')")
            for kw in node.keywords:
                if kw.arg == "weights_only" and not (isinstance(kw.value, ast.Constant) and kw.value.value is True):
                    hit(node, "weights_only not True")
                if kw.arg == "allow_pickle" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                    hit(node, "allow_pickle not False")
                if kw.arg == "trust_remote_code" and not _flag_source(kw.value):
                    hit(node, f"trust_remote_code={ast.unparse(kw.value)}")
        elif isinstance(node, ast.Dict):
            for k, v in zip(node.keys, node.values):
                if isinstance(k, ast.Constant) and k.value == "trust_remote_code" and not _flag_source(v):
                    hit(node, f"'trust_remote_code': {ast.unparse(v)}")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for a, d in pairs:
                if a.arg == "trust_remote_code" and not (isinstance(d, ast.Constant) and d.value is False):
                    hit(node, f"def {node.name}(trust_remote_code={ast.unparse(d)})")
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            value = node.value
            if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "field"
                    and any(kw.arg == "default" for kw in value.keywords)):
                value = next(kw.value for kw in value.keywords if kw.arg == "default")  # dataclasses.field(default=...)
            if node.target.id == "trust_remote_code" and value is not None and not (
                isinstance(value, ast.Constant) and value.value is False
            ):
                hit(node, f"trust_remote_code default {ast.unparse(value)}")
    return found


def package_sources() -> list[Path]:
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 15, files
    return files


def test_scanner_catches_every_pattern():
    """The scan is not vacuous: each hazard it looks for is found in a sample."""
    bad = textwrap.dedent("""
        import pickle
        import dill as d
        from joblib import load
        from torch import load
        import torch, numpy as np, yaml
        torch.load("x.bin")
        torch.load("x.bin", weights_only=False)
        np.load("x.npy", allow_pickle=True)
        yaml.load(open("c.yaml"))
        eval("1 + 1")
        exec("x = 1")
        getattr(torch, "load")("x")
        f(trust_remote_code=True)
        f(trust_remote_code=os.environ.get("X") == "1")
        cfg = {"trust_remote_code": True}
        def g(trust_remote_code=True): ...
        class C:
            trust_remote_code: bool = True
        class D:
            trust_remote_code: bool = field(default=True, metadata={})
    """)
    found = scan_source(bad)
    for what in ("import pickle", "import dill", "from joblib", "from torch import load", "torch.load",
                 "weights_only not True", "allow_pickle not False", "yaml.load", "eval()", "exec()",
                 "getattr(..., 'load')", "trust_remote_code=True", "trust_remote_code=os.environ",
                 "'trust_remote_code': True", "def g(trust_remote_code=True)", "trust_remote_code default True"):
        assert any(what in f for f in found), (what, found)
    assert sum("trust_remote_code default True" in f for f in found) == 2  # the plain and the field() default
    ok = textwrap.dedent("""
        def load_model(d, trust_remote_code: bool = False):
            return A.from_pretrained(d, trust_remote_code=trust_remote_code)
        def h(cfg):
            model.eval()
            return B.from_pretrained(d, trust_remote_code=cfg.trust_remote_code, weights_only=True)
        class Cfg:
            trust_remote_code: bool = False
    """)
    assert scan_source(ok) == []


def test_no_unpickling_and_no_unflagged_remote_code_in_the_package():
    found = [f for p in package_sources() for f in scan_source(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert found == [], "\n".join(found)


def test_trust_remote_code_is_an_off_by_default_flag():
    """Only commands that load a model folder with transformers take it, and only as a flag."""
    import click

    seen = {}
    for name, cmd in main.commands.items():
        for p in cmd.params:
            if p.name == "trust_remote_code":
                assert isinstance(p, click.Option) and p.is_flag, (name, p)
                assert p.get_default(click.Context(cmd)) is False, (name, p)
                assert p.opts == ["--trust-remote-code"], p.opts
                seen[name] = p
    assert "train-sparse" in seen


def _hostile_folder(src: Path, dst: Path, marker: Path) -> Path:
    """A copy of ``src`` with code and pickles that write ``marker`` if anything runs them."""
    shutil.copytree(src, dst)
    payload = f"open({str(marker)!r}, 'a').write('ran\\n')"
    (dst / "evil.py").write_text(payload + "\nclass EvilConfig: pass\nclass EvilModel: pass\nclass EvilTokenizer: "
        "pass\n")

    class Bomb:
        def __reduce__(self):
            return (exec, (payload,))

    for name in ("pytorch_model.bin", "training_args.bin", "optimizer.pt", "rng_state.pth"):
        (dst / name).write_bytes(pickle.dumps({"model.embed_tokens.weight": Bomb()}))
    cfg = json.loads((dst / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (dst / "config.json").write_text(json.dumps(cfg))
    tk = dst / "tokenizer_config.json"
    tcfg = json.loads(tk.read_text())
    tcfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    tk.write_text(json.dumps(tcfg))
    return dst


def test_hostile_model_folder_runs_no_code_and_no_pickle(fixture_models, tmp_path):
    marker = tmp_path / "PWNED"
    base = _hostile_folder(fixture_models["llama"], tmp_path / "base", marker)
    data = tmp_path / "t.jsonl"
    data.write_text("".join(json.dumps({"text": f"the quick brown fox {i}"}) + "\n" for i in range(4)))
    ip, dp = tmp_path / "b.index.safetensors", tmp_path / "b.delta.safetensors"
    assert cli("index", base, "-k", "2", "-o", ip, "-q")[0] == 0
    code, out, err = cli(
        "train-sparse",
        "--model",
        base,
        "--index",
        ip,
        "--data",
        data,
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--max-length",
        "16",
        "-o",
        dp,
        "-q",
    )
    assert code == 0, err
    code, out, err = cli("merge", "--model", base, "--index", ip, "--delta", dp, "-o", tmp_path / "merged", "-q")
    assert code == 0, err
    assert not (tmp_path / "merged" / "evil.py").exists()
    code, out, err = cli("index", base, "-k", "2", "--criterion", "gradient", "--data", data, "--max-length", "16",
                         "--device", "cpu", "-o", tmp_path / "g.index.safetensors", "-q")
    assert code == 0, err
    assert not marker.exists(), marker.read_text()


def test_the_hostile_folder_would_be_caught(fixture_models, tmp_path):
    """Control for the test above: with the user's flag, transformers does import evil.py, so the
    marker would show a violation (run in a child with its own module cache)."""
    marker = tmp_path / "PWNED"
    base = _hostile_folder(fixture_models["llama"], tmp_path / "base", marker)
    code = (
        "import sys; from pathlib import Path; from neuroada_tools.hf import task_config\n"
        "try: task_config(Path(sys.argv[1]), 'causal-lm', trust_remote_code=True)\n"
        "except Exception: pass\n"
    )
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-c", code, str(base)], env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert marker.exists()


def test_index_never_writes_the_base(fixture_models, tmp_path):
    """index only reads (train-sparse and merge: tests/test_train.py, test_merge.py, test_interrupt.py)."""
    import hashlib

    base = tmp_path / "base"
    shutil.copytree(fixture_models["llama"], base)

    def digest() -> dict[str, tuple[str, int]]:
        return {
            f.name: (hashlib.sha256(f.read_bytes()).hexdigest(), f.stat().st_mtime_ns) for f in sorted(base.iterdir())
        }

    before = digest()
    for form in (base, base / "model.safetensors.index.json"):
        assert cli("index", form, "-k", "2", "-o", tmp_path / "i.index.safetensors", "--force", "-q")[0] == 0
    assert digest() == before


# ================================================================ merge: overflow of the output dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_merge_tensor_refuses_an_overflowing_delta(dtype):
    w = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=dtype)
    idx = torch.tensor([[0, 2], [1, 2]], dtype=torch.int32)
    delta = torch.tensor([[0.0, 0.0], [3.4e38, 0.0]])  # above the bf16 and fp16 maxima
    with pytest.raises(SidecarError, match=r"'blk.w': merged value W\[1, 1\] = 5 \+ 3.4e\+38 overflows"):
        merge_tensor(w, idx, delta, False, dtype, name="blk.w")
    # transposed (Conv1D) storage names the logical row and column too
    with pytest.raises(SidecarError, match=r"W\[1, 1\]"):
        merge_tensor(w.t().contiguous(), idx, delta, True, dtype, name="blk.w")
    assert torch.isfinite(merge_tensor(w, idx, delta * 0, False, dtype)).all()


def test_cast_of_a_copied_value_that_overflows_is_refused():
    w = torch.tensor([[1e5, 1.0], [2.0, 3.0]])
    with pytest.raises(SidecarError, match=r"'w': value 100000 overflows float16 \(choose another --dtype\)"):
        merge_tensor(w, torch.tensor([[1], [0]], dtype=torch.int32), torch.zeros(2, 1), False, torch.float16, name="w")


def test_merge_cli_refuses_overflow_into_fp16_base(fixture_models, tmp_path):
    base = fixture_models["llama-fp16"]
    ip = tmp_path / "i.index.safetensors"
    run_index(base, 2, ip)
    index = read_index(ip)
    deltas = {n: torch.zeros(t.shape) for n, t in index.indices.items()}
    victim = sorted(deltas)[3]
    deltas[victim][5, 1] = 1e38  # finite in fp32 (so the sidecar is valid), inf in fp16
    dp = tmp_path / "d.delta.safetensors"
    write_delta(dp, DeltaSidecar(index_digest=index.digest, deltas=deltas, task="causal-lm"))
    out = tmp_path / "merged"
    code, _, err = cli("merge", "--model", base, "--index", ip, "--delta", dp, "-o", out, "-q")
    line = one_line_error(code, err, f"'{victim}': merged value W[5, ")
    assert "overflows float16" in line
    assert not out.exists() and not list(tmp_path.glob(".merged.*"))


# ================================================================ disk full


@pytest.fixture
def small_fs(tmp_path):
    """A 4 MB tmpfs at ``tmp_path/full`` (unmounted afterwards), or a skip saying why not."""
    mnt = tmp_path / "full"
    mnt.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command: cannot make a size-limited file system here")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        # a model loaded in this process may still map a deleted file there: detach lazily
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(mnt: Path, leave: int) -> None:
    """Occupy all but ``leave`` bytes of the file system at ``mnt``."""
    st = os.statvfs(mnt)
    free = st.f_bavail * st.f_frsize
    fd = os.open(mnt / "filler", os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, max(free - leave, 1))
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def trained(fixture_models, tmp_path_factory):
    """Index, data and a trained delta of the llama fixture, on the normal disk."""
    d = tmp_path_factory.mktemp("diskfull-inputs")
    ip, dp, data = d / "i.index.safetensors", d / "d.delta.safetensors", d / "t.jsonl"
    run_index(fixture_models["llama"], 4, ip)
    data.write_text("".join(json.dumps({"text": f"hello world number {i}"}) + "\n" for i in range(4)))
    code, _, err = cli(
        "train-sparse",
        "--model",
        fixture_models["llama"],
        "--index",
        ip,
        "--data",
        data,
        "--max-steps",
        "1",
        "--batch-size",
        "2",
        "--max-length",
        "16",
        "-o",
        dp,
        "-q",
    )
    assert code == 0, err
    return {"index": ip, "delta": dp, "data": data}


def _only_filler(mnt: Path) -> None:
    assert sorted(os.listdir(mnt)) == ["filler"], "half-written output or temporary file left behind"


def test_disk_full_index(fixture_models, small_fs):
    fill(small_fs, 8192)
    code, _, err = cli("index", fixture_models["llama"], "-k", "32", "-o", small_fs / "x.index.safetensors", "-q")
    one_line_error(code, err, "No space left on device")
    assert str(small_fs) in err  # says where
    _only_filler(small_fs)


def test_disk_full_train_sparse(fixture_models, small_fs, trained):
    fill(small_fs, 8192)
    code, _, err = cli(
        "train-sparse",
        "--model",
        fixture_models["llama"],
        "--index",
        trained["index"],
        "--data",
        trained["data"],
        "--max-steps",
        "2",
        "--save-every",
        "1",
        "--batch-size",
        "2",
        "--max-length",
        "16",
        "-o",
        small_fs / "t.delta.safetensors",
        "-q",
    )
    one_line_error(code, err, "No space left on device")
    assert str(small_fs) in err  # says where
    _only_filler(small_fs)


def test_disk_full_while_copying_side_files_names_the_output(tmp_path, monkeypatch):
    """shutil names the *source* of a failed copy; merge re-names the error after its output file,
    so a full disk never reads as a problem of the base model."""
    import errno

    from neuroada_tools.io import outputs

    def full(src, dst):
        e = OSError(errno.ENOSPC, "No space left on device")
        e.filename, e.filename2 = str(src), str(dst)
        raise e

    monkeypatch.setattr(outputs.shutil, "copyfile", full)
    with pytest.raises(OSError) as e:
        outputs.copy_file(tmp_path / "base" / "tokenizer.json", tmp_path / "out" / "tokenizer.json")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "out" / "tokenizer.json")


@pytest.mark.parametrize("to", ["safetensors", pytest.param("onnx", marks=pytest.mark.slow)])
def test_disk_full_merge(fixture_models, small_fs, trained, to):
    base = fixture_models["llama"]
    # onnx: room for the merged staging copy, not for the export; safetensors: room for nothing
    room = sum(f.stat().st_size for f in base.iterdir()) + 64 * 1024 if to == "onnx" else 8192
    fill(small_fs, room)
    code, _, err = cli(
        "merge",
        "--model",
        base,
        "--index",
        trained["index"],
        "--delta",
        trained["delta"],
        "--to",
        to,
        "-o",
        small_fs / "out",
        "-q",
        "--no-check",
    )
    one_line_error(code, err, "No space left on device")
    if to == "safetensors":
        assert str(small_fs) in err  # the writer names the file it could not write
    _only_filler(small_fs)
