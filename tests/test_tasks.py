"""Built-in tasks: deterministic disjoint splits, hand-checked rewards, the safe countdown checker, task loading,
the char tokenizer, and the math-dataset adapter."""

import sys
from fractions import Fraction

import numpy as np
import pytest

from sfpo_jax.tasks import (
    ArithmeticTask,
    ColumnAdditionTask,
    CountdownTask,
    ExpressionError,
    MathTask,
    Problem,
    Task,
    TaskLike,
    char_tokenizer,
    evaluate_chain,
    import_task,
    load_task,
    parse_expression,
    save_char_tokenizer,
)

FIXTURES = __file__.rsplit("/", 1)[0] + "/fixtures/datasets"


@pytest.mark.parametrize(
    "make",
    [
        lambda seed, **kw: ArithmeticTask(num_train=300, num_eval=50, seed=seed, **kw),
        lambda seed, **kw: CountdownTask(num_train=300, num_eval=50, seed=seed, **kw),
        lambda seed, **kw: ColumnAdditionTask(num_train=300, num_eval=50, seed=seed, **kw),
    ],
    ids=["arithmetic", "countdown", "column_addition"],
)
def test_splits_are_seeded_disjoint_and_sized(make):
    a, b, c = make(0), make(0), make(1)
    assert a.train_problems() == b.train_problems() and a.eval_problems() == b.eval_problems()
    assert a.train_problems() != c.train_problems()
    train, evals = {p.prompt for p in a.train_problems()}, {p.prompt for p in a.eval_problems()}
    assert len(train) == 300 and len(evals) == 50 and not train & evals
    assert isinstance(a, TaskLike)


def test_eval_split_does_not_depend_on_train_size():
    small, big = ArithmeticTask(num_train=10, num_eval=40), ArithmeticTask(num_train=500, num_eval=40)
    assert small.eval_problems() == big.eval_problems()


def test_arithmetic_answers_follow_precedence():
    assert evaluate_chain([12, 7, 3], ["+", "*"]) == 33
    assert evaluate_chain([2, 3, 4, 5], ["*", "-", "*"]) == -14
    assert evaluate_chain([9, 9], ["-"]) == 0
    task = ArithmeticTask(num_operands=(2, 4), digits=2, num_train=200, num_eval=20)
    for p in task.train_problems():
        # Recompute from the prompt text with an independent parser: the countdown grammar covers + - *.
        value, _ = parse_expression(p.prompt.rstrip("="))
        assert Fraction(int(p.answer)) == value, p
        assert 2 <= sum(ch in "+-*" for ch in p.prompt.replace("=", "")) + 1 <= 4


def test_arithmetic_reward():
    task = ArithmeticTask(num_train=1, num_eval=1)
    scores = task.reward(["33", " 33\nbecause", "34", "-33", "thirty-three", ""], ["33"] * 5 + ["-5"])
    np.testing.assert_array_equal(scores, [1, 1, 0, 0, 0, 0])
    assert scores.dtype == np.float32
    partial = ArithmeticTask(num_train=1, num_eval=1, format_credit=0.1)
    np.testing.assert_allclose(partial.reward(["33", "34", "x"], ["33"] * 3), [1.0, 0.1, 0.0])


