"""The one answer grader, shared by the training reward and benchmark evaluation.

Usage::

    with Grader(timeout_s=5.0) as grader:
        results = grader.grade_many(["7", "\\frac{1}{2}"], ["... \\boxed{7}", "so x = 0.5"])
    results[0].correct  # True

    grade("7", "the answer is \\boxed{7}").correct  # module-level, shared lazily created Grader

Two protocols (``PROTOCOLS``), chosen per Grader:

* ``lighteval`` (default; the training reward, the paper's Qwen rows): math-verify, below.
* ``simplerl`` (the paper's Llama rows): Qwen2.5-Math-style extraction and equality,
  :mod:`aapo_app.answers`.

How an item is graded under ``lighteval`` (math-verify, the lighteval / open-r1 protocol):

1. The gold is a bare answer string ("7", "\\frac{1}{2}", "27.0", "(1,2)"). It is wrapped as
   ``$gold$`` and parsed with ``LatexExtractionConfig()``; a gold that already carries its own
   ``$`` (not an escaped ``\\$``, a currency sign) or ``\\boxed{}`` is parsed as is. If that
   extracts nothing, the bare string is parsed with ``ExprExtractionConfig()`` (plain numbers).
2. The prediction is parsed with ``[LatexExtractionConfig(boxed_match_priority=0),
   ExprExtractionConfig()]``: the last ``\\boxed{}`` first, else the last LaTeX / plain expression.
3. A last ``\\boxed{}`` that is word for word the gold (spaces aside) is correct; otherwise
   ``verify(gold_parsed, pred_parsed)`` decides.

Time bounds. math-verify bounds its own work with ``signal.alarm``, which only works in a
process's main thread, and a SIGALRM handler cannot interrupt a long C call at all. So every item
runs in a small pool of worker processes (``spawn`` context, safe after torch or DeepSpeed have
started threads), each grading one item at a time in its main thread under one
``signal.setitimer`` budget of ``timeout_s`` for the whole item (math-verify's own timeouts are
switched off there: its ``signal.alarm(0)`` clean-up would cancel our timer). The parent also
enforces a hard wall-clock bound, ``hard_timeout_s = timeout_s + 2 s``: a worker that overruns it is
killed and respawned, and its item scores ``timeout``. Workers start lazily on the first call and
are reused; items of one ``grade_many`` call run in parallel across them. Any exception scores
``error``; nothing raised in a worker reaches the caller.

Memory bounds. A time bound alone does not bound memory: sympy can allocate gigabytes inside one C
call before any alarm or kill lands (``10^{10^{10^{11}}}`` against ``10^{10^{10^{10}}}`` under
simplerl grew a worker to 2.5-4 GB in the 7 s it was allowed). So each worker also caps its own
address space (``RLIMIT_AS``) once it has started: it may grow by ``memory_limit_mb`` (default 1024
MiB) beyond its size after imports and warm-up. An allocation past the cap raises MemoryError, which
scores the item ``error`` (counted like any error, ``verify_errors`` in training); a worker that
dies of it is replaced and its item scores ``error`` too. (math-verify catches most exceptions
inside itself, so under lighteval an allocation past the cap may instead read as "not equal": still
0, still bounded.) Change the cap with ``Grader(memory_limit_mb=...)`` or the environment variable
``AAPO_GRADER_MEMORY_MB`` (read when a Grader is created, so it reaches the training reward and
``aapo eval`` alike); 0 switches it off.

Malformed golds. A gold whose braces do not pair up (``\\frac{1}{2``) scores ``error`` under both
protocols, as does a gold that math-verify cannot parse (lighteval) or that normalises to nothing
(simplerl): a broken reference is never reported as a graded ``ok``.

Workers are started with ``spawn``, which re-imports the caller's ``__main__`` module: scripts that
grade must keep their entry point under ``if __name__ == "__main__":``.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

from aapo_app.errors import AapoError

STATUSES = ("ok", "no_answer", "timeout", "error")
PROTOCOLS = ("lighteval", "simplerl")
_KILL_MARGIN_S = 2.0  # parent's hard bound = timeout_s + this
_STARTUP_TIMEOUT_S = 120.0  # a worker must import math-verify within this
_MAX_START_FAILURES = 3  # per call; then the remaining items score "error"
_READY = "ready"
MEMORY_LIMIT_ENV = "AAPO_GRADER_MEMORY_MB"
DEFAULT_MEMORY_LIMIT_MB = 1024  # per worker, beyond its size once started
logger = logging.getLogger(__name__)


@dataclass
class GradeResult:
    """The verdict on one (gold, prediction) pair.

    Attributes:
        correct: True iff the protocol judged the prediction equal to the gold.
        status: "ok" (graded), "no_answer" (nothing in the prediction parsed into a mathematical
            expression, and no string match), "timeout" (over ``timeout_s``) or "error" (an
            exception, a MemoryError past the worker's memory cap, a crashed worker, or a malformed
            gold: unbalanced braces, or one that math-verify cannot parse).
        gold: the text math-verify extracted from the gold ("" if none).
        predicted: the text math-verify extracted from the prediction ("" if none or unknown).
    """

    correct: bool
    status: str
    gold: str = ""
    predicted: str = ""


# --------------------------------------------------------------------------- worker side


class _ItemTimeout(BaseException):
    """Raised by SIGALRM in a worker. A BaseException so math-verify's `except Exception` lets it pass."""


