"""Dataset specs: every named dataset loads offline from fixtures in the upstream schema; errors name the row."""

import json
import os

import datasets
import pytest

from sfpo_jax.data import PROMPTS, SPECS, DatasetFormatError, deduplicate, load, render_prompt, user_message
from sfpo_jax.rewards import MathGrader, math_reward
from sfpo_jax.tasks import MathTask
from sfpo_jax.tasks.math_task import equal_mix

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "datasets")

# Hand-checked gradeable answers of the fixture rows.
EXPECTED = {
    "gsm8k": ("test", ["1150", "120"]),
    "math": ("train", [r"\frac{5}{6}", r"\{-2, 2\}"]),
    "math500": ("test", ["4", r"\left(\frac{3}{2},\infty\right)"]),
    "dapo_math_17k": ("train", ["25", "6", "5"]),
    "dapo_math_17k_raw": ("train", ["56", "55"]),
    "aime24": ("train", ["024"]),
    "matharena_aime25": ("train", ["15", "9"]),
    "aimo_amc": ("train", ["36", "1.5"]),
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
    ds = load("dapo_math_17k_raw", data_dir=FIXTURES)
    assert ds["problem"][0] == r"What is $7 \times 8$?"
    assert load("aime25", data_dir=FIXTURES).num_rows == 2  # the only split, test, is the default
    assert (
        load("dapo_math_17k", data_dir=FIXTURES)["problem"][0]
        == "What is the sum of the first $5$ odd positive integers?"
    )


def test_official_sources():
    """The repos the official SFPO data scripts load (examples/data_preprocess/*.py)."""
    repos = {name: spec.repo_id for name, spec in SPECS.items()}
    assert repos["dapo_math_17k"] == "haizhongzheng/DAPO-Math-17K-cleaned"
    assert repos["math"] == "xDAN2099/lighteval-MATH"
    assert repos["aimo_amc"] == "AI-MO/aimo-validation-amc"
    assert repos["matharena_aime25"] == "MathArena/aime_2025"
    assert (repos["math500"], repos["aime24"], repos["minerva_math"], repos["olympiadbench"]) == (
        "HuggingFaceH4/MATH-500",
        "HuggingFaceH4/aime_2024",
        "math-ai/minervamath",
        "math-ai/olympiadbench",
    )
    splits = {name: SPECS[name].default_split for name in ("aimo_amc", "matharena_aime25", "aime24", "math500")}
    assert splits == {"aimo_amc": "train", "matharena_aime25": "train", "aime24": "train", "math500": "test"}


def test_problems_are_verbatim_and_math_answers_are_verls_last_box(tmp_path):
    _write_jsonl(tmp_path / "matharena_aime25" / "train.jsonl", [{"problem": "  Find $x$.\n", "answer": 7}])
    assert load("matharena_aime25", data_dir=tmp_path)["problem"] == ["  Find $x$.\n"]
    # verl's last_boxed_only_string: any "\boxed " (with a space) wins, up to the next "$".
    rows = [{"problem": "p", "solution": r"so $\boxed 5$ and \boxed{6}", "level": "Level 1", "type": "Algebra"}]
    _write_jsonl(tmp_path / "math" / "train.jsonl", rows)
    assert load("math", data_dir=tmp_path)["answer"] == ["5"]


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
    assert render_prompt("Q", prompt="plain") == "Q"
    assert render_prompt("Q", _ChatTokenizer()) == f"<user>Q {instr}<assistant>"
    assert render_prompt("Q", _ChatTokenizer(), chat_template=False) == f"Q {instr}"
    assert render_prompt("Q", _ChatTokenizer(), prompt="{problem} Go.", system="S") == "<system>S<user>Q Go.<assistant>"
    no_template = _ChatTokenizer()
    no_template.chat_template = None
    assert render_prompt("Q", no_template, prompt="{problem} Go.") == "Q Go."
    assert render_prompt("Q", system="S", prompt="{problem} Go.") == "S\n\nQ Go."
    with pytest.raises(ValueError, match=r"one of \['boxed', 'plain', 'sfpo'\]"):
        render_prompt("Q", prompt="official")


def test_sfpo_prompt_is_the_official_user_message():
    """make_prefix() of the official dapo_math.py, lighteval_math.py and test_*.py, character for character."""
    official = (
        "Please solve the following math problem: What is $1+1$?. The assistant first thinks about the reasoning "
        "process step by step and then provides the user with the answer. Return the final answer in \\boxed{} "
        "tags, for example \\boxed{1}. Let's solve this step by step. "
    )
    assert user_message("What is $1+1$?", "sfpo") == official
    assert render_prompt("What is $1+1$?", _ChatTokenizer(), prompt="sfpo") == f"<user>{official}<assistant>"
    assert PROMPTS["sfpo"].endswith("step by step. ") and PROMPTS["sfpo"].count("{problem}") == 1


def test_deduplicate_keeps_the_first_of_each_problem(tmp_path):
    rows = [{"prompt": "A", "target": "1"}, {"prompt": "B", "target": "2"}, {"prompt": " A\n", "target": "3"}]
    _write_jsonl(tmp_path / "dapo_math_17k" / "train.jsonl", rows)
    ds = deduplicate(load("dapo_math_17k", data_dir=tmp_path))
    assert (ds["problem"], ds["answer"], ds["index"]) == (["A", "B"], ["1", "2"], [0, 1])
    for dedup, answers in ((True, ["1", "2"]), (False, ["1", "2", "3"])):
        _write_jsonl(tmp_path / "aime24" / "train.jsonl", [{"problem": "P", "answer": "4"}] * 2)
        t = MathTask(train="dapo_math_17k", eval="aime24", data_dir=str(tmp_path), dedup=dedup)
        assert [p.answer for p in t.train_problems()] == answers
        assert len(t.eval_problems()) == 2  # evaluation sets are never de-duplicated


def test_train_mix():
    concat = MathTask(train=["dapo_math_17k", "math"], eval="math500", data_dir=str(FIXTURES))
    assert [p.answer for p in concat.train_problems()] == ["25", "6", "5", r"\frac{5}{6}", r"\{-2, 2\}"]
    equal = MathTask(train=["dapo_math_17k", "math"], eval="math500", data_dir=str(FIXTURES), train_mix="equal")
    answers = [p.answer for p in equal.train_problems()]
    assert answers[:3] == ["25", "6", "5"] and len(answers) == 6
    assert answers[3:5] == [r"\frac{5}{6}", r"\{-2, 2\}"] and answers[5] in answers[3:5]  # MATH once + 1 drawn
    again = MathTask(train=["dapo_math_17k", "math"], eval="math500", data_dir=str(FIXTURES), train_mix="equal")
    assert [p.answer for p in again.train_problems()] == answers  # deterministic from the seed
    with pytest.raises(ValueError, match="train_mix"):
        MathTask(train="math", eval="math500", data_dir=str(FIXTURES), train_mix="mixed")


def test_equal_mix_shares():
    a, b, c = list(range(10)), list(range(100, 103)), list(range(200, 204))
    mixed = equal_mix([a, b, c], seed=1)
    assert len(mixed) == 30 and mixed[:10] == a
    for source in (b, c):
        counts = [mixed.count(x) for x in source]
        assert sum(counts) == 10 and max(counts) - min(counts) <= 1
    assert equal_mix([a, b, c], seed=1) == mixed


def test_math_task_prompt():
    task = MathTask(train="aimo_amc", eval="matharena_aime25", data_dir=str(FIXTURES), prompt="sfpo")
    assert task.render(task.eval_problems()[0]) == user_message(task.eval_problems()[0].prompt, "sfpo")
    assert task.render(task.train_problems()[0]).startswith("Please solve the following math problem: What is $2^5")
    with pytest.raises(ValueError, match="prompt must be one of"):
        MathTask(train="aimo_amc", eval="aimo_amc", data_dir=str(FIXTURES), prompt="nope")
