"""The shared answer grader: math-verify verdicts, time and memory bounds, worker kills, threads."""

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from aapo_app import grader as grader_module
from aapo_app.errors import AapoError
from aapo_app.grader import GradeResult, Grader

TIMEOUT_S = 2.0

# (gold, prediction, expected correct). Verdicts are lighteval 0.8.1's (open-rs evaluate.py's metric,
# the gold as "$gold$"), computed by running it.
CASES = [
    # equal forms
    ("7", "the answer is \\boxed{7}", True),
    ("7", "The final answer is $\\boxed{7}$.", True),
    ("0.5", "\\boxed{\\frac{1}{2}}", True),
    ("\\frac{1}{2}", "\\boxed{0.5}", True),
    ("\\frac{1}{2}", "\\boxed{\\dfrac{1}{2}}", True),
    ("\\dfrac{3}{4}", "\\boxed{0.75}", True),
    ("27.0", "\\boxed{27}", True),  # AMC23 golds are floats
    ("025", "\\boxed{25}", True),  # AIME24 golds may be zero-padded
    ("1,000", "\\boxed{1000}", True),
    ("\\sqrt{2}", "\\boxed{\\sqrt 2}", True),
    ("x^2+1", "\\boxed{1+x^2}", True),
    ("(1,2)", "\\boxed{(1, 2)}", True),  # math-verify parses "(1,2)" as the open interval
    ("[1,2)", "\\boxed{[1,2)}", True),
    ("\\{1,2\\}", "\\boxed{\\{2,1\\}}", True),
    ("x=3", "\\boxed{3}", True),  # an assignment gold matches its value
    ("10", "\\boxed{10\\%}", False),  # lighteval 0.8.1: 10% is 1/10
    ("7", "\\boxed{7} is wrong, it is \\boxed{7}", True),
    # near misses
    ("7", "\\boxed{8}", False),
    ("7", "\\boxed{-7}", False),
    ("(1,2)", "\\boxed{(2,1)}", False),
    ("[1,2)", "\\boxed{(1,2]}", False),
    ("\\sqrt{2}", "\\boxed{1.414}", False),
    ("\\frac13", "\\boxed{0.333}", False),  # 0.333333 would pass: 6 decimal places
    ("3", "$3$ first, but finally \\boxed{7}", False),  # the boxed answer wins over earlier math
    ("7", "\\boxed{7} \\boxed{8}", False),  # two boxes in one match: the set {7, 8}
    # unboxed: the last expression is taken. math-verify reads "3 + 4 = 7" as its last side, 7,
    # so it is correct; "3 + 4 = 8" is not.
    ("7", "3 + 4 = 7", True),
    ("7", "3 + 4 = 8", False),
    ("7", "I think 7, but maybe 8", False),
]


@pytest.fixture(scope="module")
def grader():
    with Grader(timeout_s=TIMEOUT_S) as g:
        yield g


def test_cases_table(grader):
    golds, predictions, expected = zip(*CASES)
    results = grader.grade_many(golds, predictions)
    got = [(g, p, r.correct) for g, p, r in zip(golds, predictions, results)]
    assert got == CASES
    assert all(r.status == "ok" for r in results)


def test_result_fields(grader):
    assert grader.grade("0.5", "so x = \\boxed{\\frac{1}{2}}") == GradeResult(
        correct=True, status="ok", gold="\\frac{1}{2}", predicted="\\frac{1}{2}"
    )
    assert grader.grade("7", "\\boxed{8}") == GradeResult(False, "ok", "7", "8")


def test_no_answer(grader):
    for prediction in ["no numbers here", "\\boxed{}", ""]:
        result = grader.grade("7", prediction)
        assert (result.correct, result.status, result.predicted) == (False, "no_answer", "")


def test_unparseable_gold_is_an_error(grader):
    result = grader.grade("", "\\boxed{7}")
    assert (result.correct, result.status) == (False, "error")


