"""Prompt data: the arithmetic generator, local files, the real MATH train file, the sampler, prompt rendering."""

import json
import re

import pytest

from aapo_app.data import (
    DataConfig,
    PromptExample,
    PromptSampler,
    arithmetic_examples,
    load_examples,
    normalize_answer,
    render_prompt,
)
from aapo_app.errors import AapoError

ARITH = re.compile(r"^What is (\d+) ([-+*]) (\d+)\? Put the final answer in \\boxed\{\}\.$")


def _check_arithmetic(examples):
    for ex in examples:
        m = ARITH.match(ex.problem)
        assert m, ex.problem
        a, op, b = int(m[1]), m[2], int(m[3])
        expected = {"+": a + b, "-": a - b, "*": a * b}[op]
        assert ex.answer == str(expected), ex


# ---------------------------------------------------------------------------------------------------
# Arithmetic generator


def test_arithmetic_problem_text_and_answer():
    examples = arithmetic_examples(9, "+")
    by_id = {ex.id: ex for ex in examples}
    assert by_id["arith:3+4"] == PromptExample("arith:3+4", "What is 3 + 4? Put the final answer in \\boxed{}.", "7")
    assert len(examples) == 10 * 10  # a, b in 0..9


def test_arithmetic_split_deterministic_disjoint_and_correct():
    cfg = DataConfig(arithmetic_ops="+", eval_size=20)
    train, eval_ = load_examples(cfg, seed=0)
    assert (len(train), len(eval_)) == (80, 20)
    assert load_examples(cfg, seed=0) == (train, eval_)  # same seed, same lists
    train1, eval1 = load_examples(cfg, seed=1)
    assert [ex.id for ex in train1] != [ex.id for ex in train]  # another seed, another order and split
    assert {ex.id for ex in eval1} != {ex.id for ex in eval_}
    for tr, ev in ((train, eval_), (train1, eval1)):
        assert not {ex.problem for ex in tr} & {ex.problem for ex in ev}
        assert {ex.id for ex in tr} | {ex.id for ex in ev} == {ex.id for ex in arithmetic_examples(9, "+")}
        _check_arithmetic(tr + ev)


def test_arithmetic_all_ops():
    cfg = DataConfig(arithmetic_ops="+-*", arithmetic_max_operand=4, eval_size=5)
    train, eval_ = load_examples(cfg, seed=3)
    assert len(train) + len(eval_) == 3 * 5 * 5
    _check_arithmetic(train + eval_)
    by_problem = {ex.problem: ex.answer for ex in train + eval_}
    assert by_problem["What is 2 - 4? Put the final answer in \\boxed{}."] == "-2"
    assert by_problem["What is 3 * 4? Put the final answer in \\boxed{}."] == "12"
    assert {m[2] for m in (ARITH.match(p) for p in by_problem)} == {"+", "-", "*"}


def test_arithmetic_max_train_examples():
    train, eval_ = load_examples(DataConfig(max_train_examples=7, eval_size=3), seed=0)
    assert (len(train), len(eval_)) == (7, 3)


def test_arithmetic_eval_size_leaves_nothing():
    with pytest.raises(AapoError, match=r"data\.eval_size: .*leaves no training prompts .*arithmetic_max_operand"):
        load_examples(DataConfig(arithmetic_max_operand=1, arithmetic_ops="+", eval_size=4), seed=0)  # 2 × 2 problems


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        ({"eval_size": 0}, r"^data\.eval_size: must be an integer >= 1"),
        ({"prompt_template": "Solve: {question}"}, r"^data\.prompt_template: must contain '\{problem\}'"),
        ({"arithmetic_ops": "+/"}, r"^data\.arithmetic_ops: must be a non-empty subset of '\+-\*'"),
        ({"arithmetic_ops": "++"}, r"^data\.arithmetic_ops: each operator may appear once"),
        ({"arithmetic_max_operand": -1}, r"^data\.arithmetic_max_operand: must be an integer >= 0"),
        ({"max_train_examples": 0}, r"^data\.max_train_examples: must be an integer >= 1"),
        ({"problem_column": ""}, r"^data\.problem_column: must be a non-empty string"),
        ({"eval_source": "arithmetic"}, r"^data\.eval_source: the eval prompts would be the training prompts"),
    ],
)
def test_validate_errors(kwargs, pattern):
    with pytest.raises(AapoError, match=pattern):
        DataConfig(**kwargs).validate()


