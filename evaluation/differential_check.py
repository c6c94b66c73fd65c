"""Differential check: our graders against the reference implementations, verdict for verdict.

For every problem of the five benchmark files and a set of varied predictions per gold (the gold
boxed as the Qwen prompt asks, unboxed after "The answer is", with units as a bare word and in
``\\text{}``, inside ``\\text{}``, as decimals at 4, 5 and 6 places, as a fraction, a reordered
list, swapped interval brackets, and a wrong number), it grades each (gold, prediction) pair with

* ``aapo_app.grader`` under each protocol, the gold read as ``aapo eval`` reads it; and
* the protocol's reference, in its own virtual environment:
  - lighteval: ``lighteval==0.8.1`` with ``latex2sympy2_extended==1.0.6`` and ``sympy==1.13.3``,
    the metric open-rs ``evaluate.py`` builds (``multilingual_extractive_match_metric``, precision 5,
    gold targets LaTeX or expressions per benchmark, prediction targets expressions and LaTeX with the
    boxed match first);
  - simplerl: SimpleRL-Zoo's ``examples/simplelr_math_eval`` (``parser.py``, ``grader.py``, its
    bundled ``latex2sympy``) with ``sympy==1.12`` and ``antlr4-python3-runtime==4.11.1``, as its
    ``eval_math_nodes.sh`` installs them; ``parse_ground_truth`` reads the gold, ``extract_answer``
    then ``strip_string`` the prediction, ``math_equal`` decides (3 s per item, as its pool allows).

and prints the agreement per protocol and benchmark and every disagreement. It is not a test: it
needs the reference environments, which this script builds on request (PyPI only)::

    python evaluation/differential_check.py --setup /tmp/aapo-refs \\
        --simplerl-src <clone of hkust-nlp/simpleRL-reason>/examples/simplelr_math_eval
    python evaluation/differential_check.py --data-dir <benchmarks dir> --refs /tmp/aapo-refs \\
        --simplerl-src <...>/examples/simplelr_math_eval --out evaluation/results/differential_check.txt

Nothing of the references is copied into this repository: their code runs from its own install.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from fractions import Fraction
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LIGHTEVAL_PINS = ["torch==2.13.0", "lighteval==0.8.1", "latex2sympy2_extended==1.0.6", "sympy==1.13.3",
                  "datasets==3.3.2", "pyarrow==17.0.0"]
SIMPLERL_PINS = ["sympy==1.12", "antlr4-python3-runtime==4.11.1", "regex", "word2number", "numpy"]
# our benchmark name -> the Qwen2.5-Math evaluation's data name
SIMPLERL_DATA_NAME = {"aime24": "aime24", "math500": "math500", "amc23": "amc23", "minerva": "minerva_math",
                      "olympiadbench": "olympiadbench"}

# Runs inside the lighteval 0.8.1 environment: reads JSON lines {gold, kind, prediction}, writes verdicts.
LIGHTEVAL_RUNNER = r'''
import json, logging, sys
logging.disable(logging.WARNING)
from lighteval.metrics.dynamic_metrics import ExprExtractionConfig, LatexExtractionConfig, multilingual_extractive_match_metric
from lighteval.tasks.requests import Doc
from lighteval.utils.language import Language
pred_targets = (ExprExtractionConfig(), LatexExtractionConfig(boxed_match_priority=0))
metrics = {kind: multilingual_extractive_match_metric(language=Language.ENGLISH, fallback_mode="first_match",
           precision=5, gold_extraction_target=(target,), pred_extraction_target=pred_targets, aggregation_function=max)
           for kind, target in (("latex", LatexExtractionConfig()), ("expr", ExprExtractionConfig()))}
for line in sys.stdin:
    item = json.loads(line)
    doc = Doc(task_name="t", query="q", choices=[item["gold"]], gold_index=0)
    try:
        v = metrics[item["kind"]].sample_level_fn(golds=[item["gold"]], predictions=[item["prediction"]], formatted_doc=doc)
    except Exception as exc:
        v = "error: " + type(exc).__name__
    print(json.dumps(v), flush=True)
'''

# Runs inside the SimpleRL-Zoo environment, with its evaluation folder on sys.path.
SIMPLERL_RUNNER = r'''
import json, signal, sys
sys.path.insert(0, sys.argv[1])
sys.setrecursionlimit(10000)
from grader import math_equal
from parser import STRIP_EXCEPTIONS, extract_answer, parse_ground_truth, strip_string
class Timeout(BaseException):
    pass
def on_alarm(*_):
    raise Timeout()
signal.signal(signal.SIGALRM, on_alarm)
golds = {}
for line in sys.stdin:
    item = json.loads(line)
    name = item["data_name"]
    try:
        key = item["row_key"]
        if key not in golds:
            golds[key] = parse_ground_truth(item["row"], name)[1]
        pred = strip_string(extract_answer(item["prediction"], name), skip_unit=name in STRIP_EXCEPTIONS)
        signal.alarm(3)
        try:
            v = bool(math_equal(pred, golds[key]))
        finally:
            signal.alarm(0)
    except Timeout:
        v = False
    except Exception as exc:
        v = "error: " + type(exc).__name__
    print(json.dumps(v), flush=True)
'''


def setup(refs: Path, simplerl_src: Path | None) -> None:
    """Create the two reference environments under ``refs`` (PyPI; torch pinned first: a CPU wheel)."""
    for name, pins in (("lighteval", LIGHTEVAL_PINS), ("simplerl", SIMPLERL_PINS)):
        env = refs / name
        if not (env / "bin" / "python").exists():
            subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
        if name == "lighteval":
            subprocess.run([str(env / "bin" / "pip"), "install", "-q", pins[0]], check=True)
        subprocess.run([str(env / "bin" / "pip"), "install", "-q", *pins], check=True)
        if name == "simplerl":
            if simplerl_src is None:
                sys.exit("--setup: give --simplerl-src (SimpleRL-Zoo's examples/simplelr_math_eval) to install its "
                         "bundled latex2sympy")
            subprocess.run([str(env / "bin" / "pip"), "install", "-q", "-e", str(simplerl_src / "latex2sympy"),
                            "--use-pep517"], check=True)


# --------------------------------------------------------------------------- cases


def _number(gold: str) -> float | None:
    """The gold's value if it is a real number (plain, fraction, root...), else None."""
    import signal

    if len(gold) > 40 or any(c in gold for c in ",=[]()<>"):
        return None
    from latex2sympy2_extended import latex2sympy

    def on_alarm(*_):
        raise TimeoutError()

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(2)
    try:
        value = latex2sympy(gold)
        return float(value) if value.is_number and value.is_real else None
    except BaseException:
        return None
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def predictions_for(gold: str) -> list[tuple[str, str]]:
    """(variant name, model output) pairs written around one bare gold."""
    out = [
        ("boxed", f"Let me work it out. ... Therefore, the final answer is: $\\boxed{{{gold}}}$. I hope it is correct."),
        ("answer is", f"So we are done. The answer is {gold}."),
        ("final answer $", f"So the final answer is ${gold}$. I hope it is correct."),
        ("unit word", f"\\boxed{{{gold} cm}}"),
        ("unit text", f"\\boxed{{{gold}\\text{{ cm}}}}"),
        ("text", f"\\boxed{{\\text{{{gold}}}}}"),
    ]
    value = _number(gold)
    if value is not None:
        for places in (4, 5, 6):
            out.append((f"decimal {places}", f"\\boxed{{{value:.{places}f}}}"))
        if value == int(value):
            out.append(("wrong", f"\\boxed{{{int(value) + 1}}}"))
        else:
            frac = Fraction(value).limit_denominator(1000)
            out.append(("fraction", f"\\boxed{{\\frac{{{frac.numerator}}}{{{frac.denominator}}}}}"))
    parts = _top_level_split(gold)
    if len(parts) > 1:
        inner = ", ".join(reversed(parts))
        out.append(("reordered", f"\\boxed{{{inner}}}"))
    if len(gold) >= 2 and gold[0] in "([" and gold[-1] in ")]":
        swapped = {"(": "[", "[": "("}[gold[0]] + gold[1:-1] + {")": "]", "]": ")"}[gold[-1]]
        out.append(("swapped brackets", f"\\boxed{{{swapped}}}"))
        inner = _top_level_split(gold[1:-1])
        if len(inner) > 1:
            out.append(("reordered", f"\\boxed{{{gold[0]}{', '.join(reversed(inner))}{gold[-1]}}}"))
    return out


