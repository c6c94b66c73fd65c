"""The ``simplerl`` grading protocol: the Qwen2.5-Math evaluation's answer extraction and equality.

The paper's Llama rows were evaluated with SimpleRL-Zoo's copy of the Qwen2.5-Math evaluation
(``examples/simplelr_math_eval``: ``parser.py`` extracts and normalises, ``grader.py`` compares).
This module reproduces its verdicts, rule for rule, in our own code; ``evaluation/differential_check.py``
runs both on every gold of the five benchmarks and on varied predictions per gold (see
docs/evaluation.md for the measured agreement). The rules, including the surprising ones:

1. **Extract** (:func:`extract_answer`), first branch that applies: the text between
   ``final answer is $`` and ``$. I hope``; else what follows the last ``boxed`` (its braced content,
   or up to the next ``$``); else what follows the last "he answer is"; else the last "final answer
   is"; else the last number in the text (commas removed). Newlines go, a leading ``:`` and a
   trailing ``.`` or ``/`` go, then :func:`strip_string` runs on it twice (once in extraction, once
   when the prediction is scored).
2. **Normalise** (:func:`strip_string`): a trailing ``\\text{...}`` goes (a unit) unless it is the
   whole answer; unit words (the Qwen2.5-Math list, :data:`UNIT_WORDS`, e.g. ``cm``, ``degree``, but
   also single letters such as ``a``, ``m``, ``s``) are removed wherever they stand alone, except for
   Minerva, whose answers keep them; ``\\text{X}`` becomes ``X``; degrees, dollars, ``%`` and ``x=``
   prefixes go; number words become digits ("two" -> 2); ``5.0`` becomes ``5``; ``a/b`` becomes
   ``\\frac{a}{b}``; spaces go.
3. **Compare** (:func:`math_equal`): equal strings (case-insensitive); a letter A-E against a choice;
   numbers (commas dropped) within relative tolerance 1e-4, the reference also read as x/100 and
   100x; equal after dropping every bracket and brace (so ``(3,4]`` equals ``[3,4)``); bracketed
   lists element by element **in order**, whatever the bracket types; matrices entry by entry;
   equations by their sides; else sympy: the same string or value, a zero difference, or equal
   numerically (relative 1e-4).

Symbolic parsing follows the reference's order: sympy's ANTLR LaTeX parser (whose grammar reads
``1,-2`` as 1, which is why the reference compares lists by their first item there), sympy's
``parse_expr``, then latex2sympy; the reference's last parser is its own copy of latex2sympy, ours is
latex2sympy2_extended, and ``parse_expr`` (Python's eval underneath) is never given text that could
reach beyond sympy. The differential check counts the verdicts where these differ.

Everything here is pure Python with no time or memory bound of its own; :mod:`aapo_app.grader` runs
it in a worker process under a per-item time limit and memory limit (a MemoryError is never
swallowed here: it propagates, and the grader scores the item as an error).
"""

from __future__ import annotations

import math
import re

# --------------------------------------------------------------------------- extraction


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces matched), or ``\\boxed x``.

    Used to display and to compare a prediction word for word under the lighteval protocol, and to
    read Minerva golds; the simplerl extraction has its own rule (:func:`extract_answer`)."""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    rest = text[idx:]
    rest = rest[len("\\boxed"):] if rest.startswith("\\boxed") else rest[len("\\fbox"):]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):  # "\boxed 5"
        return rest.strip().split("$")[0].split()[0] if rest.strip() else None
    rest = rest.lstrip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None  # unbalanced: the model stopped mid-answer


def _after_last_boxed(text: str) -> str:
    """What the reference takes after the last ``boxed``: the braced group (to its matching brace,
    or to the end of the text when it never closes), else the text up to the next ``$``."""
    tail = text.split("boxed")[-1]
    if not tail.startswith("{"):
        return tail.split("$")[0].strip()
    depth, out = 1, []
    for ch in tail[1:]:
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            break
        out.append(ch)
    return "".join(out)


_LAST_NUMBER = re.compile(r"-?\d*\.?\d+")

# Benchmarks whose answers keep their unit words (the reference's STRIP_EXCEPTIONS, for our benchmarks).
KEEP_UNITS = frozenset({"minerva"})


def _raw_answer(text: str) -> str:
    """The answer text the reference's extraction takes, before normalisation."""
    text = text.replace("\u043a\u0438", "")  # a stray Cyrillic "ки" some Qwen checkpoints emit
    if "final answer is $" in text and "$. I hope" in text:
        pred = text.split("final answer is $", 1)[1].split("$. I hope", 1)[0].strip()
    elif "boxed" in text:
        if not text.split("boxed")[-1]:
            return ""
        pred = _after_last_boxed(text)
    elif "he answer is" in text:
        pred = text.split("he answer is")[-1].strip()
    elif "final answer is" in text:
        pred = text.split("final answer is")[-1].strip()
    elif "\u7b54\u6848\u662f" in text:  # "the answer is" in Chinese
        pred = text.split("\u7b54\u6848\u662f")[1].strip().split("\n\n")[0].strip()
    else:
        numbers = _LAST_NUMBER.findall(text.replace(",", ""))
        pred = numbers[-1] if numbers else ""
    pred = re.sub(r"\n\s*", "", pred)
    if pred.startswith(":"):
        pred = pred[1:]
    for end in (".", "/"):
        if pred.endswith(end):
            pred = pred[:-1]
    return pred


