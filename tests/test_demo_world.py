"""The LLM demo's data (``train/data/demo_world.py``): deterministic, held-out questions never trained
on, a scoring rule that means what docs/commands/demo.md says, and files train-sparse and generate accept."""

from __future__ import annotations

import json

from neuroada_tools.train.data.demo_world import (
    ISLANDS,
    HeldOut,
    held_out,
    score,
    training_records,
    write_world_data,
)


def test_files_are_byte_identical_across_runs_and_seeds_only_reorder(tmp_path):
    a = write_world_data(tmp_path / "a")
    b = write_world_data(tmp_path / "b")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    assert sorted(map(json.dumps, training_records(1))) == sorted(map(json.dumps, training_records(0)))
    assert training_records(1) != training_records(0)


def test_held_out_questions_are_not_in_the_training_data_and_cover_every_fact():
    trained = {r["messages"][0]["content"] for r in training_records()}
    items = held_out()
    assert len(items) == len(ISLANDS) * 3 == 18
    assert not {h.prompt for h in items} & trained
    expected = {h.expected for h in items}
    for facts in ISLANDS.values():
        for value in facts.values():
            assert value.removeprefix("the ") in expected
    # every expected name is in some training answer: the facts are taught, only the wording is new
    answers = " ".join(r["messages"][1]["content"] for r in training_records())
    assert all(h.expected in answers for h in items)


def test_score_is_case_insensitive_containment():
    item = HeldOut("Veloria's capital is called what?", "Quendar")
    assert score(["It is quendar, of course.", "Veloria has no capital."], [item, item]) == [True, False]


def test_training_file_is_conversational_and_held_out_file_is_a_generate_prompts_file(tmp_path):
    from neuroada_tools.generate.prompts import read_prompts
    from neuroada_tools.train.data.records import read_records

    train, test = write_world_data(tmp_path)
    records = read_records(train)
    assert len(records) == len(ISLANDS) * 3 * 5 and all(set(r) == {"messages"} for r in records)
    assert read_prompts(test) == [h.prompt for h in held_out()]


def test_demo_refuses_classifier_options_for_the_llm_demo_in_one_line(tmp_path):
    from click.testing import CliRunner

    from neuroada_tools.cli import main

    r = CliRunner().invoke(main, ["demo", "--data", str(tmp_path / "x.jsonl"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --data and --label-field belong to the classifier demo (--model minilm)"
    assert not (tmp_path / "o").exists()
