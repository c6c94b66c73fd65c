"""Qwen2.5-Math-style answer extraction and equality: the ``simplerl`` grading protocol.

The simpleRL-Zoo / Qwen2.5-Math evaluation (used for the paper's Llama rows) grades in three steps,
re-implemented here from its documented behaviour:

1. **Extract** (:func:`extract_answer`): the text between ``final answer is $`` and ``$. I hope``
   when the model followed the Qwen prompt; else the content of the last ``\\boxed{}`` (or
   ``\\fbox{}``); else what follows the last "the answer is"; else the last number in the text.
2. **Normalise** (:func:`strip_string`): drop LaTeX spacing, ``\\left``/``\\right``, degrees,
   dollars, percent signs, trailing units in ``\\text{}`` or ``\\textnormal{}``, a short ``x =``
   prefix; ``\\dfrac`` and ``\\tfrac`` become ``\\frac``, ``\\frac12`` becomes ``\\frac{1}{2}``,
   ``a/b`` becomes ``\\frac{a}{b}``, ``1,000`` becomes ``1000`` (groups of three digits after a
   leading group that does not start with 0: ``0,111`` stays a list), spaces go.
3. **Compare** (:func:`math_equal`): equal strings; numbers with a base subscript (``1010_2``) by
   their digits and base, never numerically; equal numbers (relative tolerance 1e-4, and the
   reference read as a percentage: x, x/100 and 100x all count); tuples and intervals element by
   element with the same brackets; comma lists of solutions in any order; matrices entry by entry;
   equations by their sides; else symbolic equality through latex2sympy2_extended and sympy
   (difference simplifies to 0, or equal numerically).

Everything here is pure Python with no time or memory bound of its own; :mod:`aapo_app.grader` runs
it in a worker process under the same per-item time limit and memory limit as math-verify (a
MemoryError is never swallowed here: it propagates, and the grader scores the item as an error).
"""

from __future__ import annotations

import math
import re

# --------------------------------------------------------------------------- extraction


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (braces matched), or ``\\boxed x``."""
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


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def extract_answer(text: str) -> str:
    """The model's final answer in ``text``, normalised with :func:`strip_string` ("" if none)."""
    text = text.replace("\u043a\u0438", "")  # a stray Cyrillic "ки" some Qwen checkpoints emit
    answer = None
    start = text.rfind("final answer is $")
    if start >= 0 and "$. I hope" in text[start:]:
        inner = text[start + len("final answer is $"):]
        answer = inner[:inner.find("$. I hope")]
        boxed = last_boxed(answer)
        answer = boxed if boxed is not None else answer
    elif "boxed" in text or "\\fbox" in text:
        answer = last_boxed(text)
    if answer is None and "he answer is" in text:
        answer = text.split("he answer is")[-1].strip()
        answer = answer.lstrip(":").strip()
        answer = re.split(r"\n\n|(?<=[^\d])\.\s", answer)[0]
        answer = answer.strip().rstrip(".").strip("$ ")
    if answer is None:
        numbers = _NUMBER.findall(text.replace(",", ""))
        answer = numbers[-1] if numbers else ""
    return strip_string(answer)


# --------------------------------------------------------------------------- normalisation

_UNIT_WORDS = (
    "degrees", "degree", "cm", "centimeters", "centimeter", "meters", "meter", "mm", "km", "kilometers", "m",
    "inches", "inch", "feet", "foot", "ft", "yards", "yard", "miles", "mile", "mph", "hours", "hour", "minutes",
    "minute", "min", "seconds", "second", "sec", "s", "days", "day", "weeks", "week", "years", "year", "dollars",
    "dollar", "cents", "cent", "units", "unit", "square", "sq", "cubic", "pounds", "pound", "lbs", "kg", "g",
    "grams", "gram", "liters", "liter", "mL", "ml", "percent", "points", "point", "people", "students", "ways",
    "cups", "cup", "coins", "marbles", "apples", "books", "pages", "km/h", "m/s", "cm^2", "m^2", "cm^3", "m^3",
)
_UNIT_TAIL = re.compile(
    r"(?<=[\d}\)])\s*(?:\\(?:text|textnormal|textrm|mbox|mathrm)\{\s*)?(?:"
    + "|".join(re.escape(u) for u in sorted(_UNIT_WORDS, key=len, reverse=True))
    + r")\s*\}?(?:\^\{?[23]\}?)?\s*$"
)