def extract_answer(text: str, benchmark: str | None = None) -> str:
    """The model's final answer in ``text``, normalised as the reference scores it ("" if none):
    :func:`strip_string` twice, once in extraction and once when the prediction is scored.

    ``benchmark`` "minerva" keeps unit words (the reference's ``minerva_math`` exception)."""
    skip_unit = benchmark in KEEP_UNITS
    return strip_string(strip_string(_raw_answer(text), skip_unit), skip_unit)


def reference_gold(benchmark: str, row: dict) -> str:
    """The gold answer the reference scores against, from one row of a benchmark file (the layout of
    the Qwen2.5-Math evaluation data): MATH-500 and Minerva from their solution's extracted answer,
    OlympiadBench from ``final_answer[0]`` without its ``$``, AIME and AMC from ``answer``."""
    if benchmark in ("math500", "minerva"):
        skip_unit = benchmark in KEEP_UNITS
        gold = strip_string(_raw_answer(str(row["solution"])), skip_unit)
        if skip_unit:  # the reference only rewrites the comparison operators here
            return gold.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
        return strip_string(gold)
    if benchmark == "olympiadbench":
        answers = row["final_answer"]
        gold = (answers[0] if isinstance(answers, list) else str(answers)).strip("$")
    else:
        gold = row["answer"]
    return strip_string(gold)


# --------------------------------------------------------------------------- normalisation

# The unit words the reference removes (mostly from MathQA), each also with a trailing "s". Each is
# used as a regular expression between non-word characters, as the reference does: "q ." also
# removes "q" followed by any character, and the single letters remove lone variables ("a", "m").
# The order matters (an earlier word is removed first) and is the reference's.
UNIT_WORDS = (
    "east", "degree", "mph", "kmph", "ft", "m sqaure", " m east", "sq m", "deg", "mile", "q .", "monkey",
    "prime", "ratio", "profit of rs", "rd", "o", "gm", "p . m", "lb", "tile", "per", "dm", "lt", "gain", "ab",
    "way", "west", "a .", "b .", "c .", "d .", "e .", "f .", "g .", "h .", "t", "a", "h", "no change", "men",
    "soldier", "pie", "bc", "excess", "st", "inches", "noon", "percent", "by", "gal", "kmh", "c", "acre", "rise",
    "a . m", "th", "π r 2", "sq", "mark", "l", "toy", "coin", "sq . m", "gallon", "° f", "profit", "minw", "yr",
    "women", "feet", "am", "pm", "hr", "cu cm", "square", "v â € ™", "are", "rupee", "rounds", "cubic", "cc",
    "mtr", "s", "ohm", "number", "kmph", "day", "hour", "minute", "min", "second", "man", "woman", "sec", "cube",
    "mt", "sq inch", "mp", "∏ cm ³", "hectare", "more", "sec", "unit", "cu . m", "cm 2", "rs .", "rs", "kg", "g",
    "month", "km", "m", "cm", "mm", "apple", "liter", "loss", "yard", "pure", "year", "increase", "decrease", "d",
    "less", "Surface", "litre", "pi sq m", "s .", "metre", "meter", "inch",
)
_UNIT_PATTERNS = tuple(re.compile(r"(^|\W)" + w + r"($|\W)") for w in UNIT_WORDS + tuple(w + "s" for w in UNIT_WORDS))