def test_empty_and_mismatched_batches(grader):
    assert grader.grade_many([], []) == []
    with pytest.raises(ValueError):
        grader.grade_many(["1", "2"], ["1"])


@pytest.mark.parametrize(
    "prediction, statuses",
    [
        # sympy grinds on the tower of powers until the worker's alarm fires
        ("\\boxed{10^{10^{10^{10}}}}", {"timeout"}),
        ("x" * 50_000, {"no_answer", "timeout", "error"}),
        # Python refuses to convert a 50,000-digit string to int (sys.get_int_max_str_digits)
        ("9" * 50_000, {"error", "timeout"}),
        # unbalanced braces: math-verify falls back to the unparsed string "{\frac{1}"
        ("\\boxed{\\frac{1}{2", {"no_answer"}),
    ],
    ids=["power-tower", "50kB-letters", "50kB-digits", "unbalanced"],
)
def test_pathological_inputs_are_bounded(grader, prediction, statuses):
    before = dict(grader.stats)
    start = time.monotonic()
    result = grader.grade("7", prediction)
    assert time.monotonic() - start < TIMEOUT_S + 10
    assert result.correct is False
    assert result.status in statuses
    if result.status != "ok":
        assert grader.stats[result.status] == before[result.status] + 1


def test_hung_worker_is_killed_and_replaced(grader):
    # Lower the parent's hard bound below the worker's own alarm so the parent must kill it.
    kills = grader.stats["worker_kills"]
    grader.hard_timeout_s = 0.5
    try:
        start = time.monotonic()
        results = grader.grade_many(["7", "7"], ["\\boxed{10^{10^{10^{10}}}}", "\\boxed{7}"])
        assert time.monotonic() - start < 0.5 + 10
    finally:
        grader.hard_timeout_s = TIMEOUT_S + 2.0
    assert (results[0].correct, results[0].status) == (False, "timeout")
    assert results[1].correct
    assert grader.stats["worker_kills"] == kills + 1
    # a fresh worker takes over: normal cases grade right afterwards, in parallel
    assert [r.correct for r in grader.grade_many(["7", "2"], ["\\boxed{7}", "\\boxed{3}"])] == [True, False]


def test_grading_from_a_thread(grader):
    out = []
    thread = threading.Thread(target=lambda: out.append(grader.grade("\\frac{1}{2}", "\\boxed{0.5}")))
    thread.start()
    thread.join(timeout=60)
    assert [r.correct for r in out] == [True]


def test_module_level_grade():
    assert grader_module.grade("7", "\\boxed{7}", timeout_s=TIMEOUT_S).correct
    assert not grader_module.grade("7", "\\boxed{8}", timeout_s=TIMEOUT_S).correct


def test_restarts_after_close(grader):
    grader.close()
    assert grader.grade("7", "\\boxed{7}").correct


def test_no_crash_when_workers_cannot_start(monkeypatch):
    def cannot_start(ctx, *args):
        raise OSError("no processes here")

    monkeypatch.setattr(grader_module, "_Worker", cannot_start)
    g = Grader(num_workers=1)
    assert g.grade_many(["7", "8"], ["\\boxed{7}", "\\boxed{8}"]) == [GradeResult(False, "error")] * 2
    assert g.stats["error"] == 2