def _top_level_split(s: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [p for p in parts + [cur.strip()] if p]


# --------------------------------------------------------------------------- running


def _run_reference(python: str, runner: str, items: list[dict], args: list[str] = ()) -> list:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(runner)
        script = f.name
    try:
        proc = subprocess.run([python, script, *args], input="".join(json.dumps(i) + "\n" for i in items),
                              capture_output=True, text=True, check=False)
    finally:
        os.unlink(script)
    lines = proc.stdout.splitlines()
    if len(lines) != len(items):
        sys.exit(f"reference runner failed ({python}): {proc.stderr[-2000:]}")
    return [json.loads(x) for x in lines]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", help="benchmark files laid out as <dir>/aime24/test.jsonl, math500/, ...")
    ap.add_argument("--refs", type=Path, default=Path("/tmp/aapo-refs"),
                    help="folder holding the reference environments (lighteval/, simplerl/)")
    ap.add_argument("--lighteval-python", help="python of the lighteval 0.8.1 environment (default <refs>/lighteval)")
    ap.add_argument("--simplerl-python", help="python of the SimpleRL-Zoo environment (default <refs>/simplerl)")
    ap.add_argument("--simplerl-src", type=Path, help="SimpleRL-Zoo's examples/simplelr_math_eval folder")
    ap.add_argument("--setup", action="store_true", help="create the reference environments under --refs and exit")
    ap.add_argument("--protocols", default="lighteval,simplerl")
    ap.add_argument("--limit", type=int, default=None, help="first N problems of each benchmark (a quick look)")
    ap.add_argument("--out", type=Path, help="also write the report here")
    args = ap.parse_args()
    if args.setup:
        setup(args.refs, args.simplerl_src)
        return
    if not args.data_dir:
        sys.exit("--data-dir: give the folder of benchmark files (<dir>/aime24/test.jsonl, math500/, ...)")
    from aapo_app.benchmarks import BENCHMARK_ORDER, BENCHMARKS, _load_rows, load_benchmark
    from aapo_app.grader import Grader

    protocols = [p for p in args.protocols.split(",") if p]
    cases = []  # (benchmark, problem id, variant, bare gold, prediction, row, reference golds)
    for name in BENCHMARK_ORDER:
        rows = _load_rows(BENCHMARKS[name], args.data_dir)[:args.limit]
        problems = load_benchmark(name, args.data_dir, args.limit)
        for row, p in zip(rows, problems):
            for variant, prediction in predictions_for(p.gold):
                cases.append((name, p.id, variant, p.gold, prediction, row, p.reference))
    lines = [f"differential check: {len(cases)} (gold, prediction) pairs over "
             f"{len({(c[0], c[1]) for c in cases})} problems, protocols {', '.join(protocols)}"]
    for protocol in protocols:
        t0 = time.time()
        with Grader(timeout_s=10.0, protocol=protocol) as grader:
            ours = grader.grade_many([c[6][protocol][0] for c in cases], [c[4] for c in cases],
                                     [c[6][protocol][1] for c in cases])
        t_ours = time.time() - t0
        t0 = time.time()
        if protocol == "lighteval":
            python = args.lighteval_python or str(args.refs / "lighteval" / "bin" / "python")
            items = [{"gold": c[6]["lighteval"][0], "kind": c[6]["lighteval"][1], "prediction": c[4]} for c in cases]
            theirs = _run_reference(python, LIGHTEVAL_RUNNER, items)
        else:
            if args.simplerl_src is None:
                sys.exit("--simplerl-src: give SimpleRL-Zoo's examples/simplelr_math_eval folder")
            python = args.simplerl_python or str(args.refs / "simplerl" / "bin" / "python")
            items = [{"data_name": SIMPLERL_DATA_NAME[c[0]], "row_key": f"{c[0]}/{c[1]}", "row": c[5],
                      "prediction": c[4]} for c in cases]
            theirs = _run_reference(python, SIMPLERL_RUNNER, items, [str(args.simplerl_src.resolve())])
        t_ref = time.time() - t0
        agree, total, diffs = defaultdict(int), defaultdict(int), []
        for c, o, t in zip(cases, ours, theirs):
            ref = bool(t) if not isinstance(t, str) else None
            total[c[0]] += 1
            if ref is not None and o.correct == ref:
                agree[c[0]] += 1
            else:
                diffs.append((c, o, t))
        lines.append(f"\n== {protocol}: ours {t_ours:.0f} s, reference {t_ref:.0f} s")
        lines.append("| benchmark | pairs | agree | agreement |")
        lines.append("|---|---:|---:|---:|")
        for name in BENCHMARK_ORDER:
            if total[name]:
                lines.append(f"| {name} | {total[name]} | {agree[name]} | {100 * agree[name] / total[name]:.2f} % |")
        n_all, a_all = sum(total.values()), sum(agree.values())
        lines.append(f"| all | {n_all} | {a_all} | {100 * a_all / n_all:.2f} % |")
        lines.append(f"disagreements ({len(diffs)}):")
        for c, o, t in diffs:
            lines.append(f"  [{c[0]} {c[1]} {c[2]}] gold={c[3]!r} prediction={c[4][-120:]!r} "
                         f"ours={o.correct} ({o.status}, extracted {o.predicted!r}, gold {o.gold!r}) reference={t}")
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