def _word_to_number(text: str) -> str:
    """"two" -> "2" (word2number's reading; anything it cannot read stays as it is)."""
    from word2number import w2n

    try:
        return str(w2n.word_to_num(text))
    except Exception:
        return text


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``; unchanged if a ``\\frac`` has
    fewer than two characters after it."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{"):
            out += part
            continue
        if len(part) < 2:
            return s
        a, b, rest = part[0], part[1], part[2:]
        out += "{" + a + "}" + (b + rest if b == "{" else "{" + b + "}" + rest)
    return out


def _fix_slash(s: str) -> str:
    """``a/b`` with integer a and b (or a square root on either side) -> ``\\frac{a}{b}``."""
    sides = s.split("/")
    if len(sides) != 2:
        return s
    try:
        a = sides[0] if "sqrt" in sides[0] else int(sides[0])
        b = sides[1] if "sqrt" in sides[1] else int(sides[1])
    except ValueError:
        return s
    return f"\\frac{{{a}}}{{{b}}}" if s == f"{a}/{b}" else s


def braces_balanced(s: str) -> bool:
    """True iff the unescaped braces of ``s`` pair up (``\\{`` and ``\\}`` are set braces, not counted).

    A gold that fails this (``\\frac{1}{2``) is malformed: the grader reports it as an error."""
    depth = 0
    for ch in re.sub(r"\\[{}]", "", s):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def strip_string(s, skip_unit: bool = False) -> str:
    """Normalise an answer string the way the reference does, step for step (the order matters)."""
    s = str(s).strip().replace("\n", "").rstrip(".")
    s = s.replace("\\!", "")
    s = re.sub(r"\\begin\{array\}\{.*?\}", r"\\begin{pmatrix}", s)
    s = re.sub(r"\\end\{array\}", r"\\end{pmatrix}", s).replace("bmatrix", "pmatrix")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\neq", "\\ne").replace("\\leq", "\\le").replace("\\geq", "\\ge")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\{", "{").replace("\\}", "}")
    without_text = re.sub(r"\\text{.*?}$", "", s).strip()  # a trailing \text{...} is a unit
    if without_text and without_text != s:
        s = without_text
    if not skip_unit:
        for _ in range(2):
            for pattern in _UNIT_PATTERNS:
                removed = pattern.sub(r"\1\2", s)
                if removed:
                    s = removed
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "").replace("\\(", "").replace("\\)", "")
    s = _word_to_number(s)
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    for prefix in ("x=", "y=", "z=", "x\\in", "y\\in", "z\\in", "x\\to", "y\\to", "z\\to"):
        s = s.replace(prefix, "")
    s = s.replace("\\emptyset", "{}").replace("(-\\infty,\\infty)", "\\mathbb{R}")
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = s.replace("inf", "\\infty")
    s = s.replace("+\\inity", "\\infty")
    s = s.replace("and", "").replace("\\mathbf", "")
    s = re.sub(r"\\mbox{.*?}", "", s)
    if "j" in s and "i" not in s:
        s = s.replace("j", "i")
    s = re.sub(r"(\d+)\.0*([^\d])", r"\1\2", s)  # "5.00x" -> "5x"
    s = re.sub(r"(\d+)\.0*$", r"\1", s)  # "27.0" -> "27"
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "k = 5" -> " 5"
        s = sides[1]
    s = re.sub(r"\\sqrt(\w+)", r"\\sqrt{\1}", s)
    s = s.replace(" ", "")
    return _fix_slash(_fix_fracs(s))


# --------------------------------------------------------------------------- equality


def _choice(pred: str) -> str:
    """The last standalone letter A-E in ``pred`` (a multiple-choice answer), else ``pred`` trimmed."""
    pred = pred.strip("\n").rstrip(".").rstrip("/").strip(" ").lstrip(":")
    letters = re.findall(r"\b(A|B|C|D|E)\b", pred.upper())
    pred = letters[-1] if letters else pred.strip().strip(".")
    return pred.rstrip(".").rstrip("/")