def _on_alarm(signum, frame):
    raise _ItemTimeout()


def _text(parsed: list) -> str:
    """The extracted string math-verify returns beside the parsed value (never str() of sympy,
    which can itself take forever on a huge expression)."""
    return next((x for x in reversed(parsed) if isinstance(x, str)), "")


# Gold kinds (``Grader.grade_many(..., kinds=...)``): how a gold string is read.
#   "answer"          a bare answer ("7", "\\frac{1}{2}"): the training reward and ``aapo grade``;
#   "latex" / "expr"  (lighteval) the reference's gold text, read by its LaTeX or its expression
#                     extraction, exactly as lighteval's metric reads it (``aapo eval``);
#   "ref:<benchmark>" (simplerl) a gold already normalised as the reference does
#                     (:func:`aapo_app.answers.reference_gold`); predictions use that benchmark's rules.
GOLD_KINDS = ("answer", "latex", "expr")
LIGHTEVAL_PRECISION = 5  # decimal places of lighteval's numeric comparison (the reference's ``precision=5``)


@contextlib.contextmanager
def _lighteval_081_parsing():
    """latex2sympy2_extended as lighteval 0.8.1 ran it (it pinned latex2sympy2_extended 1.0.6), where
    the installed 1.10+ reads three things differently:

    * units: a trailing ``\\text{...}`` unit is dropped but bare unit words are kept (``1.6 cm`` is not
      1.6); 1.0.6's unit-word pattern could never match, 1.10+ strips trailing unit words;
    * ``0,111`` is the number 111 (commas are thousands separators), not 0.111;
    * symbols keep their case (``A`` and ``a`` differ).

    The three are swapped in only while a lighteval item is graded, in the grader's own worker."""
    from latex2sympy2_extended import latex2sympy2, math_normalization

    saved = math_normalization.units_regex, latex2sympy2.convert_number, latex2sympy2.latex2sympy.__defaults__
    defaults = list(saved[2])
    defaults[-1] = latex2sympy2.ConversionConfig(lowercase_symbols=False)
    math_normalization.units_regex = _NEVER
    latex2sympy2.convert_number = _number_without_decimal_comma
    latex2sympy2.latex2sympy.__defaults__ = tuple(defaults)
    try:
        yield
    finally:
        math_normalization.units_regex, latex2sympy2.convert_number, latex2sympy2.latex2sympy.__defaults__ = saved


