"""Dataset specs: every named dataset loads offline from fixtures in the upstream schema; errors name the row."""

import json
import os

import datasets
import pytest

from sfpo_jax.data import SPECS, DatasetFormatError, load, render_prompt
from sfpo_jax.rewards import MathGrader, math_reward

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "datasets")

# Hand-checked gradeable answers of the fixture rows.
EXPECTED = {
    "gsm8k": ("test", ["1150", "120"]),
    "math": ("train", [r"\frac{5}{6}", r"\{-2, 2\}"]),
    "math500": ("test", ["4", r"\left(\frac{3}{2},\infty\right)"]),
    "dapo_math_17k": ("train", ["56", "55"]),
    "aime24": ("train", ["024"]),
    "aime25": ("test", ["9", "169"]),
    "amc23": ("test", ["27", "2.5"]),
    "minerva_math": ("test", ["60", "500"]),
    "olympiadbench": ("test", ["23"]),
}


def test_every_spec_has_a_fixture():
    assert set(EXPECTED) == set(SPECS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_load_fixture(name):
    split, answers = EXPECTED[name]
    ds = load(name, split=split, data_dir=FIXTURES)
    assert isinstance(ds, datasets.Dataset)
    assert {"problem", "answer", "index"} <= set(ds.column_names)
    assert ds["answer"] == answers
    assert ds["index"] == list(range(len(answers)))
    for p in ds["problem"]:
        assert isinstance(p, str) and p.strip()
    for k in SPECS[name].keep:
        assert k in ds.column_names


def test_default_split_and_dapo_wrapper_removed():
    ds = load("dapo_math_17k", data_dir=FIXTURES)
    assert ds["problem"][0] == r"What is $7 \times 8$?"
    assert load("aime25", data_dir=FIXTURES).num_rows == 2  # the only split, test, is the default


def test_fixture_answers_are_gradeable():
    rows = [(name, a) for name, (split, answers) in EXPECTED.items() for a in answers]
    with MathGrader(num_workers=1, timeout=20.0) as g:
        scores = math_reward([rf"so \boxed{{{a}}}" for _, a in rows], [a for _, a in rows], grader=g)
    assert scores.tolist() == [1.0] * len(rows), [r for r, s in zip(rows, scores, strict=True) if s != 1.0]


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def test_malformed_row_names_dataset_split_row_and_field(tmp_path):
    rows = [
        {"question": "q0", "answer": "x\n#### 1"},
        {"question": "q1", "answer": "x\n#### 2"},
        {"question": "q2", "answer": "no marker here"},
    ]
    _write_jsonl(tmp_path / "gsm8k" / "train.jsonl", rows)
    with pytest.raises(DatasetFormatError, match=r"'gsm8k' split 'train' row 2 field 'answer'.*####"):
        load("gsm8k", "train", data_dir=tmp_path)


def test_null_and_wrong_type_fields(tmp_path):
    _write_jsonl(
        tmp_path / "aime25" / "test.jsonl",
        [{"problem": "p", "answer": "1", "id": "0"}, {"problem": None, "answer": "2", "id": "1"}],
    )
    with pytest.raises(DatasetFormatError, match=r"'aime25' split 'test' row 1 field 'problem'"):
        load("aime25", data_dir=tmp_path)
    _write_jsonl(tmp_path / "olympiadbench" / "test.jsonl", [{"question": "q", "final_answer": []}])
    with pytest.raises(DatasetFormatError, match=r"row 0 field 'final_answer'"):
        load("olympiadbench", data_dir=tmp_path)
    _write_jsonl(
        tmp_path / "math" / "train.jsonl",
        [{"problem": "p", "solution": r"\boxed{\frac{1}{2}", "level": "Level 1", "type": "Algebra"}],
    )
    with pytest.raises(DatasetFormatError, match=r"'math' split 'train' row 0 field 'solution'.*boxed"):
        load("math", data_dir=tmp_path)


def test_missing_column(tmp_path):
    _write_jsonl(tmp_path / "minerva_math" / "test.jsonl", [{"question": "q", "solution": "1"}])
    with pytest.raises(DatasetFormatError, match=r"'minerva_math' split 'test'.*missing column.*'answer'"):
        load("minerva_math", data_dir=tmp_path)


def test_bad_names_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset name 'gsm9k'"):
        load("gsm9k")
    with pytest.raises(ValueError, match="no split 'validation'"):
        load("gsm8k", "validation", data_dir=FIXTURES)
    with pytest.raises(FileNotFoundError, match=r"train\.parquet"):
        load("gsm8k", "train", data_dir=tmp_path)


def test_sharded_parquet(tmp_path):
    os.makedirs(tmp_path / "aime25")
    datasets.Dataset.from_list([{"problem": "a", "answer": "1", "id": "0"}]).to_parquet(
        str(tmp_path / "aime25" / "test-00000-of-00002.parquet")
    )
    datasets.Dataset.from_list([{"problem": "b", "answer": "2", "id": "1"}]).to_parquet(
        str(tmp_path / "aime25" / "test-00001-of-00002.parquet")
    )
    assert load("aime25", data_dir=tmp_path)["answer"] == ["1", "2"]


class _ChatTokenizer:
    chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def test_render_prompt():
    instr = "Let's think step by step and output the final answer within \\boxed{}."
    assert render_prompt("What is 1+1?") == f"What is 1+1? {instr}"
    assert render_prompt("Q", instruction=None) == "Q"
    assert render_prompt("Q", _ChatTokenizer()) == f"<user>Q {instr}<assistant>"
    assert render_prompt("Q", _ChatTokenizer(), chat_template=False) == f"Q {instr}"
    assert render_prompt("Q", _ChatTokenizer(), instruction="Go.", system="S") == "<system>S<user>Q Go.<assistant>"
    no_template = _ChatTokenizer()
    no_template.chat_template = None
    assert render_prompt("Q", no_template, instruction="Go.") == "Q Go."
    assert render_prompt("Q", system="S", instruction="Go.") == "S\n\nQ Go."
