"""The Meta-World plug-in's instructions (instructions.json): canonical first, paraphrases after."""

import pytest
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from lcbc.benchmark import load_benchmark
from lcbc.benchmarks.metaworld import instruction_table
from lcbc.errors import UserError

TASKS = sorted(ALL_V3_ENVIRONMENTS)
INSTRUCTIONS = instruction_table()


def test_keys_match_metaworld_v3_tasks():
    assert set(INSTRUCTIONS) == set(ALL_V3_ENVIRONMENTS)
    assert len(INSTRUCTIONS) == 50


@pytest.mark.parametrize("task", TASKS)
def test_each_task_has_canonical_and_paraphrases(task):
    instructions = INSTRUCTIONS[task]
    assert isinstance(instructions, tuple)
    assert len(instructions) >= 5
    assert all(isinstance(text, str) and text.strip() == text and text for text in instructions)
    assert len(set(instructions)) == len(instructions)


@pytest.mark.parametrize("task", TASKS)
def test_no_task_name_leaks_into_instructions(task):
    # Hyphenated identifiers like "drawer-open" must not appear; plain words like "push" may.
    base = task.removesuffix("-v3")
    for text in INSTRUCTIONS[task]:
        lowered = text.lower()
        assert task not in lowered
        assert "-v3" not in lowered
        if "-" in base:
            assert base not in lowered


@pytest.mark.parametrize("task", TASKS)
def test_the_benchmark_gives_canonical_first(task):
    benchmark = load_benchmark("metaworld:MT50")
    canonical, *rest = benchmark.instructions(task)
    assert canonical == benchmark.canonical_instruction(task) == INSTRUCTIONS[task][0]
    assert len(rest) >= 4
    assert all(p.lower() != canonical.lower() for p in rest)


def test_canonical_instructions_are_unique_across_tasks():
    canonicals = [INSTRUCTIONS[task][0] for task in TASKS]
    assert len({c.lower() for c in canonicals}) == len(canonicals)


def test_no_instruction_is_shared_between_tasks():
    seen: dict[str, str] = {}
    for task in TASKS:
        for text in INSTRUCTIONS[task]:
            key = text.lower().rstrip(".?!")
            assert key not in seen, f"{text!r} used by both {seen[key]} and {task}"
            seen[key] = task


def test_unknown_task_is_one_clear_error():
    with pytest.raises(UserError, match="foo-v3"):
        load_benchmark("metaworld:MT10").instructions("foo-v3")