def _number_without_decimal_comma(number: str):
    """A number token as latex2sympy2_extended 1.0.6 reads it: commas and spaces dropped, leading
    zeros dropped (``0,111`` -> 111)."""
    from sympy import Number

    return Number(number.replace(",", "").replace(" ", "").lstrip("0") or "0")


_NEVER = re.compile(r"(?!x)(x)")  # never matches; one group, as the substitution refers to it


def _latex_config(boxed_priority: int):
    from latex2sympy2_extended.latex2sympy2 import NormalizationConfig
    from math_verify import LatexExtractionConfig

    return LatexExtractionConfig(boxed_match_priority=boxed_priority, normalization_config=NormalizationConfig(
        basic_latex=True, units=True, malformed_operators=True, nits=True, boxed="all", equations=True))


@functools.lru_cache(maxsize=1024)
def _parse_gold(gold: str, kind: str = "answer") -> list:
    """Parse a gold. "answer": as LaTeX in ``$...$`` (or as is), else as a plain expression. "latex" /
    "expr": the reference's gold text with lighteval's gold extraction (LaTeX with the boxed match
    after "final answer", or expressions), and the text itself when nothing is extracted."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if kind in ("latex", "expr"):
        config = [_latex_config(55)] if kind == "latex" else [ExprExtractionConfig()]
        parsed = parse(gold, config, fallback_mode="first_match", parsing_timeout=None, raise_on_error=True)
        return parsed or [gold]
    delimited = re.search(r"(?<!\\)\$", gold) or "\\boxed" in gold  # an escaped \$ is a currency sign
    text = gold if delimited else f"${gold}$"
    parsed = parse(text, [LatexExtractionConfig()], parsing_timeout=None, raise_on_error=True)
    if not parsed:
        parsed = parse(gold, [ExprExtractionConfig()], parsing_timeout=None, raise_on_error=True)
    return parsed


def _same_text(a: str | None, b: str) -> bool:
    return a is not None and "".join(a.split()) == "".join(b.split())


def _grade_item(gold: str, prediction: str, seen: dict, protocol: str = "lighteval",
                kind: str = "answer") -> GradeResult:
    """Grade one pair under ``protocol`` (no time bound here; the caller holds the alarm).

    ``seen`` receives the extracted texts as they become known, so a timeout can still report them.
    ``kind`` says how the gold is read (``GOLD_KINDS`` and ``ref:<benchmark>``).
    """
    from aapo_app.answers import braces_balanced

    if kind == "answer" and not braces_balanced(gold):  # "\frac{1}{2": a broken reference, not a gradable one
        seen["gold"] = gold.strip()
        return GradeResult(False, "error", seen["gold"], "")
    if protocol == "simplerl":
        from aapo_app.answers import extract_answer, math_equal, strip_string

        benchmark = kind[len("ref:"):] if kind.startswith("ref:") else None
        seen["gold"] = gold if benchmark is not None else strip_string(gold)
        if not seen["gold"] and benchmark is None:  # a reference gold may normalise to "" (\text{east})
            return GradeResult(False, "error", "", "")
        seen["predicted"] = extract_answer(prediction, benchmark)
        correct = math_equal(seen["predicted"], seen["gold"])
        status = "ok" if correct or seen["predicted"] else "no_answer"
        return GradeResult(correct, status, seen["gold"], seen["predicted"])
    from math_verify import ExprExtractionConfig, parse
    from sympy import Basic, MatrixBase

    from aapo_app.answers import last_boxed
    from aapo_app.lighteval_match import answers_match

    with _lighteval_081_parsing():
        gold_parsed = _parse_gold(gold, kind)
        seen["gold"] = _text(gold_parsed)
        if not gold_parsed:
            return GradeResult(False, "error", "", "")
        # the reference's prediction targets: expressions and LaTeX, the last \boxed{} first
        pred_parsed = parse(prediction, [ExprExtractionConfig(), _latex_config(0)], fallback_mode="first_match",
                            parsing_timeout=None, raise_on_error=True)
    seen["predicted"] = _text(pred_parsed)
    if kind == "answer" and _same_text(last_boxed(prediction), gold):  # word for word a bare gold (prose)
        return GradeResult(True, "ok", seen["gold"], seen["predicted"])
    # lighteval 0.8.1's comparison (not math-verify's verify, which has become more lenient); an
    # error on one (gold, pred) candidate pair does not hide a match on another
    correct = answers_match(gold_parsed, pred_parsed, LIGHTEVAL_PRECISION)
    has_math = any(isinstance(x, (Basic, MatrixBase)) for x in pred_parsed)
    status = "ok" if correct or has_math else "no_answer"
    return GradeResult(correct, status, seen["gold"], seen["predicted"])


def _address_space_bytes() -> int:
    """This process's virtual memory size (what RLIMIT_AS counts), from /proc (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _limit_memory(limit_mb: int) -> None:
    """Cap this process's address space at its current size + ``limit_mb`` MiB (0: no cap).

    Relative to the current size, because what a worker holds once started depends on what the
    caller's ``__main__`` imports (spawn re-imports it); a fixed total could starve a worker that
    imported torch before grading anything. Where RLIMIT_AS or /proc is missing, nothing is capped."""
    if not limit_mb:
        return
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = _address_space_bytes() + limit_mb * 2**20
        if hard != resource.RLIM_INFINITY:
            cap = min(cap, hard)
        if soft == resource.RLIM_INFINITY or cap < soft:
            resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    except (ImportError, OSError, ValueError, AttributeError):
        logger.warning("grader: cannot cap a worker's memory here; only the time bound applies")