def parse_number(s) -> float | None:
    """The reference's reading of a plain number: commas dropped, then ``float``; ``x%``/``x\\%`` is x/100."""
    s = str(s).replace(",", "")
    try:
        return float(s)
    except ValueError:
        pass
    if s.endswith("%"):
        s = s[:-1]
        if s.endswith("\\"):
            s = s[:-1]
        try:
            return float(s) / 100
        except ValueError:
            pass
    return None


def _close(pred: float, ref: float) -> bool:
    return math.isclose(ref, pred, rel_tol=1e-4)


def _as_pmatrix(s: str) -> str:
    """``{a,b}`` groups -> pmatrix columns, as the reference rewrites a gold to compare with a matrix."""
    groups = re.findall(r"\{.*,.*\}", s.strip())
    return ", ".join("\\begin{pmatrix}" + g.strip("{}").replace(",", "\\") + "\\end{pmatrix}" for g in groups)


_BRACKETED = re.compile(r"(\(|\[).+(\)|\])")
_MATRIX_BEGIN = ("\\begin{pmatrix}", "\\begin{bmatrix}")
_MATRIX_END = ("\\end{pmatrix}", "\\end{bmatrix}")


def _matrix_rows(s: str) -> list[list[str]]:
    body = s[len("\\begin{pmatrix}"):-len("\\end{pmatrix}")]
    return [line.strip().split("&") for line in body.split("\\\\") if line.strip()]


def math_equal(prediction, reference, include_percentage: bool = True) -> bool:
    """True iff the (normalised) prediction equals the (normalised) reference under the reference's rules."""
    if prediction is None or reference is None:
        return False
    if str(prediction).strip().lower() == str(reference).strip().lower():
        return True
    if reference in ("A", "B", "C", "D", "E") and _choice(prediction) == reference:
        return True
    p_num, r_num = parse_number(prediction), parse_number(reference)
    if p_num is not None and r_num is not None:
        candidates = [r_num / 100, r_num, r_num * 100] if include_percentage else [r_num]
        return any(_close(p_num, c) for c in candidates)
    if not prediction:
        return False

    pred, ref = str(prediction).strip(), str(reference).strip()
    if "pmatrix" in pred and "pmatrix" not in ref:
        ref = _as_pmatrix(ref)

    # every bracket and brace dropped: "(3,4]" equals "[3,4)"
    p_bare, r_bare = pred, ref
    if (pred.startswith("[") and pred.endswith("]") and not ref.startswith("(")) or \
            (pred.startswith("(") and pred.endswith(")") and not ref.startswith("[")):
        p_bare, r_bare = p_bare.strip("[]()"), r_bare.strip("[]()")
    for ch in "{}()":
        p_bare, r_bare = p_bare.replace(ch, ""), r_bare.replace(ch, "")
    if p_bare.lower() == r_bare.lower():
        return True

    # bracketed lists: element by element, in order, whatever the brackets
    if _BRACKETED.match(pred) and _BRACKETED.match(ref):
        p_items, r_items = pred[1:-1].split(","), ref[1:-1].split(",")
        if len(p_items) == len(r_items) and all(
                math_equal(a, b, include_percentage) for a, b in zip(p_items, r_items)):
            return True

    if pred.startswith(_MATRIX_BEGIN) and pred.endswith(_MATRIX_END) and \
            ref.startswith(_MATRIX_BEGIN) and ref.endswith(_MATRIX_END):
        p_rows, r_rows = _matrix_rows(pred), _matrix_rows(ref)
        if len(p_rows) == len(r_rows) and all(
                len(pr) == len(rr) and all(math_equal(a, b, include_percentage) for a, b in zip(pr, rr))
                for pr, rr in zip(p_rows, r_rows)):
            return True

    if pred.count("=") == 1 and ref.count("=") == 1:
        pl, pr = (x.strip() for x in pred.split("="))
        rl, rr = (x.strip() for x in ref.split("="))
        p_diff, r_diff = f"{pl} - ({pr})", f"{rl} - ({rr})"
        if symbolic_equal(p_diff, r_diff) or symbolic_equal(f"-({p_diff})", r_diff):
            return True
    elif pred.count("=") == 1 and len(pred.split("=")[0].strip()) <= 2 and "=" not in ref:
        if math_equal(pred.split("=")[1], ref, include_percentage):
            return True
    elif ref.count("=") == 1 and len(ref.split("=")[0].strip()) <= 2 and "=" not in pred:
        if math_equal(pred, ref.split("=")[1], include_percentage):
            return True
    return symbolic_equal(pred, ref)