# ---------------------------------------------------------------------------------------------------
# Local files


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"question": "1+1?", "solution": 2.0, "unique_id": "q/1"},
    {"question": "x^2=4, x>0?", "solution": "2", "unique_id": "q/2"},
    {"question": "Roots of x^2=1?", "solution": ["-1", "1"], "unique_id": "q/3"},
    {"question": "\\frac{1}{2}+\\frac{1}{2}?", "solution": "\\frac{2}{2}", "unique_id": "q/4"},
    {"question": "2.5*2?", "solution": 5, "unique_id": "q/5"},
    {"question": "Half of 5?", "solution": 2.5, "unique_id": "q/6"},
]
EXPECTED = {"q/1": "2", "q/2": "2", "q/3": "-1, 1", "q/4": "\\frac{2}{2}", "q/5": "5", "q/6": "2.5"}


def _load_all(source, **kwargs):
    cfg = DataConfig(source=str(source), problem_column="question", answer_column="solution", eval_size=2, **kwargs)
    return load_examples(cfg, seed=0)


def test_jsonl_columns_ids_and_answer_normalisation(tmp_path):
    train, eval_ = _load_all(_write_jsonl(tmp_path / "d.jsonl", ROWS))
    assert (len(train), len(eval_)) == (4, 2)
    assert {ex.id: ex.answer for ex in train + eval_} == EXPECTED
    assert {ex.problem for ex in train + eval_} == {r["question"] for r in ROWS}


