"""Loading the named datasets into ``(problem, answer)`` form, and rendering prompts (``PROMPTS``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from sfpo_jax.data.specs import SPECS, DatasetFormatError, DatasetSpec

if TYPE_CHECKING:  # imported where a dataset is built, so `import sfpo_jax.train` skips its ~0.5 s
    import datasets

DEFAULT_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."

# The user message of each named prompt; ``{problem}`` is replaced by the problem text as loaded (verbatim).
PROMPTS: dict[str, str] = {
    # The official SFPO user message, for training and every evaluation set: make_prefix() of
    # Code/SFPO/examples/data_preprocess/{dapo_math,lighteval_math,test_*}.py, trailing space included.
    "sfpo": (
        "Please solve the following math problem: {problem}. The assistant first thinks about the reasoning process "
        "step by step and then provides the user with the answer. Return the final answer in \\boxed{} tags, for "
        "example \\boxed{1}. Let's solve this step by step. "
    ),
    # verl's usual math instruction (its gsm8k / MATH examples), this library's default.
    "boxed": "{problem} " + DEFAULT_INSTRUCTION,
    # The problem alone.
    "plain": "{problem}",
}
_LOCAL_FORMATS = (("parquet", "parquet"), ("jsonl", "json"), ("json", "json"))


def get_spec(name: str) -> DatasetSpec:
    """The spec called ``name``; ValueError listing the known names otherwise."""
    try:
        return SPECS[name]
    except KeyError:
        raise ValueError(f"unknown dataset name {name!r}; known: {sorted(SPECS)}") from None


def _local_files(data_dir: str | os.PathLike, spec: DatasetSpec, split: str) -> tuple[str, list[str]]:
    folder = os.path.join(os.fspath(data_dir), spec.name)
    for ext, builder in _LOCAL_FORMATS:
        single = os.path.join(folder, f"{split}.{ext}")
        if os.path.isfile(single):
            return builder, [single]
        if os.path.isdir(folder):
            shards = sorted(
                os.path.join(folder, f)
                for f in os.listdir(folder)
                if f.startswith(f"{split}-") and f.endswith(f".{ext}")
            )
            if shards:
                return builder, shards
    raise FileNotFoundError(
        f"dataset {spec.name!r} split {split!r}: no {split}.parquet, {split}.jsonl, {split}.json or "
        f"{split}-*.parquet under {folder}"
    )


def _get(row: dict[str, Any], path: str) -> Any:
    value: Any = row
    for part in path.split("."):
        if isinstance(value, dict):
            if part not in value:
                raise ValueError(f"missing key {part!r}")
            value = value[part]
        elif isinstance(value, list | tuple):
            if not part.isdigit() or int(part) >= len(value):
                raise ValueError(f"no element {part} in a list of {len(value)}")
            value = value[int(part)]
        else:
            raise ValueError(f"cannot take {part!r} of {type(value).__name__}")
    return value


def to_problems(raw: datasets.Dataset, spec: DatasetSpec, split: str) -> datasets.Dataset:
    """Maps an upstream-schema dataset to columns ``problem``, ``answer``, ``index`` (upstream row) + ``spec.keep``.

    Raises:
      DatasetFormatError: a column is missing, or a row's field is malformed; the message names the dataset,
        split, row index and field.
    """
    needed = {spec.problem_field.split(".")[0], spec.answer_field.split(".")[0], *spec.keep}
    missing = sorted(needed - set(raw.column_names))
    if missing:
        raise DatasetFormatError(
            f"dataset {spec.name!r} split {split!r}: missing column(s) {missing} (field of every row); "
            f"columns present: {raw.column_names}"
        )
    out: dict[str, list[Any]] = {"problem": [], "answer": [], "index": [], **{k: [] for k in spec.keep}}
    for i, row in enumerate(raw):
        for field, fn, key in (
            (spec.problem_field, spec.problem_fn, "problem"),
            (spec.answer_field, spec.answer_fn, "answer"),
        ):
            try:
                out[key].append(fn(_get(row, field)))
            except ValueError as e:
                raise DatasetFormatError(
                    f"dataset {spec.name!r} split {split!r} row {i} field {field!r}: {e}"
                ) from None
        out["index"].append(i)
        for k in spec.keep:
            out[k].append(row[k])
    import datasets

    return datasets.Dataset.from_dict(out)


def load(name: str, split: str | None = None, data_dir: str | os.PathLike | None = None) -> datasets.Dataset:
    """Loads dataset ``name`` (see ``SPECS``) as a ``datasets.Dataset`` with ``problem`` and ``answer`` columns.

    Args:
      name: a key of ``SPECS``: the official training sets ``"dapo_math_17k"``, ``"math"``; the official evaluation
        sets ``"math500"``, ``"aime24"``, ``"matharena_aime25"``, ``"aimo_amc"``, ``"minerva_math"``,
        ``"olympiadbench"``; others (``"dapo_math_17k_raw"``, ``"gsm8k"``, ``"aime25"``, ``"amc23"``).
      split: an upstream split; default ``"train"`` where there is one, else the only split.
      data_dir: None loads from the Hugging Face hub. Otherwise local files in the upstream schema:
        ``<data_dir>/<name>/<split>.parquet`` (or ``.jsonl`` / ``.json``, or shards ``<split>-*.parquet``),
        e.g. ``data/gsm8k/test.parquet`` as downloaded from the hub.

    Returns:
      Every upstream row, in order (see :func:`deduplicate`). Columns ``problem`` (str, verbatim), ``answer``
      (str, gradeable by ``sfpo_jax.rewards.math_reward``), ``index`` (row of the upstream split) and the spec's
      ``keep`` columns.
    """
    spec = get_spec(name)
    split = split or spec.default_split
    if split not in spec.splits:
        raise ValueError(f"dataset {name!r} has no split {split!r}; splits: {list(spec.splits)}")
    import datasets

    if data_dir is None:
        raw = datasets.load_dataset(spec.repo_id, spec.config, split=split)
    else:
        builder, files = _local_files(data_dir, spec, split)
        raw = datasets.load_dataset(builder, data_files={split: files}, split=split)
    return to_problems(raw, spec, split)


def prompt_template(prompt: str) -> str:
    """The user-message template of ``prompt``: a name in ``PROMPTS`` or a template containing ``{problem}``."""
    if prompt in PROMPTS:
        return PROMPTS[prompt]
    if "{problem}" not in prompt:
        raise ValueError(
            f"prompt must be one of {sorted(PROMPTS)} or a template containing '{{problem}}', got {prompt!r}"
        )
    return prompt


def user_message(problem: str, prompt: str = "boxed") -> str:
    """The user message for ``problem``: the template of ``prompt`` with ``{problem}`` replaced by it, verbatim."""
    return prompt_template(prompt).replace("{problem}", problem)


def render_prompt(
    problem: str,
    tokenizer: Any = None,
    *,
    prompt: str = "boxed",
    chat_template: bool = True,
    system: str | None = None,
) -> str:
    """The prompt text for ``problem``: its user message (see ``PROMPTS``) wrapped in the tokenizer's chat template.

    The chat template is used when ``chat_template`` is True and ``tokenizer`` has one, as a single user turn with
    the generation prompt appended (verl's ``RLHFDataset``: ``apply_chat_template(chat, add_generation_prompt=True,
    tokenize=False)``), so the model continues as the assistant; otherwise the plain user message is returned (base
    models without a template). ``system`` adds a system message under a chat template and is prepended as a
    paragraph otherwise.
    """
    content = user_message(problem, prompt)
    if chat_template and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system}\n\n{content}" if system else content


def deduplicate(ds: datasets.Dataset) -> datasets.Dataset:
    """``ds`` without the rows whose problem text (whitespace-stripped) repeats an earlier row's; order kept."""
    seen: set[str] = set()
    keep = []
    for i, problem in enumerate(ds["problem"]):
        key = problem.strip()
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return ds if len(keep) == len(ds) else ds.select(keep)
