"""Prompt data: where the training and held-out prompts come from, how they are batched, how they are rendered.

Three things live here:

- :func:`load_examples` turns a :class:`DataConfig` into ``(train, eval)`` lists of
  :class:`PromptExample` (id, problem text, gold answer as a string). The source is the built-in
  arithmetic generator, a local ``.jsonl`` / ``.json`` / ``.parquet`` file or a directory of such
  files, or a Hugging Face hub dataset id. The eval prompts are held out from the same source
  (``data.eval_size`` of them, chosen by seed, disjoint from the training prompts) unless
  ``data.eval_source`` / ``data.eval_split`` name other data.
- :class:`PromptSampler` hands each data-parallel rank its prompts for the next step: each epoch is a
  fresh seeded permutation of all training prompts, every step takes the next
  ``prompts_per_rank × world_size`` of them (wrapping into the next epoch), and rank ``r`` gets the
  ``r``-th slice. Every rank builds the same permutation from the seed, so no communication is needed;
  ``state_dict()`` makes a resumed run continue exactly.
- :func:`render_prompt` turns a problem into the text the policy sees: ``data.prompt_template``, then
  the tokenizer's chat template (with ``data.system_prompt`` as the system message when set), or a
  plain-text layout for tokenizers without one.

Rows whose problem or gold answer is missing (null or empty) are skipped with a warning: without a gold
answer the accuracy reward is 0 for every sample of the group, so the prompt only costs rollouts.
"""

import hashlib
import json
import logging
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from aapo_app.errors import AapoError

logger = logging.getLogger(__name__)

ARITHMETIC = "arithmetic"
SUPPORTED_SUFFIXES = (".jsonl", ".json", ".parquet")
ID_COLUMNS = ("id", "unique_id")
_ARITHMETIC_OPS = "+-*"
_KNOWN_SPLITS = ("train", "test", "validation", "valid", "val", "dev", "eval")
_SOURCE_HINT = "give a local .jsonl/.json/.parquet path, a hub dataset id, or 'arithmetic'"


@dataclass(frozen=True)
class PromptExample:
    """One prompt: a stable id, the problem text, and the gold answer as a string (LaTeX kept as is)."""

    id: str
    problem: str
    answer: str


# Dataset adapters for the paper's training sets (data.preset). Keys set explicitly in the run config
# win. Column names: knoveleng/open-rs has problem / solution / answer / level; the SimpleRL-Zoo-Data
# level 3-5 sets are read through their question / gt_answer columns (as the AAPO authors' loader
# does). math_train_level3to5 reads MATH train from wherever the user keeps it: data.source names the
# file, directory or hub dataset (columns problem / answer / difficulty, levels 1-5 as numbers or as
# "Level N"), and the preset keeps difficulty >= 3. It names no source itself, so data.source is required.
DATA_PRESETS: dict[str, dict[str, Any]] = {
    "open-rs": {"source": "knoveleng/open-rs", "split": "train", "problem_column": "problem",
                "answer_column": "answer"},
    "simplelr_qwen_level3to5": {"source": "hkust-nlp/SimpleRL-Zoo-Data", "data_dir": "simplelr_qwen_level3to5",
                                "split": "train", "problem_column": "question", "answer_column": "gt_answer"},
    "simplelr_abel_level3to5": {"source": "hkust-nlp/SimpleRL-Zoo-Data", "data_dir": "simplelr_abel_level3to5",
                                "split": "train", "problem_column": "question", "answer_column": "gt_answer"},
    "math_train_level3to5": {"problem_column": "problem", "answer_column": "answer", "min_difficulty": 3,
                             "difficulty_column": "difficulty"},
}


def apply_data_preset(data: dict) -> dict:
    """Fill a raw ``data:`` mapping from its ``preset`` for every key it does not set itself."""
    name = data.get("preset")
    if name is None or name not in DATA_PRESETS:
        return data  # an unknown name is reported by DataConfig.validate
    preset = DATA_PRESETS[name]
    if "source" not in preset and "source" not in data:
        columns = ", ".join(preset[k] for k in ("problem_column", "answer_column", "difficulty_column") if k in preset)
        raise AapoError(f"data.source: data.preset={name} names no dataset; give data.source=<a .json/.jsonl/.parquet "
                        f"file, a directory of them or a hub dataset id> with columns {columns}")
    return {**preset, **data}


