"""The paper's five math benchmarks: where each comes from and how its gold answer is read.

Each benchmark loads from its Hugging Face hub dataset by default, or from a local directory laid
out like the Qwen2.5-Math evaluation data (``<dir>/<local name>/test.jsonl``, e.g.
``aime24/test.jsonl``, ``minerva_math/test.jsonl``) with ``--data-dir``. Gold answers are
normalised into one bare answer string per problem:

* aime24: zero-padded strings ("025") lose their leading zeros;
* amc23: floats (27.0) become integers where they are whole ("27");
* math500: the ``answer`` field as is;
* minerva: the content of the last ``\\boxed{}`` in ``solution``;
* olympiadbench: ``final_answer`` (a list of strings, each possibly in ``$...$``) joined by
  commas; the ``unit`` field is kept beside it, not in it.

Minerva and OlympiadBench golds are LaTeX text: their unescaped ``$`` delimiters are dropped
(``$69$,$84$`` -> ``69,84``, ``$221,$8$`` -> ``221,8``, a stray ``$ $`` inside a boxed answer).

That bare gold is what results show and what ``aapo grade`` takes. ``aapo eval`` grades against
the gold as each protocol's reference reads it (:func:`reference_golds`): the lighteval protocol
extracts it from the reference's own gold column (MATH-500 and Minerva: the whole solution), the
simplerl protocol normalises it with the Qwen2.5-Math rules.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from aapo_app.answers import last_boxed
from aapo_app.errors import AapoError


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its hub source, its local file name, and the columns to read."""

    name: str
    hub_id: str
    hub_split: str
    local_name: str  # directory under --data-dir
    problem_columns: tuple[str, ...]  # first present column is the problem
    gold_column: str
    # lighteval protocol: the column the reference's prompt function hands to the metric as the gold
    # (first one present), and how the metric reads it ("latex" or "expr" extraction)
    lighteval_gold_columns: tuple[str, ...] = ("answer",)
    lighteval_gold_kind: str = "latex"


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("aime24", "HuggingFaceH4/aime_2024", "train", "aime24", ("problem", "question"), "answer",
                  ("answer",), "expr"),
        Benchmark("math500", "HuggingFaceH4/MATH-500", "test", "math500", ("problem",), "answer", ("solution",)),
        Benchmark("amc23", "knoveleng/AMC-23", "train", "amc23", ("problem", "question"), "answer", ("answer",), "expr"),
        Benchmark("minerva", "knoveleng/Minerva-Math", "train", "minerva_math", ("problem", "question"), "solution",
                  ("solution",)),
        # the hub dataset's gold is its `answer` column; the Qwen2.5-Math layout's is `final_answer`
        Benchmark("olympiadbench", "knoveleng/OlympiadBench", "train", "olympiadbench",
                  ("question", "problem"), "final_answer", ("answer", "final_answer")),
    )
}
# the paper's column order
BENCHMARK_ORDER = ("aime24", "math500", "amc23", "minerva", "olympiadbench")


@dataclass
class Problem:
    """One benchmark problem with its normalised gold answer."""

    benchmark: str
    id: str
    problem: str
    gold: str
    raw_gold: object = None
    extra: dict = field(default_factory=dict)  # e.g. olympiadbench's unit and answer type
    # protocol -> (gold text, gold kind) as that protocol's reference reads it (see reference_golds)
    reference: dict = field(default_factory=dict)


def parse_benchmark_names(spec: str) -> list[str]:
    """``all`` or a comma list -> benchmark names in the paper's order, validated."""
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    if not names:
        raise AapoError("--benchmarks: give 'all' or a comma list of " + ", ".join(BENCHMARK_ORDER))
    if names == ["all"]:
        return list(BENCHMARK_ORDER)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise AapoError(f"--benchmarks: unknown benchmark '{unknown[0]}'; choose from all, "
                        + ", ".join(BENCHMARK_ORDER))
    return [n for n in BENCHMARK_ORDER if n in names]


def normalize_gold(benchmark: str, row: dict) -> str:
    """The bare gold answer string of one row (see the module docstring for each benchmark)."""
    b = BENCHMARKS[benchmark]
    if b.gold_column not in row:
        raise AapoError(f"{benchmark}: a row has no '{b.gold_column}' column (columns: {', '.join(row)}); "
                        f"check --data-dir points at the benchmark files")
    value = row[b.gold_column]
    if benchmark == "minerva":
        gold = last_boxed(str(value))
        if gold is None:
            raise AapoError(f"minerva: a solution has no \\boxed{{}} answer: {str(value)[:80]!r}")
        return _strip_dollars(gold)
    if benchmark == "olympiadbench":
        items = value if isinstance(value, list) else [value]
        return ",".join(_strip_dollars(str(x)) for x in items)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    gold = str(value).strip()
    if benchmark == "aime24" and gold.isdigit():
        gold = str(int(gold))
    return gold