def test_column_addition_scratchpad_and_careless_teacher():
    from sfpo_jax.tasks.column_addition import column_steps

    assert column_steps(358, 467, 3) == ("8+7=15,5+6+1=12,3+4+1=8;825", 825)
    assert column_steps(999, 1, 3) == ("9+1=10,9+0+1=10,9+0+1=10;1000", 1000)
    # Forgetting the carry into the tens column: the working stays consistent and the answer is wrong.
    assert column_steps(358, 467, 3, forgets=[False, True, False]) == ("8+7=15,5+6=11,3+4+1=8;815", 815)
    assert column_steps(12, 34, 3, forgets=[True] * 3) == ("2+4=6,1+3=4,0+0=0;46", 46)  # no carry to forget
    exact = ColumnAdditionTask(digits=3, teacher_error=0.0, num_train=200, num_eval=20)
    for p in exact.train_problems():
        a, b = (int(x) for x in p.prompt.rstrip("=").split("+"))
        assert len(p.prompt) == 8 and p.answer == str(a + b)
        assert p.solution == column_steps(a, b, 3)[0] and exact.reward([p.solution], [p.answer])[0] == 1
    careless = ColumnAdditionTask(digits=3, teacher_error=0.7, num_train=2000, num_eval=20)
    right = careless.reward([p.solution for p in careless.train_problems()],
                            [p.answer for p in careless.train_problems()])
    # P(correct) = E[0.3 ** carries]: about 0.4 for 3-digit operands (0.45 carries per column)
    assert 0.3 < right.mean() < 0.5
    for bad in (dict(digits=0), dict(digits=7), dict(teacher_error=1.0), dict(teacher_error=-0.1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ColumnAdditionTask(num_train=1, num_eval=1, **bad)


def test_column_addition_reward_reads_the_answer_after_the_last_mark():
    task = ColumnAdditionTask(num_train=1, num_eval=1)
    completions = ["8+7=15,5+6+1=12,3+4+1=8;825", "junk;825", "8+7=15;8;825 ", "825", "8+7=15;824",
                   "8+7=15;825\n;0", "8+7=15;", ""]
    np.testing.assert_array_equal(task.reward(completions, ["825"] * len(completions)), [1, 1, 1, 0, 0, 1, 0, 0])
    assert load_task("column_addition", digits=2, num_train=5, num_eval=5).name == "column-addition-d2-e0.5"


def test_countdown_reward_hand_checked():
    task = CountdownTask(num_train=1, num_eval=1)
    spec = "3 5 7 -> 22"
    completions = [
        "3*5+7",  # correct
        "7+5*3 = 22",  # correct, with the target restated
        "(7-5)*(3+8)",  # 8 is not given
        "7*3+1",  # 1 is not given
        "3*5+7+7",  # 7 used twice
        "5*5-3",  # 5 used twice
        "3*7",  # a subset of the numbers, wrong value
        "22",  # a number that is not given
        "__import__('os').system('true')",
        "",
    ]
    np.testing.assert_array_equal(task.reward(completions, [spec] * len(completions)), [1, 1, 0, 0, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(task.reward(["(9-3)/2"], ["2 3 9 -> 3"]), [1])
    np.testing.assert_array_equal(task.reward(["9/2*2"], ["2 2 9 -> 9"]), [1])  # exact fractions, not floats
    for p in task.train_problems() + task.eval_problems():
        assert task.reward([p.solution], [p.answer])[0] == 1.0, p


def test_countdown_solutions_use_every_number_and_targets_in_range():
    task = CountdownTask(num_numbers=4, max_number=12, max_target=50, ops="+-*/", num_train=200, num_eval=10)
    for p in task.train_problems():
        numbers, target = p.answer.split("->")
        value, used = parse_expression(p.solution)
        assert sorted(used) == sorted(int(x) for x in numbers.split())
        assert value == int(target) and 1 <= int(target) <= 50


@pytest.mark.parametrize(
    "text",
    [
        "",
        "1+",
        "(1+2",
        "1+2)",
        "1//2",
        "1/0",
        "-1+2",
        "1 2",
        "1e5",
        "x",
        "1" * 7,
        "(" * 20 + "1" + ")" * 20,
        "1+" * 40 + "1",
        "__import__('os')",
        "1\x00",
    ],
)
def test_parse_expression_rejects(text):
    with pytest.raises(ExpressionError):
        parse_expression(text)


def test_parse_expression_values():
    assert parse_expression("2*(3+4)-5/5") == (Fraction(13), [2, 3, 4, 5, 5])
    assert parse_expression(" 7 ") == (Fraction(7), [7])
    assert parse_expression("((1+2))*3")[0] == 9


def test_argument_checks():
    with pytest.raises(ValueError, match="num_operands"):
        ArithmeticTask(num_operands=1)
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(ops="+^")
    with pytest.raises(ValueError, match="distinct problems"):
        ArithmeticTask(num_operands=2, digits=1, ops="+", num_train=200, num_eval=0)
    with pytest.raises(ValueError, match="num_numbers"):
        CountdownTask(num_numbers=1)
    with pytest.raises(ValueError, match="format_credit"):
        CountdownTask(format_credit=1.5)


MY_TASK = """
import numpy as np
from sfpo_jax.tasks import Problem, Task

class Parity(Task):
    name = "parity"
    def __init__(self, n): self.n = n
    def train_problems(self): return [Problem(f"{i} odd?", "yes" if i % 2 else "no") for i in range(self.n)]
    def eval_problems(self): return [Problem("7 odd?", "yes")]
    def reward(self, completions, answers):
        return np.array([c.strip() == a for c, a in zip(completions, answers)], np.float32)

def make(n=4): return Parity(n)
def not_a_task(): return object()
VALUE = 3
"""


def test_load_task_builds_registered_tasks_only(tmp_path, monkeypatch):
    assert isinstance(load_task("arithmetic", num_train=5, num_eval=5), ArithmeticTask)
    assert isinstance(load_task("countdown", num_train=5, num_eval=5), CountdownTask)
    # A name never imports: a config naming "os:system" cannot run anything.
    (tmp_path / "marker_task.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\ndef make(): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("os:system", "marker_task:make", "nonsense"):
        with pytest.raises(ValueError, match="built-in tasks are"):
            load_task(name, command="true")
    assert not (tmp_path / "ran").exists()


def test_import_task_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "my_task.py").write_text(MY_TASK)
    monkeypatch.chdir(tmp_path)  # not on sys.path: found as `python -m` would find it
    task = import_task("my_task:make", n=6)
    assert task.name == "parity" and len(task.train_problems()) == 6
    assert str(tmp_path) not in sys.path  # looked up there once, not left on the path
    assert task.render(Problem("1 odd?", "yes")) == "1 odd?"
    np.testing.assert_array_equal(task.reward(["yes", "no"], ["yes", "yes"]), [1, 0])
    with pytest.raises(ValueError, match=r"module\.path:function"):
        import_task("nonsense")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        import_task("no_such_module:make")
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        import_task("my_task:missing")
    with pytest.raises(ValueError, match="not callable"):
        import_task("my_task:VALUE")
    with pytest.raises(TypeError, match=r"without.*train_problems"):
        import_task("my_task:not_a_task")
    sys.modules.pop("my_task", None)


def test_task_is_abstract():
    with pytest.raises(TypeError):
        Task()


def test_char_tokenizer_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    save_char_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    text = "12+7*3=\n3 5 7 -> 22: (7-5)*11"
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.pad_token_id == 0 and tok.eos_token_id is not None and tok.bos_token_id is not None
    assert len(tok) <= 128
    assert tok.decode([*ids, tok.eos_token_id, tok.pad_token_id], skip_special_tokens=True) == text
    prompt = tok.apply_chat_template([{"role": "user", "content": "1+1="}], tokenize=False, add_generation_prompt=True)
    assert prompt == "user: 1+1=\nassistant: "
    assert tok.unk_token_id in tok.encode("é", add_special_tokens=False)
    batch = tok(["1=", "123="], padding=True)
    assert batch["input_ids"][0][0] == tok.pad_token_id  # left padding, as the sampler expects
    small = char_tokenizer("0123456789+=")
    assert len(small) == 16
    with pytest.raises(ValueError, match="alphabet"):
        char_tokenizer("")


def test_math_task_from_fixtures():
    task = MathTask(train="gsm8k", eval=["aime25", "amc23"], train_split="test", data_dir=FIXTURES, reward="paper")
    assert [p.answer for p in task.train_problems()] == ["1150", "120"]
    assert [p.answer for p in task.eval_problems()] == ["9", "169", "27", "2.5"]
    assert task.render(task.eval_problems()[0]).endswith("within \\boxed{}.")
    chat = MathTask(train="aime25", eval="aime25", data_dir=FIXTURES, tokenizer=char_tokenizer(), num_eval=1)
    assert chat.render(chat.train_problems()[0]).startswith("user: Find") and len(chat.eval_problems()) == 1
    with pytest.raises(ValueError, match="reward"):
        MathTask(train="aime25", eval="aime25", data_dir=FIXTURES, reward="exact")


# A budget that compiles quickly and reaches partial accuracy: single-digit sums, a 2-layer hidden-64 model.
TINY_WARMUP = dict(
    hidden_size=64,
    num_heads=2,
    num_kv_heads=1,
    intermediate_size=128,
    batch_size=64,
    learning_rate=1e-2,
    max_steps=400,
    eval_every=20,
    num_eval=20,
    stop_accuracy=0.25,
)


def test_warmup_reaches_partial_accuracy_and_is_cached(tmp_path, monkeypatch):
    from sfpo_jax.models import from_pretrained, load_tokenizer
    from sfpo_jax.train import warmup

    task = ArithmeticTask(num_operands=2, digits=1, ops="+", num_train=80, num_eval=20)
    cfg = warmup.WarmupConfig(**TINY_WARMUP)
    monkeypatch.setenv("SFPO_JAX_CACHE", str(tmp_path))
    path = warmup.warmup_policy(task, cfg)
    assert path.parent == tmp_path / "warmup" and path.name.startswith("arithmetic-n2-d1-+-")
    meta = warmup.load_warmup(task, cfg)[2]
    assert cfg.stop_accuracy <= meta["eval_accuracy"] < 1.0, meta["history"]
    assert meta["steps"] < cfg.max_steps

    # The saved checkpoint and tokenizer reproduce the recorded greedy accuracy through the public loaders.
    model, tok = from_pretrained(path, dtype=np.float32), load_tokenizer(path)
    from flax import nnx

    graphdef, params = nnx.split(model)
    greedy = warmup.make_greedy(graphdef, 4)
    evals = task.eval_problems()
    acc = warmup.accuracy(task, warmup.greedy_completions(greedy, params, task, evals, tok), evals)
    assert acc == pytest.approx(meta["eval_accuracy"])
    # The saved chat template renders a prompt as the policy was trained on it (the task's text, no roles), so
    # `apply_chat_template` on an exported policy feeds it what it knows.
    problem = evals[0]
    chat = tok.apply_chat_template([{"role": "user", "content": task.render(problem)}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == task.render(problem)

    # Cached: a second call returns the same folder without training.
    monkeypatch.setattr(warmup, "train_warmup", lambda *a, **k: pytest.fail("retrained a cached warm-up"))
    assert warmup.warmup_policy(task, cfg) == path
    # A different task configuration is a different cache entry.
    other = ArithmeticTask(num_operands=2, digits=1, ops="+", num_train=80, num_eval=20, seed=1)
    assert warmup.cache_key(other, cfg) != warmup.cache_key(task, cfg)
    # So is the same task and config on other code.
    monkeypatch.setattr(warmup, "code_fingerprint", lambda: "another version of the library")
    assert warmup.cache_key(task, cfg) != path.name


def test_code_fingerprint_follows_the_source_and_the_library_versions(tmp_path, monkeypatch):
    from sfpo_jax.train import warmup

    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 2\n")
    (tmp_path / "pkg" / "notes.txt").write_text("not code")
    fingerprint = lambda: warmup.code_fingerprint.__wrapped__(tmp_path / "pkg", ("jax",))
    first = fingerprint()
    assert fingerprint() == first and len(first) == 64
    (tmp_path / "pkg" / "notes.txt").write_text("still not code")
    assert fingerprint() == first
    (tmp_path / "pkg" / "sub" / "b.py").write_text("y = 3\n")
    changed = fingerprint()
    assert changed != first
    monkeypatch.setattr(warmup.importlib.metadata, "version", lambda name: "0.0.0")
    assert fingerprint() != changed


def test_warmup_supervised_encoding():
    from sfpo_jax.train.warmup import WarmupConfig, encode_supervised

    tok = char_tokenizer()
    task = CountdownTask(num_train=3, num_eval=1)
    p = task.train_problems()[0]
    ids, mask, loss_mask = encode_supervised(task, [p, Problem("1+1=", "2")], tok)
    n_prompt, n_target = len(p.prompt), len(p.solution) + 1
    assert tok.decode(ids[0, : n_prompt + n_target - 1]) == p.prompt + p.solution
    assert ids[0, n_prompt + n_target - 1] == tok.eos_token_id
    assert mask[0].sum() == n_prompt + n_target and mask[1].sum() == 4 + 2
    # Trained positions are those predicting a target token or EOS.
    np.testing.assert_array_equal(np.nonzero(loss_mask[0])[0], np.arange(n_prompt - 1, n_prompt + n_target - 1))
    with pytest.raises(ValueError, match="stop_accuracy"):
        WarmupConfig(stop_accuracy=0.0)
    with pytest.raises(ValueError, match="num_heads"):
        WarmupConfig(hidden_size=64, num_heads=3)