def test_parquet_file(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = [{"problem": f"p{i}", "answer": float(i)} for i in range(5)]
    path = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(path)
    train, eval_ = load_examples(DataConfig(source=str(path), eval_size=1), seed=0)
    got = sorted((ex.id, ex.problem, ex.answer) for ex in train + eval_)
    assert got == [(str(i), f"p{i}", str(i)) for i in range(5)]  # ids are row indices, 3.0 → "3"


@pytest.mark.parametrize("layout", ["list", "data", "columns", "jsonl_as_json"])
def test_json_layouts(tmp_path, layout):
    rows = [{"problem": f"p{i}", "answer": i, "id": f"id{i}"} for i in range(4)]
    path = tmp_path / "d.json"
    if layout == "list":
        path.write_text(json.dumps(rows))
    elif layout == "data":
        path.write_text(json.dumps({"version": 1, "data": rows}))
    elif layout == "columns":
        path.write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    else:
        _write_jsonl(path, rows)
    train, eval_ = load_examples(DataConfig(source=str(path), eval_size=1), seed=0)
    assert sorted((ex.id, ex.problem, ex.answer) for ex in train + eval_) == [
        (f"id{i}", f"p{i}", str(i)) for i in range(4)
    ]


def test_directory_with_splits(tmp_path):
    _write_jsonl(tmp_path / "train.jsonl", [{"problem": f"t{i}", "answer": "1"} for i in range(5)])
    _write_jsonl(tmp_path / "test.jsonl", [{"problem": f"e{i}", "answer": "2"} for i in range(3)])
    train, eval_ = load_examples(DataConfig(source=str(tmp_path), eval_size=2), seed=0)
    assert {ex.problem for ex in train + eval_} == {f"t{i}" for i in range(5)}
    # eval_split alone: eval prompts from another split of the same directory, training keeps all of train.
    train, eval_ = load_examples(DataConfig(source=str(tmp_path), eval_split="test", eval_size=2), seed=0)
    assert len(train) == 5 and len(eval_) == 2 and all(ex.problem.startswith("e") for ex in eval_)
    with pytest.raises(AapoError, match=r"^data\.split: no 'validation' files in .*; splits found: test, train$"):
        load_examples(DataConfig(source=str(tmp_path), split="validation"), seed=0)


def test_eval_source_other_file(tmp_path):
    train_file = _write_jsonl(tmp_path / "a.jsonl", [{"problem": f"p{i}", "answer": "1"} for i in range(6)])
    eval_file = _write_jsonl(tmp_path / "b.jsonl", [{"problem": f"p{i}", "answer": "1"} for i in range(4, 20)])
    train, eval_ = load_examples(DataConfig(source=str(train_file), eval_source=str(eval_file), eval_size=5), seed=0)
    assert len(eval_) == 5
    # Training prompts that are also eval prompts are dropped: the two sets never share a problem.
    assert not {ex.problem for ex in train} & {ex.problem for ex in eval_}
    assert len(train) == 6 - len({ex.problem for ex in eval_} & {"p4", "p5"})


def test_rows_without_answer_are_skipped(tmp_path):
    rows = [{"problem": "a", "answer": None}, {"problem": "b", "answer": ""}] + [
        {"problem": f"p{i}", "answer": "1"} for i in range(3)
    ]
    train, eval_ = load_examples(DataConfig(source=str(_write_jsonl(tmp_path / "d.jsonl", rows)), eval_size=1), seed=0)
    assert sorted(ex.problem for ex in train + eval_) == ["p0", "p1", "p2"]
    assert sorted(ex.id for ex in train + eval_) == ["2", "3", "4"]  # ids stay the row indices of the file


def test_missing_column_error_names_column_and_lists_available(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    with pytest.raises(AapoError) as info:
        load_examples(DataConfig(source=str(path), problem_column="problem"), seed=0)
    assert str(info.value) == (
        f"data.problem_column: column 'problem' not found in {path}; available: question, solution, unique_id"
    )
    with pytest.raises(AapoError, match=r"^data\.answer_column: column 'answer' not found .*available: question"):
        load_examples(DataConfig(source=str(path), problem_column="question"), seed=0)


def test_missing_file_error(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(AapoError) as info:
        load_examples(DataConfig(source=str(missing)), seed=0)
    assert str(info.value) == (
        f"data.source: no file or directory '{missing}'; "
        "give a local .jsonl/.json/.parquet path, a hub dataset id, or 'arithmetic'"
    )
    with pytest.raises(AapoError, match=r"^data\.eval_source: no file or directory"):
        load_examples(DataConfig(eval_source=str(missing)), seed=0)


@pytest.mark.parametrize("name, content", [("e.jsonl", ""), ("e.json", "[]"), ("e.json", "")])
def test_empty_file_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(AapoError, match=r"^data\.source: '.*e\.jsonl?' has no examples"):
        load_examples(DataConfig(source=str(path)), seed=0)


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("bad.jsonl", '{"problem": "a", "answer": "1"}\n{"problem": \n', r"^data\.source: '.*' line 2 is not valid JSON"),
        ("bad.json", '{"problem": ', r"^data\.source: '.*' is not valid JSON"),
        ("bad.json", '"just a string"', r"^data\.source: cannot find records in"),
        ("bad.parquet", "not parquet", r"^data\.source: cannot read '.*bad\.parquet'"),
        ("bad.csv", "problem,answer\n", r"^data\.source: unsupported file type '\.csv'"),
    ],
)
def test_unreadable_file_errors(tmp_path, name, content, pattern):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(AapoError, match=pattern) as info:
        load_examples(DataConfig(source=str(path)), seed=0)
    assert "\n" not in str(info.value)


def test_hub_failure_is_one_line_error(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub\n(LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(AapoError) as info:
        load_examples(DataConfig(source="owner/name", split="test"), seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data.source: could not load hub dataset 'owner/name' (split 'test'): Couldn't reach")
    assert "offline" in message and "local .jsonl/.json/.parquet" in message


def test_hub_loader_reads_a_dataset_through_load_dataset(tmp_path):
    """The hub path is datasets.load_dataset; a local data directory goes through the same call offline."""
    from aapo_app.data import _load_hub

    _write_jsonl(tmp_path / "train.jsonl", [{"problem": "p", "answer": 27.0}])
    rows, columns = _load_hub(str(tmp_path), "train", "source")
    assert rows == [{"problem": "p", "answer": 27.0}] and columns == ["problem", "answer"]


@pytest.mark.parametrize("value, text", [(27.0, "27"), (25, "25"), ("025", "025"), (0.5, "0.5"),
                                         (["$2$", "$3$"], "$2$, $3$"), (" \\frac{1}{2} ", "\\frac{1}{2}"),
                                         (None, ""), (float("nan"), "")])
def test_normalize_answer(value, text):
    assert normalize_answer(value) == text


# ---------------------------------------------------------------------------------------------------
# The real MATH train file in ../shared


def test_math_train_file(shared_dir):
    path = shared_dir / "datasets" / "math_train" / "math_train.json"
    train, eval_ = load_examples(DataConfig(source=str(path), eval_size=32), seed=0)
    # 7474 rows; 4 have no gold answer (null in rows 886 and 1009, "" in rows 5328 and 5330) and are skipped.
    assert len(eval_) == 32 and len(train) + len(eval_) == 7474 - 4
    assert not {ex.id for ex in train} & {ex.id for ex in eval_}
    assert {ex.id for ex in train + eval_} == {str(i) for i in range(7474)} - {"886", "1009", "5328", "5330"}
    first = next(ex for ex in train + eval_ if ex.id == "0")
    assert first.answer == "0" and first.problem.startswith("Let \\[f(x) = \\left\\{")
    assert load_examples(DataConfig(source=str(path), eval_size=32), seed=0) == (train, eval_)

    # Columns are configurable: train on the subject name as "answer".
    train2, eval2 = load_examples(
        DataConfig(source=str(path), answer_column="type", eval_size=10, max_train_examples=100), seed=1
    )
    assert (len(train2), len(eval2)) == (100, 10)
    assert {ex.answer for ex in train2} <= {
        "Algebra", "Counting & Probability", "Geometry", "Intermediate Algebra",
        "Number Theory", "Prealgebra", "Precalculus",
    }
    with pytest.raises(AapoError, match=r"^data\.problem_column: column 'question' not found in .*math_train\.json; "
                                        r"available: problem, answer, difficulty, type$"):
        load_examples(DataConfig(source=str(path), problem_column="question"), seed=0)


# ---------------------------------------------------------------------------------------------------
# PromptSampler


def _examples(n):
    return [PromptExample(id=str(i), problem=f"p{i}", answer=str(i)) for i in range(n)]


def test_sampler_ranks_disjoint_and_cover_global_batch():
    examples = _examples(10)
    ranks = [PromptSampler(examples, prompts_per_rank=3, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(20):  # steps 1, 3, 4, 6, ... cross epoch boundaries (6 per step, 10 per epoch)
        a, b = (s.next_batch() for s in ranks)
        assert len(a) == len(b) == 3
        assert len({ex.id for ex in a + b}) == 6  # disjoint, and no prompt twice in a step
    # Together the two ranks read one global stream: concatenate per step, check epochs.
    stream = []
    ranks = [PromptSampler(examples, prompts_per_rank=3, rank=r, world_size=2, seed=5) for r in range(2)]
    for _ in range(10):  # 60 prompts = 6 epochs
        for s in ranks:
            stream.extend(ex.id for ex in s.next_batch())
    epochs = [stream[i : i + 10] for i in range(0, 60, 10)]
    for epoch in epochs:
        assert sorted(epoch, key=int) == [str(i) for i in range(10)]  # every example once per epoch
    assert len({tuple(e) for e in epochs}) > 1  # a fresh permutation each epoch
    assert ranks[0].epoch == 5


def test_sampler_is_deterministic_by_seed():
    def ids(seed):
        s = PromptSampler(_examples(20), prompts_per_rank=4, rank=0, world_size=1, seed=seed)
        return [ex.id for _ in range(5) for ex in s.next_batch()]

    assert ids(0) == ids(0)
    assert ids(0) != ids(1)


def test_sampler_state_dict_round_trip():
    examples = _examples(11)
    ref = PromptSampler(examples, prompts_per_rank=2, rank=1, world_size=2, seed=3)
    for _ in range(7):  # 28 prompts: into epoch 2, so resuming replays two boundary adjustments
        ref.next_batch()
    assert ref.epoch == 2
    state = json.loads(json.dumps(ref.state_dict()))  # survives a JSON checkpoint
    resumed = PromptSampler(examples, prompts_per_rank=2, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    assert [resumed.next_batch() for _ in range(9)] == [ref.next_batch() for _ in range(9)]
    assert resumed.state_dict() == ref.state_dict()

    other_data = PromptSampler(_examples(12), prompts_per_rank=2, rank=1, world_size=2, seed=3)
    with pytest.raises(AapoError, match=r"^resume: .*same data config"):
        other_data.load_state_dict(state)
    other_seed = PromptSampler(examples, prompts_per_rank=2, rank=1, world_size=2, seed=4)
    with pytest.raises(AapoError, match=r"^resume: .*same seed"):
        other_seed.load_state_dict(state)


def test_sampler_too_few_examples():
    with pytest.raises(AapoError, match=r"has 5 prompts but one step takes 6 \(prompts_per_rank 3 × world_size 2\)"):
        PromptSampler(_examples(5), prompts_per_rank=3, rank=0, world_size=2, seed=0)
    with pytest.raises(AapoError, match=r"^rank must be in 0\.\.1"):
        PromptSampler(_examples(5), prompts_per_rank=1, rank=2, world_size=2, seed=0)


# ---------------------------------------------------------------------------------------------------
# render_prompt


def test_render_prompt_chat_template(smollm2_tokenizer):
    problem = "What is 3 + 4? Put the final answer in \\boxed{}."
    text = render_prompt(smollm2_tokenizer, problem, DataConfig(use_chat_template=True))
    assert text.endswith(f"<|im_start|>user\n{problem}<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")  # SmolLM2's template adds its own default system turn

    cfg = DataConfig(system_prompt="Think step by step.", prompt_template="Problem: {problem}\nAnswer in \\boxed{}.",
                     use_chat_template=True)
    text = render_prompt(smollm2_tokenizer, "1+1?", cfg)
    assert text == (
        "<|im_start|>system\nThink step by step.<|im_end|>\n"
        "<|im_start|>user\nProblem: 1+1?\nAnswer in \\boxed{}.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_prompt_plain_text(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    tokenizer.chat_template = None
    cfg = DataConfig(system_prompt="Be brief.", prompt_template="Q: {problem}")
    assert render_prompt(tokenizer, "1+1?", cfg) == "Be brief.\n\nQ: 1+1?\n"
    assert render_prompt(tokenizer, "1+1?", DataConfig()) == "1+1?\n"
    # use_chat_template=False gives plain text even with a chat template.
    tokenizer.chat_template = "{{ messages }}"
    assert render_prompt(tokenizer, "1+1?", DataConfig(use_chat_template=False)) == "1+1?\n"


def test_use_chat_template_null_means_datasets_yes_arithmetic_no(smollm2_tokenizer, tmp_path):
    # The default (null) asks the built-in arithmetic task as plain text and templates every dataset;
    # an explicit true/false wins, and validate() writes the resolved value into the config.
    problem = "What is 3 + 4? Put the final answer in \\boxed{}."
    assert render_prompt(smollm2_tokenizer, problem, DataConfig()) == problem + "\n"
    data = DataConfig(source=str(tmp_path / "d.jsonl"))
    assert render_prompt(smollm2_tokenizer, problem, data).endswith("<|im_start|>assistant\n")
    assert render_prompt(smollm2_tokenizer, problem, DataConfig(use_chat_template=True)).endswith("assistant\n")
    for cfg, resolved in ((DataConfig(), False), (data, True), (DataConfig(use_chat_template=True), True)):
        cfg.validate()
        assert cfg.use_chat_template is resolved
    with pytest.raises(AapoError, match=r"^data\.use_chat_template: must be true, false or null"):
        DataConfig(use_chat_template="yes").validate()