def _worker_main(conn: Connection, memory_limit_mb: int = 0) -> None:
    """Worker loop: receive (gold, prediction, timeout_s, protocol, kind), send back a GradeResult; None stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGALRM, _on_alarm)
    # We switch math-verify's timeouts off and bound items ourselves; silence its warning about it.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)  # "equations=True is deprecated"
    try:  # warm up (imports, parser set-up) before "ready", so no item's time budget pays for it
        for protocol in PROTOCOLS:
            _grade_item("\\frac{1}{2}", "\\boxed{0.5}", {}, protocol)
    except Exception:
        pass
    _limit_memory(memory_limit_mb)  # after the warm-up: the cap bounds what grading adds
    conn.send(_READY)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError, MemoryError):  # a message too big for the cap: exit, the item scores "error"
            return
        if message is None:
            return
        gold, prediction, timeout_s, protocol, kind = message
        seen = {"gold": "", "predicted": ""}
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, timeout_s)
                result = _grade_item(gold, prediction, seen, protocol, kind)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _ItemTimeout:
            result = GradeResult(False, "timeout", seen["gold"], seen["predicted"])
        except Exception:  # MemoryError (over the memory cap) included
            result = GradeResult(False, "error", seen["gold"], seen["predicted"])
        try:
            conn.send(result)
        except (EOFError, OSError):
            return


# --------------------------------------------------------------------------- parent side


class _Worker:
    """One worker process, the parent's end of its pipe, and the item it is grading."""

    def __init__(self, ctx: multiprocessing.context.BaseContext, memory_limit_mb: int = 0):
        self.conn, child_conn = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child_conn, memory_limit_mb), daemon=True,
                                name="aapo-grader")
        self.proc.start()
        child_conn.close()
        self.ready = False
        self.deadline = time.monotonic() + _STARTUP_TIMEOUT_S  # until ready, then per item
        self.item: int | None = None

    def send(self, index: int, gold: str, prediction: str, timeout_s: float, hard_timeout_s: float,
             protocol: str, kind: str = "answer") -> None:
        self.conn.send((gold, prediction, timeout_s, protocol, kind))
        self.item = index
        self.deadline = time.monotonic() + hard_timeout_s

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()

    def stop(self) -> None:
        """Ask the worker to exit; kill it if it does not within a second."""
        try:
            self.conn.send(None)
        except (EOFError, OSError):
            pass
        self.proc.join(timeout=1)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(timeout=5)
        self.conn.close()