@dataclass
class DataConfig:
    """The ``data:`` section of a run config: which prompts to train and evaluate on, and how to render them."""

    source: str = field(
        default=ARITHMETIC,
        metadata={
            "help": "'arithmetic' (built-in generator), a local .jsonl/.json/.parquet file or a directory "
            "of such files, or a Hugging Face hub dataset id"
        },
    )
    """Where the training prompts come from."""

    split: str = field(
        default="train",
        metadata={
            "help": "split to load: the hub split, or in a directory the files named after it "
            "(train.jsonl, train-00000.parquet, train/...); ignored for single files and 'arithmetic'"
        },
    )
    """Dataset split of ``source``."""

    problem_column: str = field(default="problem", metadata={"help": "column holding the problem text"})
    """Column with the problem text."""

    answer_column: str = field(
        default="answer",
        metadata={"help": "column holding the gold answer (numbers and lists are turned into strings)"},
    )
    """Column with the gold answer; 27.0 becomes "27", a list becomes "a, b"."""

    system_prompt: Optional[str] = field(
        default=None, metadata={"help": "system message put before every prompt; none when null"}
    )
    """System message; with a chat template it is the ``system`` turn."""

    prompt_template: str = field(
        default="{problem}",
        metadata={"help": "user message; '{problem}' is replaced by the problem text, other braces are kept"},
    )
    """User message template. Only ``{problem}`` is substituted (literally, not with str.format)."""

    data_dir: Optional[str] = field(
        default=None,
        metadata={"help": "hub datasets: the folder inside the dataset repo to load (data_dir of datasets.load_dataset), "
                          "e.g. simplelr_qwen_level3to5 of hkust-nlp/SimpleRL-Zoo-Data"},
    )
    """Sub-folder of a hub dataset repository."""

    min_difficulty: Optional[float] = field(
        default=None,
        metadata={"help": "keep only rows whose data.difficulty_column is >= this (e.g. 3 for MATH levels 3-5); all when null"},
    )
    """Difficulty filter, applied before the eval prompts are held out."""

    difficulty_column: str = field(
        default="difficulty", metadata={"help": "column read by data.min_difficulty ('Level 4' counts as 4)"}
    )
    """Column with a number, or text ending in a number (MATH's "Level 4")."""

    preset: Optional[str] = field(
        default=None,
        metadata={"help": "a named dataset adapter that fills source, data_dir, columns and filters not set "
                          "explicitly: " + ", ".join(["open-rs", "simplelr_qwen_level3to5", "simplelr_abel_level3to5",
                                                      "math_train_level3to5"])},
    )
    """Named adapter (:data:`DATA_PRESETS`); keys given explicitly win over the preset's."""

    use_chat_template: Optional[bool] = field(
        default=None,
        metadata={"help": "wrap the prompt in the tokenizer's chat template when it has one; null: yes for datasets, "
                          "no for the built-in arithmetic task (asked as plain text)"},
    )
    """Apply the tokenizer's chat template; plain text when false or when the tokenizer has none. Null
    (the default) resolves to true for every dataset and to false for ``source: arithmetic``: the
    default run asks its questions as plain text, which SmolLM2-135M-Instruct mostly continues
    instead of answering (about 30 % correct) and learns to answer within 12 steps. Through the
    chat template it answers 72-88 % of one-digit sums before any training, leaving little to learn."""

    eval_size: int = field(
        default=100,
        metadata={"help": "number of held-out eval prompts, chosen by seed and disjoint from the training prompts"},
    )
    """Held-out prompts. Taken from ``source`` unless ``eval_source`` / ``eval_split`` is set."""

    eval_source: Optional[str] = field(
        default=None,
        metadata={"help": "take the eval prompts from this source instead of holding them out of data.source"},
    )
    """Other source for the eval prompts (same forms as ``source``); ``eval_size`` of them are used."""

    eval_split: Optional[str] = field(
        default=None,
        metadata={"help": "split for the eval prompts (default: data.split); alone, it takes eval from another split of data.source"},
    )
    """Split of the eval source. Set alone, the eval prompts come from this split of ``source``."""

    max_train_examples: Optional[int] = field(
        default=None, metadata={"help": "use at most this many training prompts (a seeded subset); all when null"}
    )
    """Cap on the training set, applied after the eval prompts are held out."""

    arithmetic_max_operand: int = field(
        default=9, metadata={"help": "arithmetic generator: operands run from 0 to this value"}
    )
    """Largest operand of the arithmetic generator (operands are 0..N)."""

    arithmetic_ops: str = field(
        default="+*", metadata={"help": "arithmetic generator: operators to use, a subset of '+-*'"}
    )
    """Operators of the arithmetic generator."""

    def validate(self) -> None:
        """Raise :class:`AapoError` naming the first bad field and how to fix it."""
        for name in ("source", "split", "problem_column", "answer_column"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise AapoError(f"data.{name}: must be a non-empty string (got {value!r})")
        if self.preset is not None and self.preset not in DATA_PRESETS:
            raise AapoError(f"data.preset: unknown preset {self.preset!r}; choose from {', '.join(DATA_PRESETS)}")
        for name in ("eval_source", "eval_split", "data_dir"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise AapoError(f"data.{name}: must be a non-empty string or null (got {value!r})")
        if "{problem}" not in self.prompt_template:
            raise AapoError(
                f"data.prompt_template: must contain '{{problem}}' where the problem text goes "
                f"(got {self.prompt_template!r})"
            )
        if self.use_chat_template is not None and not isinstance(self.use_chat_template, bool):
            raise AapoError(f"data.use_chat_template: must be true, false or null (got {self.use_chat_template!r})")
        self.use_chat_template = wants_chat_template(self)
        if not _is_int(self.eval_size) or self.eval_size < 1:
            raise AapoError(f"data.eval_size: must be an integer >= 1 (got {self.eval_size!r})")
        if self.max_train_examples is not None and (
            not _is_int(self.max_train_examples) or self.max_train_examples < 1
        ):
            raise AapoError(
                f"data.max_train_examples: must be an integer >= 1, or null for all (got {self.max_train_examples!r})"
            )
        if not _is_int(self.arithmetic_max_operand) or self.arithmetic_max_operand < 0:
            raise AapoError(
                f"data.arithmetic_max_operand: must be an integer >= 0 (got {self.arithmetic_max_operand!r})"
            )
        ops = self.arithmetic_ops
        if not isinstance(ops, str) or not ops or any(op not in _ARITHMETIC_OPS for op in ops):
            raise AapoError(
                f"data.arithmetic_ops: must be a non-empty subset of '{_ARITHMETIC_OPS}' (got {ops!r})"
            )
        if len(set(ops)) != len(ops):
            raise AapoError(f"data.arithmetic_ops: each operator may appear once (got {ops!r})")
        if self.eval_source is not None or self.eval_split is not None:
            if _same_data(self.source, self.split, self.eval_source or self.source, self.eval_split or self.split):
                raise AapoError(
                    "data.eval_source: the eval prompts would be the training prompts themselves; "
                    "leave data.eval_source and data.eval_split null to hold out data.eval_size prompts, "
                    "or name other data"
                )


def wants_chat_template(cfg: Any) -> bool:
    """``cfg.use_chat_template``, with null resolved: true for datasets, false for the built-in
    arithmetic task (``cfg`` is a :class:`DataConfig` or ``aapo eval``'s settings)."""
    value = getattr(cfg, "use_chat_template", True)
    if value is None:
        return getattr(cfg, "source", None) != ARITHMETIC
    return bool(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _same_data(source: str, split: str, eval_source: str, eval_split: str) -> bool:
    if source != eval_source:
        return False
    # The generator and single files have no splits: any split names the same data.
    if source == ARITHMETIC or Path(source).expanduser().is_file():
        return True
    return split == eval_split


# ----------------------------------------------------------------------------------------------------
# Loading


def load_examples(cfg: DataConfig, seed: int) -> tuple[list[PromptExample], list[PromptExample]]:
    """Load ``(train, eval)`` prompts for ``cfg``, deterministically by ``seed``.

    Without ``eval_source`` / ``eval_split``: all examples of ``source`` are shuffled by seed, the first
    ``eval_size`` are the eval prompts and the rest (at most ``max_train_examples``) the training prompts.
    With them: the training prompts are all of ``source`` (shuffled by seed, capped), the eval prompts
    ``eval_size`` examples of the eval data chosen by seed. In both cases training examples whose problem
    text is also an eval problem are dropped, so the two sets never share a prompt.
    """
    cfg.validate()
    examples = _load_source(cfg, cfg.source, cfg.split, "source")
    separate_eval = cfg.eval_source is not None or cfg.eval_split is not None
    shuffled = _seeded_shuffle(examples, seed, "split")
    if separate_eval:
        eval_field = "eval_source" if cfg.eval_source is not None else "eval_split"
        eval_pool = _load_source(cfg, cfg.eval_source or cfg.source, cfg.eval_split or cfg.split, eval_field)
        eval_examples = _seeded_shuffle(eval_pool, seed, "eval")[: cfg.eval_size]
        train = shuffled
    else:
        if len(examples) <= cfg.eval_size:
            hint = (
                "raise data.arithmetic_max_operand or add operators to data.arithmetic_ops"
                if cfg.source == ARITHMETIC
                else "use more data"
            )
            raise AapoError(
                f"data.eval_size: holding out {cfg.eval_size} eval prompts leaves no training prompts "
                f"({len(examples)} examples in {cfg.source!r}); lower data.eval_size or {hint}"
            )
        eval_examples, train = shuffled[: cfg.eval_size], shuffled[cfg.eval_size :]

    eval_problems = {ex.problem for ex in eval_examples}
    kept = [ex for ex in train if ex.problem not in eval_problems]
    if len(kept) < len(train):
        logger.warning("data: dropped %d training prompts that are also eval prompts", len(train) - len(kept))
    if not kept:
        raise AapoError(
            f"data.source: every training prompt of {cfg.source!r} is also an eval prompt; "
            "use other eval data (data.eval_source) or more training data"
        )
    if cfg.max_train_examples is not None:
        kept = kept[: cfg.max_train_examples]
    return kept, eval_examples


def _seeded_shuffle(items: Sequence[PromptExample], seed: int, purpose: str) -> list[PromptExample]:
    # A str seed is hashed with SHA-512 by random.Random: stable across runs and PYTHONHASHSEED.
    out = list(items)
    random.Random(f"aapo-data:{purpose}:{seed}").shuffle(out)
    return out


def _load_source(cfg: DataConfig, source: str, split: str, field_name: str) -> list[PromptExample]:
    """All examples of one source, in source order."""
    if source == ARITHMETIC:
        return arithmetic_examples(cfg.arithmetic_max_operand, cfg.arithmetic_ops)
    path = Path(source).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = _split_files(path, split, field_name)
    elif _looks_local(source):
        raise AapoError(f"data.{field_name}: no file or directory {source!r}; {_SOURCE_HINT}")
    else:
        rows, columns = _load_hub(source, split, field_name, cfg.data_dir)
        return _rows_to_examples(rows, columns, cfg, source, field_name)
    rows: list[dict] = []
    for file in files:
        rows.extend(_read_file(file, field_name))
    columns = _columns(rows)
    return _rows_to_examples(rows, columns, cfg, source, field_name)


def _looks_local(source: str) -> bool:
    """A path that does not exist, as opposed to a hub id such as ``owner/name``."""
    return (
        Path(source).suffix.lower() in SUPPORTED_SUFFIXES
        or source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or "\\" in source
    )


def _split_files(directory: Path, split: str, field_name: str) -> list[Path]:
    """The data files of ``split`` in ``directory`` (recursive).

    Files are matched to a split by name like the hub's layout: ``train.jsonl``, ``train-00000-of-00002.parquet``,
    ``train_part1.json`` or anything under a ``train/`` folder. If no file is named after any split, all files are
    the data; if some are but none after ``split``, that is an error.
    """
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix.lower() in SUPPORTED_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not files:
        raise AapoError(f"data.{field_name}: directory {str(directory)!r} has no .jsonl/.json/.parquet files")

    def split_of(p: Path) -> Optional[str]:
        names = [*p.relative_to(directory).parent.parts, p.stem]
        for name in names:
            low = name.lower()
            for s in sorted({split.lower(), *_KNOWN_SPLITS}, key=len, reverse=True):
                if low == s or low.startswith((s + "-", s + "_", s + ".")):
                    return s
        return None

    splits = {p: split_of(p) for p in files}
    if all(s is None for s in splits.values()):
        return files
    chosen = [p for p in files if splits[p] == split.lower()]
    if not chosen:
        found = ", ".join(sorted({s for s in splits.values() if s}))
        split_field = "eval_split" if field_name.startswith("eval") else "split"
        raise AapoError(
            f"data.{split_field}: no {split!r} files in {str(directory)!r}; splits found: {found}"
        )
    return chosen


def _read_file(path: Path, field_name: str) -> list[dict]:
    suffix = path.suffix.lower()
    where = str(path)
    try:
        if suffix == ".jsonl":
            return _read_jsonl(path, field_name)
        if suffix == ".json":
            return _read_json(path, field_name)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except AapoError:
        raise
    except (OSError, ValueError, UnicodeDecodeError) as exc:  # pyarrow.ArrowInvalid is a ValueError
        raise AapoError(f"data.{field_name}: cannot read {where!r}: {_one_line(exc)}") from exc
    raise AapoError(
        f"data.{field_name}: unsupported file type {suffix or '(none)'!r} for {where!r}; {_SOURCE_HINT}"
    )


def _read_jsonl(path: Path, field_name: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AapoError(
                    f"data.{field_name}: {str(path)!r} line {lineno} is not valid JSON ({exc.msg}); fix or remove it"
                ) from exc
            if not isinstance(row, dict):
                raise AapoError(
                    f"data.{field_name}: {str(path)!r} line {lineno} is a {type(row).__name__}, not a JSON object"
                )
            rows.append(row)
    return rows


def _read_json(path: Path, field_name: str) -> list[dict]:
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data":  # JSON Lines saved as .json
            return _read_jsonl(path, field_name)
        raise AapoError(
            f"data.{field_name}: {str(path)!r} is not valid JSON ({exc.msg} at line {exc.lineno})"
        ) from exc
    records = _records_of(data)
    if records is None:
        raise AapoError(
            f"data.{field_name}: cannot find records in {str(path)!r}; expected a list of objects, "
            '{"data": [...]}, or an object of equal-length column lists'
        )
    return records


def _records_of(data: Any) -> Optional[list[dict]]:
    """Records from the usual JSON layouts: ``[{..}, ..]``, ``{"data": [..]}`` (any single list key), columns."""
    if isinstance(data, list):
        return data if all(isinstance(r, dict) for r in data) else None
    if not isinstance(data, dict):
        return None
    for key in ("data", "rows", "examples", "records", "train"):
        if isinstance(data.get(key), list):
            return _records_of(data[key])
    lists = {k: v for k, v in data.items() if isinstance(v, list)}
    if len(lists) == 1:
        return _records_of(next(iter(lists.values())))
    if lists and len(lists) == len(data) and len({len(v) for v in lists.values()}) == 1:
        if not all(isinstance(x, dict) for v in lists.values() for x in v):
            n = len(next(iter(lists.values())))
            return [{k: v[i] for k, v in lists.items()} for i in range(n)]
    return None


def _load_hub(source: str, split: str, field_name: str, data_dir: str | None = None) -> tuple[list[dict], list[str]]:
    """Rows and column names of ``split`` of the hub dataset ``source`` via ``datasets.load_dataset``."""
    try:
        import datasets

        ds = datasets.load_dataset(source, split=split, data_dir=data_dir)
        return ds.to_list(), list(ds.column_names)
    except Exception as exc:  # network, missing dataset or split, bad schema: all user-fixable
        raise AapoError(
            f"data.{field_name}: could not load hub dataset {source!r} (split {split!r}): {_one_line(exc)}; "
            "offline, download it where there is network and point data.source at the local "
            ".jsonl/.json/.parquet file or directory"
        ) from exc


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _columns(rows: Iterable[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen.setdefault(key, None)
    return list(seen)


def _difficulty(value: Any) -> float | None:
    """A difficulty cell as a number: 3, 3.0, "3", "Level 3" -> 3.0; None when unreadable."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    match = re.search(r"(-?\d+(?:\.\d+)?)\s*$", str(value))
    return float(match.group(1)) if match else None


def _filter_difficulty(rows: list[dict], columns: list[str], cfg: DataConfig, where: str) -> list[dict]:
    if cfg.min_difficulty is None:
        return rows
    if cfg.difficulty_column not in columns:
        raise AapoError(f"data.difficulty_column: column {cfg.difficulty_column!r} not found in {where} "
                        f"(needed by data.min_difficulty); available: {', '.join(map(str, columns))}")
    kept = [r for r in rows if (_difficulty(r.get(cfg.difficulty_column)) or float("-inf")) >= cfg.min_difficulty]
    if not kept:
        raise AapoError(f"data.min_difficulty: no row of {where} has {cfg.difficulty_column} >= {cfg.min_difficulty}; "
                        f"lower it or set it to null")
    return kept


def _rows_to_examples(
    rows: list[dict], columns: list[str], cfg: DataConfig, where: str, field_name: str
) -> list[PromptExample]:
    if not rows:
        raise AapoError(f"data.{field_name}: {where!r} has no examples; point data.{field_name} at a non-empty dataset")
    rows = _filter_difficulty(rows, columns, cfg, where)
    for name in ("problem_column", "answer_column"):
        column = getattr(cfg, name)
        if column not in columns:
            raise AapoError(
                f"data.{name}: column {column!r} not found in {where}; available: {', '.join(map(str, columns))}"
            )
    id_column = next((c for c in ID_COLUMNS if c in columns), None)
    examples, skipped = [], 0
    for index, row in enumerate(rows):
        problem = normalize_answer(row.get(cfg.problem_column))
        answer = normalize_answer(row.get(cfg.answer_column))
        if not problem or not answer:
            skipped += 1
            continue
        raw_id = row.get(id_column) if id_column else None
        ex_id = normalize_answer(raw_id) if raw_id is not None else ""
        examples.append(PromptExample(id=ex_id or str(index), problem=problem, answer=answer))
    if skipped:
        logger.warning(
            "data: skipped %d of %d rows of %s with an empty %r or %r",
            skipped, len(rows), where, cfg.problem_column, cfg.answer_column,
        )
    if not examples:
        raise AapoError(
            f"data.answer_column: every row of {where} has an empty {cfg.problem_column!r} or "
            f"{cfg.answer_column!r}; check data.problem_column and data.answer_column"
        )
    return examples


def normalize_answer(value: Any) -> str:
    """A gold answer (or any cell) as a string: 27.0 → "27", 2.5 → "2.5", ["1", "2"] → "1, 2", None → "".

    Strings are only stripped of surrounding whitespace; LaTeX is kept as is. NaN counts as missing.
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return ""
        if value.is_integer():
            return str(int(value))
        return repr(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(s for s in (normalize_answer(v) for v in value) if s)
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return normalize_answer(value.item())
        except (TypeError, ValueError):
            pass
    return str(value).strip()


# ----------------------------------------------------------------------------------------------------
# Built-in arithmetic generator


def arithmetic_problem(a: int, op: str, b: int) -> str:
    """The prompt text for ``a op b``, e.g. ``What is 3 + 4? Put the final answer in \\boxed{}.``"""
    return f"What is {a} {op} {b}? Put the final answer in \\boxed{{}}."


def arithmetic_examples(max_operand: int = 9, ops: str = "+") -> list[PromptExample]:
    """All problems ``a op b`` with ``a, b`` in ``0..max_operand`` and ``op`` in ``ops``, in a fixed order.

    ``load_examples`` shuffles them by seed and holds out the eval prompts; ids read ``arith:3+4``.
    """
    results = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    return [
        PromptExample(id=f"arith:{a}{op}{b}", problem=arithmetic_problem(a, op, b), answer=str(results[op](a, b)))
        for op in ops
        for a in range(max_operand + 1)
        for b in range(max_operand + 1)
    ]


# ----------------------------------------------------------------------------------------------------
# Batching


class PromptSampler:
    """Deterministic per-rank prompt batches for data-parallel training.

    The global stream of prompts is epoch 0's order, then epoch 1's, ... (each a fresh permutation of all
    examples, seeded by ``(seed, epoch)``). Step ``k`` takes items ``[k·B, (k+1)·B)`` of that stream,
    ``B = prompts_per_rank × world_size``, and rank ``r`` gets items ``[r·prompts_per_rank,
    (r+1)·prompts_per_rank)`` of the step. So every example is used once per epoch, and ranks get disjoint
    prompts within a step.

    A step at an epoch boundary takes the end of one epoch and the start of the next. So that such a step
    never holds the same prompt twice, the next epoch's permutation is adjusted: the examples already in
    the step are moved (in permutation order) out of its first positions. Every rank computes the same
    orders from the seed, with no communication.

    The state is the epoch and the position in it, independent of the rank; ``load_state_dict`` rebuilds
    the epoch's order by replaying the permutations from epoch 0. Resume with the same global batch ``B``
    to continue exactly (another ``B`` changes the boundary adjustments of the current epoch).
    """

    def __init__(self, examples: Sequence[PromptExample], prompts_per_rank: int, rank: int, world_size: int, seed: int):
        if not _is_int(prompts_per_rank) or prompts_per_rank < 1:
            raise AapoError(f"prompts_per_rank must be an integer >= 1 (got {prompts_per_rank!r})")
        if not _is_int(world_size) or world_size < 1:
            raise AapoError(f"world_size must be an integer >= 1 (got {world_size!r})")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise AapoError(f"rank must be in 0..{world_size - 1} (got {rank!r})")
        self.examples = list(examples)
        self.prompts_per_rank = prompts_per_rank
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.global_batch = prompts_per_rank * world_size
        if len(self.examples) < self.global_batch:
            raise AapoError(
                f"data: the training set has {len(self.examples)} prompts but one step takes {self.global_batch} "
                f"(prompts_per_rank {prompts_per_rank} × world_size {world_size}); use more training data "
                "(data.source, data.max_train_examples, data.eval_size) or fewer prompts per step"
            )
        self._fingerprint = fingerprint(self.examples)
        self.epoch = 0
        self.position = 0  # index of the next example within this epoch's order
        self.step = 0
        self._order = self._epoch_order(0, [])

    def _epoch_order(self, epoch: int, previous: list[int]) -> list[int]:
        """Epoch ``epoch``'s order of example indices, given the previous epoch's order."""
        n, batch = len(self.examples), self.global_batch
        order = list(range(n))
        random.Random(f"aapo-sampler:{self.seed}:{epoch}").shuffle(order)
        straddle = (epoch * n) % batch  # examples of the previous epoch in the step that crosses into this one
        if epoch == 0 or straddle == 0:
            return order
        taken = set(previous[n - straddle :])
        need = batch - straddle  # n >= batch, so there are always enough examples not taken
        head: list[int] = []
        rest: list[int] = []
        for i in order:
            (head if len(head) < need and i not in taken else rest).append(i)
        return head + rest

    def next_batch(self) -> list[PromptExample]:
        """This rank's ``prompts_per_rank`` prompts for the next step."""
        n = len(self.examples)
        indices: list[int] = []
        while len(indices) < self.global_batch:
            if self.position == n:
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch, self._order)
            take = min(self.global_batch - len(indices), n - self.position)
            indices.extend(self._order[self.position : self.position + take])
            self.position += take
        self.step += 1
        start = self.rank * self.prompts_per_rank
        return [self.examples[i] for i in indices[start : start + self.prompts_per_rank]]

    def order_fingerprint(self) -> str:
        """:func:`fingerprint` of the first epoch's examples in the order they are drawn: two runs with
        equal ones train on the same prompts in the same order (``aapo compare`` checks its pairing
        with it)."""
        return fingerprint([self.examples[i] for i in self._epoch_order(0, [])])

    def state_dict(self) -> dict:
        """Plain-Python state (JSON-serialisable) to store in a checkpoint."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "step": self.step,
            "global_batch": self.global_batch,
            "num_examples": len(self.examples),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; the examples and seed must be those of the saved run."""
        if state.get("num_examples") != len(self.examples) or state.get("fingerprint") != self._fingerprint:
            raise AapoError(
                f"resume: the checkpoint's prompt sampler had {state.get('num_examples')} training prompts, "
                f"this run has {len(self.examples)} (or other ones); resume with the same data config and seed"
            )
        if state.get("seed") != self.seed:
            raise AapoError(
                f"resume: the checkpoint's prompt sampler used seed {state.get('seed')}, this run {self.seed}; "
                "resume with the same seed"
            )
        if state.get("global_batch") != self.global_batch:
            logger.warning(
                "resume: prompts per step changed from %s to %d; the current epoch continues approximately",
                state.get("global_batch"), self.global_batch,
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.step = int(state.get("step", 0))
        order = self._epoch_order(0, [])
        for epoch in range(1, self.epoch + 1):
            order = self._epoch_order(epoch, order)
        self._order = order


def fingerprint(examples: Sequence[PromptExample]) -> str:
    """16 hex digits of a SHA-256 over the examples' ids and problems, in order."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(ex.id.encode("utf-8") + b"\0" + ex.problem.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# Rendering


def render_prompt(tokenizer: Any, problem: str, cfg: DataConfig) -> str:
    """The text the policy is prompted with, in training and in evaluation alike (``cfg`` is the
    run's ``data`` section or ``aapo eval``'s settings: anything with ``prompt_template``,
    ``system_prompt`` and ``use_chat_template``).

    The user message is ``cfg.prompt_template`` with ``{problem}`` replaced. With ``cfg.use_chat_template``
    and a tokenizer that has a chat template, the result is
    ``apply_chat_template([system?, user], tokenize=False, add_generation_prompt=True)`` (the system
    turn only when ``cfg.system_prompt`` is set; the template may add its own default). Otherwise it is
    plain text: ``"{system_prompt}\\n\\n{user}\\n"``, or ``"{user}\\n"`` without a system prompt.
    """
    user = cfg.prompt_template.replace("{problem}", problem)
    if wants_chat_template(cfg) and getattr(tokenizer, "chat_template", None):
        messages = []
        if cfg.system_prompt:
            messages.append({"role": "system", "content": cfg.system_prompt})
        messages.append({"role": "user", "content": user})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if cfg.system_prompt:
        return f"{cfg.system_prompt}\n\n{user}\n"
    return f"{user}\n"


class PromptStyle:
    """:func:`render_prompt` for one tokenizer and one set of prompt settings, and how its prompts are
    tokenized: chat-templated text carries its special tokens already (``add_special_tokens`` is
    False then)."""

    def __init__(self, tokenizer: Any, cfg: Any):
        self.tokenizer, self.cfg = tokenizer, cfg
        self.chat = bool(wants_chat_template(cfg) and getattr(tokenizer, "chat_template", None))

    @property
    def add_special_tokens(self) -> bool:
        return not self.chat

    def render(self, problem: str) -> str:
        return render_prompt(self.tokenizer, problem, self.cfg)

    def lengths(self, prompts: list[str]) -> list[int]:
        """Each rendered prompt's length in tokens."""
        if not prompts:
            return []
        return [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=self.add_special_tokens)["input_ids"]]
