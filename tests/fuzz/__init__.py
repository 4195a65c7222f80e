"""Fuzz every reader of untrusted bytes: only the project's named errors may come out.

Readers under test (each gets its own stream of cases):

- ``header``:     ``safetensors_io.read_header(path, CheckpointError)`` then ``read_tensor`` of every tensor;
- ``index``:      ``sidecar.read_index(path)``;
- ``delta``:      ``sidecar.read_delta(path)`` and ``read_delta(path, index)`` (half the cases each);
- ``checkpoint``: ``checkpoint.open_checkpoint(folder | model.safetensors.index.json | shard)`` then
                  ``read`` of every tensor (mutated shard maps, shards, config.json, symlinks);
- ``records``:    ``data.read_records(path)`` then, when it succeeds, the causal-LM and
                  classification example builders on the records.

The property checked for every case: the reader returns, or raises a ``NeuroAdaError`` subclass
whose message is one non-empty line; any other exception is a failure, as is a case slower than
``--case-seconds`` (a hang) or an allocation beyond ``--mem-headroom`` bytes over the process's
address space at the start (the address-space limit turns it into an error that is not a
``NeuroAdaError``, so it is reported like any other escape). The fuzzed files are a few KB, so a
headroom of 1 GiB is "far beyond the file's size" by six orders of magnitude.

Cases are drawn from seeded generators (``random.Random(hash of reader and seed)``), so a failing
case is replayed exactly by its seed:

    python -m tests.fuzz --cases 10000                 # the dedicated run (every reader)
    python -m tests.fuzz --readers index delta --cases 2000
    python -m tests.fuzz --replay index 1234           # one case, with its traceback

Besides the random cases, every reader gets the truncation of a small valid file at every offset
(``truncation_cases``); those are always errors for the sidecars and shards. The output lists,
per reader, the cases, cases/s, the slowest case, and how many cases ended in each outcome
(``ok`` or the error class). ``tests/test_fuzz.py`` runs the same generators for a few hundred
cases per reader (hypothesis, derandomised) in the regular suite.

What it leaves out: coverage-guided fuzzing (atheris is not a dependency), and files larger than
a few KB (the readers bound every length by the bytes on disk; see ``tests/test_guarantees.py``
for the absurd-shape checks).
"""