def reference_golds(benchmark: str, row: dict) -> dict[str, tuple[str, str]]:
    """The gold of one row as each protocol's reference reads it, with the grader's gold kind.

    * lighteval (open-rs ``evaluate.py`` under lighteval 0.8.1): the text of the column its prompt
      function passes as the gold, unnormalised: AIME24 and AMC23 ``answer`` (read as expressions;
      an AMC float is its ``str``, ``27.0``), MATH-500 and Minerva the whole ``solution`` and
      OlympiadBench ``answer`` (read as LaTeX; a local file in the Qwen2.5-Math layout has
      ``final_answer``, a list, whose items are joined by commas).
    * simplerl (SimpleRL-Zoo's Qwen2.5-Math evaluation): :func:`aapo_app.answers.reference_gold`.
    """
    from aapo_app.answers import reference_gold

    b = BENCHMARKS[benchmark]
    column = next((c for c in b.lighteval_gold_columns if c in row), None)
    if column is None:
        raise AapoError(f"{benchmark}: a row has none of the gold columns {', '.join(b.lighteval_gold_columns)} "
                        f"(columns: {', '.join(row)}); check --data-dir points at the benchmark files")
    value = row[column]
    text = ",".join(str(x) for x in value) if isinstance(value, list) else str(value)
    return {"lighteval": (text, b.lighteval_gold_kind), "simplerl": (reference_gold(benchmark, row), f"ref:{benchmark}")}


def _strip_dollars(s: str) -> str:
    """Drop the math delimiters of a gold written in LaTeX text: ``$x$`` -> ``x``, several answers
    ``$a$,$b$`` -> ``a,b``, a stray ``$ $`` inside an answer -> `` ``, a trailing full stop. Escaped
    dollars (``\\$``, currency) stay."""
    s = s.strip().rstrip(".").strip()
    s = re.sub(r"(?<!\\)\$\s*,\s*(?<!\\)\$", ",", s)
    return re.sub(r"(?<!\\)\$", "", s).strip()


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise AapoError(f"{path}: line {line_no} is not JSON ({exc.msg}); fix or remove it") from exc
    return rows


def _load_rows(b: Benchmark, data_dir: str | None) -> list[dict]:
    if data_dir:
        directory = Path(data_dir).expanduser() / b.local_name
        files = sorted(directory.glob("test.jsonl")) or sorted(directory.glob("*.jsonl"))
        if not files:
            folders = ", ".join(f"{x.local_name}/" for x in BENCHMARKS.values())
            raise AapoError(f"--data-dir: no {b.local_name}/test.jsonl under '{data_dir}'; give a directory with "
                            f"one folder of .jsonl files per benchmark ({folders}) or leave --data-dir out to "
                            f"use the hub")
        return _read_jsonl(files[0])
    try:
        import datasets

        splits = datasets.load_dataset(b.hub_id)
        split = b.hub_split if b.hub_split in splits else next(iter(splits)) if len(splits) == 1 else b.hub_split
        return list(splits[split])
    except Exception as exc:
        raise AapoError(f"{b.name}: cannot load {b.hub_id} from the hub ({str(exc).splitlines()[0][:120]}); "
                        f"pass --data-dir with local copies") from exc


def load_benchmark(name: str, data_dir: str | None = None, limit: int | None = None) -> list[Problem]:
    """The problems of one benchmark, in file order, gold answers normalised (first ``limit`` only)."""
    b = BENCHMARKS[name]
    rows = _load_rows(b, data_dir)
    if not rows:  # an average over no problems is NaN, and would poison the benchmark mean
        where = f"its file under --data-dir '{data_dir}'" if data_dir else f"{b.hub_id} on the hub"
        raise AapoError(f"{name}: {where} holds no problems; fix the file or leave {name} out of --benchmarks")
    if limit:
        rows = rows[:limit]
    problems = []
    for i, row in enumerate(rows):
        column = next((c for c in b.problem_columns if row.get(c)), None)
        if column is None:
            raise AapoError(f"{name}: row {i} has none of the problem columns {', '.join(b.problem_columns)}")
        extra = {k: row[k] for k in ("unit", "answer_type", "subject", "level", "type") if row.get(k) is not None}
        pid = row.get("id", row.get("unique_id", row.get("idx", i)))
        problems.append(Problem(name, str(pid), str(row[column]), normalize_gold(name, row), row[b.gold_column], extra,
                                reference_golds(name, row)))
    return problems