def _fix_fracs(s: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if not part or part[0] == "{":
            out += part
            continue
        if len(part) < 2:
            return s
        a, rest = part[0], part[1:]
        if rest[0] == "{":
            out += "{" + a + "}" + rest
        else:
            out += "{" + a + "}{" + rest[0] + "}" + rest[1:]
    return out


def _fix_sqrt(s: str) -> str:
    """``\\sqrt3`` -> ``\\sqrt{3}``."""
    return re.sub(r"\\sqrt(?!\{|\[)\s*(\w)", r"\\sqrt{\1}", s)


def _fix_slash(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def _unwrap_braces(s: str) -> str:
    """``{5}`` -> ``5`` when the outer braces enclose the whole string."""
    while len(s) >= 2 and s[0] == "{" and s[-1] == "}":
        depth = 0
        for i, ch in enumerate(s):
            depth += ch == "{"
            depth -= ch == "}"
            if depth == 0 and i < len(s) - 1:
                return s
        s = s[1:-1]
    return s


# Thousands separators: groups of exactly three digits after a leading group of one to three digits
# that does not start with 0. "1,000" is 1000; "0,111" is not 111 (a list, or a decimal comma).
_THOUSANDS = re.compile(r"-?[1-9]\d{0,2}(,\d{3})+(\.\d+)?")


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


def strip_string(s: str, skip_unit: bool = False) -> str:
    """Normalise an answer string so that trivially different writings compare equal."""
    s = str(s).strip().replace("\n", "").rstrip(".").strip()
    s = re.sub(r"(?<!\\)\\[!,;:]", "", s)  # LaTeX spacing (not the row break "\\\\")
    s = re.sub(r"(?<!\\)\\ ", " ", s)
    if "matrix" not in s:  # a matrix needs its row separators
        s = s.replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac").replace("\\displaystyle", "")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\bigl", "").replace("\\bigr", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "").replace("\\circ", "").replace("°", "")
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "").replace("\\percent", "")
    if not skip_unit:
        stripped = _UNIT_TAIL.sub("", s).strip()
        if stripped:
            s = stripped
        stripped = re.sub(r"\\(?:text|textnormal|textrm|mbox)\{[^{}]*\}$", "", s).strip()
        if stripped and stripped != s and re.search(r"[\d}]$", stripped):
            s = stripped
    s = re.sub(r"\\(?:text|textnormal|textrm|textbf|mbox|mathrm|mathbf|operatorname)\{([^{}]*)\}", r"\1", s)
    s = s.replace("\\dots", "\\ldots").replace("\\cdots", "\\ldots")
    s = re.sub(r"\s+and\s+", ",", s)
    s = s.replace("infinity", "\\infty")
    if "\\infty" not in s:
        s = re.sub(r"\binf\b", "\\\\infty", s)
    s = s.replace("\\le ", "\\leq ").replace("\\ge ", "\\geq ").replace("\\ne ", "\\neq ")
    s = re.sub(r"^[a-zA-Z]\s*\\in\s*", "", s)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    # "x = 5", "k=3": keep the value when the left side is a short variable name
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0].strip()) <= 2 and sides[1].strip():
        s = sides[1].strip()
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    s = _fix_slash(s)
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    s = _unwrap_braces(s).rstrip(".")
    return s


# --------------------------------------------------------------------------- equality


def parse_number(s: str) -> float | None:
    """A plain number ("1,000", "-2.5", "3e-5", "25%", "\\frac{1}{4}" is not one) or None."""
    s = s.strip().replace("\\%", "%")
    if _THOUSANDS.fullmatch(s.rstrip("%")):  # thousands separators only
        s = s.replace(",", "")
    percent = s.endswith("%")
    s = s.rstrip("%").strip()
    m = re.fullmatch(r"(-?\d*\.?\d+(?:[eE][-+]?\d+)?)(?:\\times10\^\{?(-?\d+)\}?)?", s)
    if not m:
        return None
    value = float(m.group(1)) * (10.0 ** int(m.group(2)) if m.group(2) else 1.0)
    return value / 100 if percent else value


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-12 if b == 0 else 0.0)


def _split_top(s: str, sep: str = ",") -> list[str]:
    """Split at ``sep`` outside any brackets."""
    parts, depth, cur = [], 0, ""
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _bracketed(s: str) -> bool:
    if len(s) < 2 or s[0] not in "([" or s[-1] not in ")]":
        return False
    depth = 0
    for i, ch in enumerate(s):
        depth += ch in "(["
        depth -= ch in ")]"
        if depth == 0 and i < len(s) - 1:
            return False
    return True


_MATRIX = re.compile(r"^\\begin\{[pbvBV]?matrix\}(.*)\\end\{[pbvBV]?matrix\}$", re.DOTALL)


def _matrix_cells(s: str) -> list[list[str]] | None:
    m = _MATRIX.match(s.strip())
    if not m:
        return None
    rows = [r for r in re.split(r"\\\\", m.group(1)) if r.strip()]
    return [[c.strip() for c in r.split("&")] for r in rows]


# A number written in a base: digits, then the base as a subscript ("1112122_3", "10_{2}", "A3_{16}").
_BASE_NUMBER = re.compile(r"([0-9A-Za-z]+)_(?:\{(\d{1,2})\}|(\d{1,2}))")


def base_number(s: str) -> tuple[str, int] | None:
    """(digits, base) of a number with a base subscript, digits upper-cased without leading zeros;
    None if ``s`` is not one (the base outside 2..36, or a digit too large for it: ``x_1``, ``a_2``)."""
    m = _BASE_NUMBER.fullmatch(s.strip())
    if not m:
        return None
    digits, base = m.group(1).upper(), int(m.group(2) or m.group(3))
    if not 2 <= base <= 36 or any(int(c, 36) >= base for c in digits):
        return None
    return digits.lstrip("0") or "0", base