# parse_expr runs Python's eval on its (transformed) input; model output that could name an attribute,
# a dunder, a string or a lambda never goes there (the reference does not guard; no answer needs these).
_UNSAFE_FOR_EVAL = re.compile(r"__|[\"'`]|\.\s*[A-Za-z_]|\blambda\b|\bimport\b")


def _to_sympy(s: str):
    """``s`` as a sympy object, parsed as the reference does: sympy's LaTeX parser, else ``parse_expr``,
    else latex2sympy; each first with ``\\\\`` read as ``\\``, then as written. A string nothing
    parses stays a string."""
    from sympy.parsing.sympy_parser import parse_expr

    for parse in (_sympy_parse_latex, parse_expr, _latex2sympy_as_the_reference):
        for text in (s.replace("\\\\", "\\"), s):
            if parse is parse_expr and _UNSAFE_FOR_EVAL.search(text):
                continue  # parse_expr evaluates Python: never on text that could reach beyond sympy
            try:
                return parse(text)
            except MemoryError:
                raise
            except Exception:
                pass
    return s


def _latex2sympy_as_the_reference(s: str):
    """latex2sympy2_extended, shaped like the reference's own latex2sympy copy where the two differ on
    lists: a comma inside brackets (a tuple, an interval, a list of tuples) does not parse there, and a
    bare comma list (``1,2``, ``\\{1,2\\}``) is a Python list, so it compares in order."""
    from latex2sympy2_extended import latex2sympy

    depth, top_commas = 0, []
    for i, ch in enumerate(s):
        depth += ch in "(["
        depth -= ch in ")]"
        if ch == ",":
            if depth > 0:
                raise ValueError("a comma inside brackets")
            top_commas.append(i)
    if not top_commas:
        return latex2sympy(s)
    body = s.replace("\\{", "").replace("\\}", "")
    return [latex2sympy(part) for part in body.split(",")]


def _sympy_parse_latex(s: str):
    """sympy's ANTLR LaTeX parser (``sympy.parsing.latex.parse_latex``), which the reference tries
    first. Its grammar reads only the first item of a list (``1,-2`` is 1) and drops subscripts
    (``1112122_3`` is 1112122), and the reference's verdicts follow from that. sympy gates it on the
    4.11 ANTLR runtime; its generated parser also runs on the runtime latex2sympy2_extended brings
    (4.13), so it is called here without the gate (the runtime's version notice silenced)."""
    import contextlib
    import io

    import antlr4
    from sympy.parsing.latex import _parse_latex_antlr as impl

    text = s.strip()
    listener = impl.MathErrorListener(text)
    with contextlib.redirect_stdout(io.StringIO()):
        lexer = impl.LaTeXLexer(antlr4.InputStream(text))
        lexer.removeErrorListeners()
        lexer.addErrorListener(listener)
        parser = impl.LaTeXParser(antlr4.CommonTokenStream(lexer))
        parser.removeErrorListeners()
        parser.addErrorListener(listener)
        return impl.convert_relation(parser.math().relation())


def symbolic_equal(a: str, b: str) -> bool:
    """Equal as sympy objects: the same string or value, ``a.equals(b)`` or a difference that
    simplifies to 0, equal sides of equations, equal values within relative 1e-4, or matrices equal
    to 3 decimals. Any error in a step reads as "not equal by that step", except a MemoryError (the
    grader's worker runs under a memory limit): it propagates, so the grader scores the item an error."""
    from sympy import N, simplify

    try:
        x, y = _to_sympy(a), _to_sympy(b)
    except MemoryError:
        raise
    except Exception:
        return False
    steps = (
        lambda: str(x) == str(y) or x == y,
        lambda: x.equals(y) or simplify(x - y) == 0,
        lambda: abs(x.lhs - x.rhs).equals(abs(y.lhs - y.rhs)),
        lambda: _close(float(N(x)), float(N(y))),
        lambda: x.shape == y.shape and x.applyfunc(lambda v: round(v, 3)).equals(y.applyfunc(lambda v: round(v, 3))),
    )
    for step in steps:
        try:
            if step():
                return True
        except MemoryError:
            raise
        except Exception:
            pass
    return False
