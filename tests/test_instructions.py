import pytest
from metaworld.env_dict import ALL_V3_ENVIRONMENTS

from lcbc.envs.instructions import INSTRUCTIONS, canonical_instruction, paraphrases

TASKS = sorted(ALL_V3_ENVIRONMENTS)


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
def test_accessors(task):
    canonical = canonical_instruction(task)
    rest = paraphrases(task)
    assert canonical == INSTRUCTIONS[task][0]
    assert rest == INSTRUCTIONS[task][1:]
    assert len(rest) >= 4
    assert canonical not in rest
    assert all(p.lower() != canonical.lower() for p in rest)


def test_canonical_instructions_are_unique_across_tasks():
    canonicals = [canonical_instruction(task) for task in TASKS]
    assert len({c.lower() for c in canonicals}) == len(canonicals)


def test_no_instruction_is_shared_between_tasks():
    seen: dict[str, str] = {}
    for task in TASKS:
        for text in INSTRUCTIONS[task]:
            key = text.lower().rstrip(".?!")
            assert key not in seen, f"{text!r} used by both {seen[key]} and {task}"
            seen[key] = task


@pytest.mark.parametrize("accessor", [canonical_instruction, paraphrases])
def test_unknown_task_raises_key_error(accessor):
    with pytest.raises(KeyError, match="foo-v3"):
        accessor("foo-v3")