@pytest.mark.parametrize("protocol", ["lighteval", "simplerl"])
def test_malformed_gold_is_an_error(protocol):
    """A gold whose braces do not pair up is a broken reference: status "error", counted, never "ok"."""
    with Grader(timeout_s=TIMEOUT_S, num_workers=1, protocol=protocol) as g:
        for prediction in ["\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "\\boxed{\\frac{1}{2}"]:
            result = g.grade("\\frac{1}{2", prediction)
            assert (result.correct, result.status, result.gold) == (False, "error", "\\frac{1}{2"), prediction
        assert g.stats["error"] == 3
        # set braces are escaped, not counted: a well-formed set gold still grades
        result = g.grade("\\{1,2\\}", "\\boxed{\\{1,2\\}}")
        assert (result.correct, result.status) == (True, "ok")


# Run in a fresh interpreter: RUSAGE_CHILDREN then holds only this grader's worker, whose peak
# resident memory is the figure to bound (a worker of the pytest process would share its maximum
# with every other child the session ever waited for).
_MEMORY_SCRIPT = """
import json, resource, sys, time
from aapo_app.grader import Grader
start = time.monotonic()
with Grader(timeout_s=5.0, num_workers=1, protocol=sys.argv[1]) as g:
    result = g.grade("10^{10^{10^{10}}}", "\\\\boxed{10^{10^{10^{11}}}}")
    stats = dict(g.stats)
    limit = getattr(g, "memory_limit_mb", 1024)  # (read this way, the script also runs on a grader without a cap)
print(json.dumps({"correct": result.correct, "status": result.status, "seconds": time.monotonic() - start,
                  "stats": stats, "limit_mb": limit,
                  "worker_peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def _grade_in_fresh_process(protocol, env=None):
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, protocol], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_simplerl_memory_is_bounded():
    """10^{10^{10^{11}}} against 10^{10^{10^{10}}}: without a memory cap the simplerl worker grew to
    ~4 GB before the time bound killed it. Under the default cap (1024 MiB beyond the worker's
    start-up size) sympy's allocation fails at once: a 0 verdict, status "error" (counted), in
    bounded time and memory."""
    env = {k: v for k, v in os.environ.items() if k != "AAPO_GRADER_MEMORY_MB"}  # the default cap
    out = _grade_in_fresh_process("simplerl", env)
    assert out["limit_mb"] == 1024
    assert (out["correct"], out["status"]) == (False, "error"), out
    assert out["stats"]["error"] == 1 and out["stats"]["timeout"] == 0, out
    assert out["seconds"] < 60, out  # worker start-up included; the item itself fails fast
    assert out["worker_peak_mb"] < out["limit_mb"] + 512, out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_AS and /proc: Linux")
def test_lighteval_memory_is_bounded():
    """The same pair under math-verify (which bounds it by time alone, as before): a 0 verdict
    within the time bound, and memory stays bounded."""
    out = _grade_in_fresh_process("lighteval")
    assert out["correct"] is False and out["status"] in ("timeout", "error"), out
    assert out["seconds"] < 60, out
    assert out["worker_peak_mb"] < out["limit_mb"] + 512, out


def test_memory_limit_setting(monkeypatch):
    monkeypatch.delenv(grader_module.MEMORY_LIMIT_ENV, raising=False)
    assert Grader().memory_limit_mb == 1024
    monkeypatch.setenv(grader_module.MEMORY_LIMIT_ENV, "2048")
    assert Grader().memory_limit_mb == 2048
    assert Grader(memory_limit_mb=512).memory_limit_mb == 512  # the argument wins over the environment
    monkeypatch.setenv(grader_module.MEMORY_LIMIT_ENV, "0")
    assert Grader().memory_limit_mb == 0  # no cap
    for bad in ("lots", "-1", "1.5"):
        monkeypatch.setenv(grader_module.MEMORY_LIMIT_ENV, bad)
        with pytest.raises(AapoError, match="AAPO_GRADER_MEMORY_MB.*e.g. 2048"):
            Grader()
    with pytest.raises(ValueError, match="memory_limit_mb"):
        Grader(memory_limit_mb=-1)


def test_memory_error_in_a_worker_scores_error():
    """A small cap: an answer whose value needs more memory than the cap scores "error" and is
    counted; the worker keeps grading afterwards."""
    with Grader(timeout_s=5.0, num_workers=1, protocol="simplerl", memory_limit_mb=64) as g:
        result = g.grade("1", "\\boxed{2^{2^{30}}}")  # a 128 MiB integer
        assert (result.correct, result.status) == (False, "error")
        assert g.stats["error"] == 1
        assert g.grade("7", "\\boxed{7}").correct