class Grader:
    """Grades predictions against gold answers, in a pool of worker processes.

    Args:
        timeout_s: time bound for one item (parsing both sides and verifying). The parent kills a
            worker that overruns ``hard_timeout_s = timeout_s + 2`` seconds.
        num_workers: worker processes; default ``min(2, os.cpu_count())``.
        protocol: "lighteval" (math-verify) or "simplerl" (Qwen2.5-Math style), see the module doc.
        memory_limit_mb: MiB each worker's address space may grow by beyond its size once started
            (``RLIMIT_AS``); past it an item scores "error". None: ``$AAPO_GRADER_MEMORY_MB`` if
            set, else 1024. 0: no cap.

    Attributes:
        stats: running counts since creation: "graded", "timeout", "error", "no_answer", and
            "worker_kills" (workers killed by the parent's hard bound or found dead).
        hard_timeout_s: the parent's wall-clock bound per item (tests lower it to exercise the kill).
    """

    def __init__(self, timeout_s: float = 5.0, num_workers: int | None = None, protocol: str = "lighteval",
                 memory_limit_mb: int | None = None):
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0 (got {timeout_s})")
        if protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {protocol!r})")
        if memory_limit_mb is None:
            memory_limit_mb = memory_limit_from_env()
        if memory_limit_mb < 0:
            raise ValueError(f"memory_limit_mb must be >= 0 (got {memory_limit_mb})")
        self.memory_limit_mb = int(memory_limit_mb)
        self.protocol = protocol
        self.timeout_s = float(timeout_s)
        self.hard_timeout_s = self.timeout_s + _KILL_MARGIN_S
        self.num_workers = max(1, num_workers or min(2, os.cpu_count() or 1))
        self.stats = {"graded": 0, "timeout": 0, "error": 0, "no_answer": 0, "worker_kills": 0}
        self._ctx = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()

    def grade(self, gold: str, prediction: str) -> GradeResult:
        """Grade one prediction against one gold answer."""
        return self.grade_many([gold], [prediction])[0]

    def grade_many(self, golds: Sequence[str], predictions: Sequence[str],
                   kinds: Sequence[str] | None = None) -> list[GradeResult]:
        """Grade ``predictions[i]`` against ``golds[i]`` for every i, in parallel across the workers.

        ``kinds[i]`` says how ``golds[i]`` is read (default "answer", a bare answer): "latex" or
        "expr" for a lighteval reference gold, "ref:<benchmark>" for a simplerl reference gold."""
        return self._grade_all(golds, predictions, self.timeout_s, self.hard_timeout_s, kinds)

    def close(self) -> None:
        """Stop the worker processes. The Grader restarts them if it is used again."""
        with self._lock:
            for worker in self._workers:
                worker.stop()
            self._workers = []

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _grade_all(
        self, golds: Sequence[str], predictions: Sequence[str], timeout_s: float, hard_timeout_s: float,
        kinds: Sequence[str] | None = None,
    ) -> list[GradeResult]:
        if len(golds) != len(predictions):
            raise ValueError(f"{len(golds)} golds but {len(predictions)} predictions")
        kinds = ["answer"] * len(golds) if kinds is None else [str(k) for k in kinds]
        if len(kinds) != len(golds):
            raise ValueError(f"{len(golds)} golds but {len(kinds)} gold kinds")
        bad = next((k for k in kinds if k not in GOLD_KINDS and not k.startswith("ref:")), None)
        if bad is not None:
            raise ValueError(f"gold kind must be one of {', '.join(GOLD_KINDS)} or ref:<benchmark> (got {bad!r})")
        golds = [str(g) for g in golds]
        predictions = [str(p) for p in predictions]
        results: list[GradeResult | None] = [None] * len(golds)
        with self._lock:
            try:
                self._schedule(golds, predictions, results, timeout_s, hard_timeout_s, kinds)
            except Exception:  # e.g. no process can be started here: score "error", don't crash
                logger.warning("grader: grading failed; unfinished items score 'error'", exc_info=True)
                self._kill_all()
            except BaseException:  # Ctrl-C: workers may hold items of this call; start afresh next time
                self._kill_all()
                raise
        results = [r if r is not None else GradeResult(False, "error") for r in results]
        for result in results:
            self.stats["graded"] += 1
            if result.status != "ok":
                self.stats[result.status] += 1
        return results

    def _schedule(
        self,
        golds: list[str],
        predictions: list[str],
        results: list[GradeResult | None],
        timeout_s: float,
        hard_timeout_s: float,
        kinds: list[str],
    ) -> None:
        """Feed items to idle workers one at a time, collect results, kill overrunning workers."""
        if not golds:
            return
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.memory_limit_mb))
        pending = deque(range(len(golds)))
        start_failures = 0

        def replace(worker: _Worker, status: str) -> None:
            """Kill a hung or dead worker, score its item, and start a fresh one."""
            nonlocal start_failures
            worker.kill()
            self.stats["worker_kills"] += 1
            if worker.item is not None:
                results[worker.item] = GradeResult(False, status)
            elif not worker.ready:
                start_failures += 1
            self._workers[self._workers.index(worker)] = _Worker(self._ctx, self.memory_limit_mb)

        while pending or any(w.item is not None for w in self._workers):
            if start_failures >= _MAX_START_FAILURES:  # workers cannot start: give up, don't hang
                pending.clear()  # these stay None and score "error"
                if all(w.item is None for w in self._workers):
                    return
            for worker in self._workers:
                if worker.ready and worker.item is None and pending:
                    i = pending.popleft()
                    try:
                        worker.send(i, golds[i], predictions[i], timeout_s, hard_timeout_s, self.protocol, kinds[i])
                    except OSError:  # died while idle: put the item back
                        pending.appendleft(i)
                        replace(worker, "error")
            waiting = [w for w in self._workers if w.item is not None or not w.ready]
            next_deadline = min(w.deadline for w in waiting)
            readable = wait([w.conn for w in waiting], timeout=max(0.0, next_deadline - time.monotonic()))
            for worker in waiting:
                if worker.conn in readable:
                    try:
                        message = worker.conn.recv()
                    except (EOFError, OSError):  # the worker died (e.g. out of memory)
                        replace(worker, "error")
                        continue
                    if message == _READY:
                        worker.ready, start_failures = True, 0
                    else:
                        results[worker.item] = message
                        worker.item = None
                elif time.monotonic() > worker.deadline:
                    replace(worker, "timeout")

    def _kill_all(self) -> None:
        for worker in self._workers:
            try:
                worker.kill()
            except Exception:
                pass
        self._workers = []


def memory_limit_from_env() -> int:
    """The per-worker memory cap in MiB: ``$AAPO_GRADER_MEMORY_MB`` if set, else 1024 (0: none)."""
    raw = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not raw:
        return DEFAULT_MEMORY_LIMIT_MB
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise AapoError(f"{MEMORY_LIMIT_ENV}={raw!r} is not a whole number of MiB >= 0; set it to e.g. 2048 "
                        f"(0 switches the grader's memory cap off) or unset it for the default "
                        f"{DEFAULT_MEMORY_LIMIT_MB}")
    return value


_shared: dict[str, Grader] = {}
_shared_lock = threading.Lock()


def grade(gold: str, prediction: str, timeout_s: float = 5.0, protocol: str = "lighteval") -> GradeResult:
    """Grade one pair with a lazily created module-level Grader per protocol (stopped at exit).

    The same code grades the training reward and ``aapo eval``; ``aapo grade`` prints its result."""
    with _shared_lock:
        if protocol not in _shared:
            _shared[protocol] = Grader(protocol=protocol)
            atexit.register(_shared[protocol].close)
        grader = _shared[protocol]
    return grader._grade_all([gold], [prediction], timeout_s, timeout_s + _KILL_MARGIN_S)[0]