def _base_equal(pred: str, ref: str, p_base: tuple[str, int] | None, r_base: tuple[str, int] | None) -> bool:
    """Numbers in a base compare by digits and base, never numerically (the tolerance would accept
    a wrong digit). A bare digit string against one with a base: the same digits, base left out."""
    if p_base is not None and r_base is not None:
        return p_base == r_base
    other, (digits, _) = (pred, r_base) if r_base is not None else (ref, p_base)
    other = other.strip()
    return re.fullmatch(r"[0-9A-Za-z]+", other) is not None and (other.upper().lstrip("0") or "0") == digits


def math_equal(prediction: str, reference: str, include_percentage: bool = True) -> bool:
    """True iff the (normalised) prediction equals the (normalised) reference mathematically."""
    pred, ref = str(prediction).strip(), str(reference).strip()
    if pred.lower() == ref.lower():
        return True
    if not pred:
        return False
    p_base, r_base = base_number(pred), base_number(ref)
    if p_base is not None or r_base is not None:
        return _base_equal(pred, ref, p_base, r_base)
    p_num, r_num = parse_number(pred), parse_number(ref)
    if p_num is not None and r_num is not None:
        candidates = [r_num / 100, r_num, r_num * 100] if include_percentage else [r_num]
        return any(_close(p_num, c) for c in candidates)

    p_cells, r_cells = _matrix_cells(pred), _matrix_cells(ref)
    if p_cells is not None and r_cells is not None:
        return (len(p_cells) == len(r_cells) and all(len(a) == len(b) for a, b in zip(p_cells, r_cells))
                and all(math_equal(a, b, include_percentage) for pa, ra in zip(p_cells, r_cells)
                        for a, b in zip(pa, ra)))

    # tuples and intervals: same brackets, element by element
    if _bracketed(pred) and _bracketed(ref):
        p_items, r_items = _split_top(pred[1:-1]), _split_top(ref[1:-1])
        if len(p_items) > 1 or len(r_items) > 1:
            return (pred[0] == ref[0] and pred[-1] == ref[-1] and len(p_items) == len(r_items)
                    and all(math_equal(a, b, include_percentage) for a, b in zip(p_items, r_items)))
    # lists of solutions ("1,-2"): any order
    p_items, r_items = _split_top(pred), _split_top(ref)
    if len(r_items) > 1 or len(p_items) > 1:
        if len(p_items) != len(r_items):
            return False
        remaining = list(r_items)
        for a in p_items:
            match = next((b for b in remaining if math_equal(a, b, include_percentage)), None)
            if match is None:
                return False
            remaining.remove(match)
        return True

    # equations: compare lhs - rhs (up to sign); "x=5" against "5" already lost its short lhs
    if pred.count("=") == 1 and ref.count("=") == 1:
        pl, pr = pred.split("=")
        rl, rr = ref.split("=")
        diff_p, diff_r = f"({pl})-({pr})", f"({rl})-({rr})"
        return symbolic_equal(diff_p, diff_r) or symbolic_equal(f"-({diff_p})", diff_r)
    if pred.count("=") == 1 and ref.count("=") == 0:
        return math_equal(pred.split("=")[1], ref, include_percentage)
    return symbolic_equal(pred, ref)


def _to_sympy(s: str):
    from latex2sympy2_extended import latex2sympy

    try:
        return latex2sympy(s)
    except MemoryError:
        raise
    except Exception:
        from sympy.parsing.sympy_parser import (convert_xor, implicit_multiplication_application, parse_expr,
                                                standard_transformations)

        return parse_expr(s.replace("\\", ""), transformations=standard_transformations
                          + (implicit_multiplication_application, convert_xor))


def symbolic_equal(a: str, b: str) -> bool:
    """Symbolic equality through latex2sympy2_extended / sympy: same set, zero difference, or equal values.

    Any error in a step reads as "not equal by that step", except a MemoryError (the grader's worker
    runs under a memory limit): it propagates, so the grader scores the item 0 and counts it as an error."""
    import sympy

    try:
        x, y = _to_sympy(a), _to_sympy(b)
    except MemoryError:
        raise
    except Exception:
        return False
    try:
        if x == y:
            return True
    except MemoryError:
        raise
    except Exception:
        pass
    if isinstance(x, sympy.Set) or isinstance(y, sympy.Set):
        try:
            return bool(x == y) or bool(sympy.simplify(x.symmetric_difference(y)) == sympy.S.EmptySet)
        except MemoryError:
            raise
        except Exception:
            return False
    try:
        if sympy.simplify(x - y) == 0:
            return True
    except MemoryError:
        raise
    except Exception:
        pass
    try:
        fx, fy = complex(sympy.N(x)), complex(sympy.N(y))
        return abs(fx - fy) <= 1e-4 * max(1.0, abs(fy))
    except MemoryError:
        raise
    except Exception:
        return False
