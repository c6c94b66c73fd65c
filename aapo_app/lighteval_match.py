"""lighteval 0.8.1's equality of extracted answers: the ``lighteval`` protocol's comparison.

open-rs ``evaluate.py`` (the paper's Qwen rows) scores with lighteval 0.8.1's extractive match at
``precision=5``. Extraction runs through math-verify here (the same regular expressions and the same
latex2sympy2_extended parser, with lighteval 0.8.1's unit handling, see :mod:`aapo_app.grader`); the
comparison of what was extracted is this module, written from lighteval 0.8.1's rules because
math-verify's own ``verify`` has since become more lenient (it evaluates ``148.5e`` or ``\\sqrt{2}``
numerically against a decimal; lighteval 0.8.1 compares decimals only with plain numbers).

:func:`answers_match` is true iff some (gold, prediction) pair of extracted candidates is equal:

* two strings (what was extracted when nothing parsed): equal and non-empty after stripping;
* two sympy objects, :func:`expr_equal`, in this order: an assignment gold (``x = 3``) against a
  non-equation compares its right side, an equation prediction against a non-equation gold its right
  side, a relation gold against a set prediction as a set; then equal after ``doit`` (or as strings);
  relations by ``lhs - rhs`` (also flipped); sets, tuples and intervals element by element (open
  intervals against 2-tuples; finite sets in sorted order); symbols by name (``e`` and E alike, a
  product of letters against a word); anything else numerically: when one side is a decimal and both
  are plain numbers (or percentages) rounded to ``precision`` places, when one side is a number
  exactly, otherwise a zero difference; and last symbolically (``simplify(a - b)`` is zero).

Each step that raises counts as "not equal by that step"; a MemoryError propagates (the grader's
worker scores it an error).
"""

from __future__ import annotations

from itertools import product


def _doit(x):
    try:
        return x.doit()
    except MemoryError:
        raise
    except Exception:
        return x


def _is_number_or_percent(x, kind) -> bool:
    """``x`` is a ``kind`` (sympy Number, Float), or ``kind * 1/100`` as a percentage is parsed."""
    from sympy import Mul, Rational, UnevaluatedExpr

    if isinstance(x, kind):
        return True
    if not (isinstance(x, Mul) and len(x.args) == 2 and isinstance(x.args[0], kind)):
        return False
    factor = x.args[1]
    if isinstance(factor, UnevaluatedExpr):  # latex2sympy2_extended >= 1.10 keeps 1/100 unevaluated
        factor = factor.args[0]
    return factor == Rational(1, 100)


def numeric_equal(a, b, precision: int) -> bool:
    from sympy import Float, MatrixBase, Number
    from sympy.matrices.expressions import MatrixExpr

    if isinstance(a, (MatrixBase, MatrixExpr)) and isinstance(b, (MatrixBase, MatrixExpr)):
        a, b = _doit(a), _doit(b)
        if isinstance(a, MatrixBase) and isinstance(b, MatrixBase) and a.shape == b.shape:
            return all(numeric_equal(x, y, precision) for x, y in zip(a.flat(), b.flat()))
        return False
    if _is_number_or_percent(a, Number) or _is_number_or_percent(b, Number):
        if _is_number_or_percent(a, Float) or _is_number_or_percent(b, Float):
            a, b = _doit(a), _doit(b)
            return isinstance(a, Number) and isinstance(b, Number) and a.round(precision) == b.round(precision)
        return _doit(a) == _doit(b)
    try:
        return (a - b).evalf(chop=True) == 0
    except MemoryError:
        raise
    except Exception:
        return False


def symbolic_equal(a, b) -> bool:
    from sympy import Basic, MatrixBase, simplify

    try:
        diff = simplify(a - b)
        return (isinstance(diff, MatrixBase) and diff.is_zero_matrix) or (isinstance(diff, Basic) and bool(diff.is_zero))
    except MemoryError:
        raise
    except Exception:
        return False


def _is_relation(x) -> bool:
    from sympy import And
    from sympy.core.relational import Relational

    return isinstance(x, Relational) or (isinstance(x, And) and all(isinstance(a, Relational) for a in x.args))


def _is_equation(x) -> bool:
    from sympy import And, Eq

    return isinstance(x, Eq) or (isinstance(x, And) and len(x.args) > 0 and all(isinstance(a, Eq) for a in x.args))


def _is_assignment(x) -> bool:
    from latex2sympy2_extended.latex2sympy2 import is_expr_of_only_symbols
    from sympy import And, Eq

    if isinstance(x, Eq):
        return bool(is_expr_of_only_symbols(x.lhs))
    return isinstance(x, And) and len(x.args) > 0 and all(isinstance(a, Eq) for a in x.args) \
        and bool(is_expr_of_only_symbols(x.args[0].lhs))


def _last_relation(x):
    from sympy import And

    while isinstance(x, And):
        x = x.args[-1]
    return x


def _unwrap_functions(x):
    """Undefined functions ``f(x)`` become symbols ``f_x`` (so a relation can become a set)."""
    from sympy import Basic, Symbol
    from sympy.core.function import UndefinedFunction

    if not isinstance(x, Basic):
        return x
    if isinstance(getattr(x, "func", None), UndefinedFunction):
        return Symbol(f"{x.func.__name__}_{'_'.join(str(_unwrap_functions(a)) for a in x.args)}")
    try:
        args = [_unwrap_functions(a) for a in x.args]
        if args:
            return x.func(*args)
    except MemoryError:
        raise
    except Exception:
        pass
    return x


def _same_after_doit(a, b) -> bool:
    a, b = _doit(a), _doit(b)
    try:
        return bool(a == b) or str(a).strip() == str(b).strip()
    except MemoryError:
        raise
    except Exception:
        return False


def _relations_equal(gold, pred, precision: int) -> bool:
    from sympy import And, Eq, GreaterThan, LessThan, StrictGreaterThan, StrictLessThan

    if isinstance(gold, And):
        return all(_relations_equal(g, p, precision) for g, p in zip(gold.args, pred.args))
    try:
        if type(gold) is type(pred) and expr_equal(gold.lhs - gold.rhs, pred.lhs - pred.rhs, precision):
            return True
    except MemoryError:
        raise
    except Exception:
        pass
    flipped = ((GreaterThan, LessThan), (LessThan, GreaterThan), (StrictGreaterThan, StrictLessThan),
               (StrictLessThan, StrictGreaterThan), (Eq, Eq))
    if any(isinstance(gold, g) and isinstance(pred, p) for g, p in flipped):
        try:
            return expr_equal(gold.lhs - gold.rhs, pred.rhs - pred.lhs, precision)
        except MemoryError:
            raise
        except Exception:
            return False
    return False


def _sort_key(x):
    from sympy import default_sort_key

    if _is_assignment(x):
        x = _last_relation(x).rhs
    try:
        return default_sort_key(x.evalf())
    except MemoryError:
        raise
    except Exception:
        return default_sort_key(x)


def _elements_equal(gold, pred, precision: int) -> bool:
    """Finite sets and tuples element by element; a finite set's elements in sorted order, a
    tuple against a set as written."""
    from latex2sympy2_extended.sets import FiniteSet as WrittenSet
    from sympy import FiniteSet, Tuple, ordered

    if len(gold) != len(pred):
        return False
    if isinstance(gold, FiniteSet):
        gold_args = list(ordered(gold.args, keys=_sort_key, default=False))
        pred_args = list(ordered(pred.args, keys=_sort_key, default=False))
    elif isinstance(gold, Tuple) and isinstance(pred, WrittenSet):
        gold_args, pred_args = gold.args, pred._unsorted_args
    elif isinstance(pred, FiniteSet):
        gold_args, pred_args = gold.args, list(ordered(pred.args, keys=_sort_key, default=False))
    else:
        gold_args, pred_args = gold.args, pred.args
    return all(expr_equal(a, b, precision) for a, b in zip(gold_args, pred_args))


def _sets_equal(gold, pred, precision: int) -> bool:
    from sympy import FiniteSet, Interval, Set, Tuple

    a = gold if isinstance(gold, (Set, Tuple)) else FiniteSet(gold)
    b = pred if isinstance(pred, (Set, Tuple)) else FiniteSet(pred)
    if isinstance(a, Interval) and isinstance(b, Interval):
        return (a.left_open == b.left_open and a.right_open == b.right_open
                and expr_equal(a.start, b.start, precision) and expr_equal(a.end, b.end, precision))
    if a == b:
        return True
    if isinstance(a, Set) and isinstance(b, Set) and a.symmetric_difference(b).is_empty:
        return True
    if isinstance(a, (FiniteSet, Tuple)) and isinstance(b, (FiniteSet, Tuple)):
        return _elements_equal(a, b, precision)
    # "(1,2)" parses as an open interval; "1,2" as a set
    if isinstance(a, Interval) and isinstance(b, (FiniteSet, Tuple)) and a.is_open and len(b) == 2:
        return _elements_equal(Tuple(a.start, a.end), b, precision)
    if isinstance(b, Interval) and isinstance(a, (FiniteSet, Tuple)) and b.is_open and len(a) == 2:
        return _elements_equal(a, Tuple(b.start, b.end), precision)
    return False


def _symbols_equal(gold, pred) -> bool:
    from sympy import E, Mul, Symbol

    if (isinstance(gold, Symbol) and gold.name.lower() == "e" and pred == E) or \
            (isinstance(pred, Symbol) and pred.name.lower() == "e" and gold == E):
        return True
    for word, letters in ((gold, pred), (pred, gold)):
        if isinstance(word, Symbol) and isinstance(letters, Mul) and \
                all(a == E or isinstance(a, Symbol) for a in letters.args):
            return word.name.lower() == "".join(a.name if isinstance(a, Symbol) else "e" for a in letters.args).lower()
    return bool(gold == pred)


def expr_equal(gold, pred, precision: int) -> bool:
    """lighteval 0.8.1's equality of two parsed answers (see the module docstring for the order)."""
    from sympy import Basic, MatrixBase, Set, Symbol, Tuple

    if _is_assignment(gold) and not _is_equation(pred):
        gold = _last_relation(gold).rhs
    if _is_equation(pred) and not _is_equation(gold):
        pred = _last_relation(pred).rhs
    if _is_relation(gold) and isinstance(pred, Set):
        try:
            gold = _unwrap_functions(gold).as_set()
        except MemoryError:
            raise
        except Exception:
            pass
    if _same_after_doit(gold, pred):
        return True
    if _is_relation(gold) and _is_relation(pred):
        return _relations_equal(gold, pred, precision)
    if isinstance(gold, (Set, Tuple)) or isinstance(pred, (Set, Tuple)):
        return _sets_equal(gold, pred, precision)
    if isinstance(gold, Symbol) or isinstance(pred, Symbol):
        return _symbols_equal(gold, pred)
    if isinstance(gold, (Basic, MatrixBase)) and isinstance(pred, (Basic, MatrixBase)):
        return numeric_equal(gold, pred, precision) or symbolic_equal(gold, pred)
    return False


def answers_match(golds: list, predictions: list, precision: int = 5) -> bool:
    """True iff some extracted gold equals some extracted prediction (strings with strings, parsed
    answers with parsed answers)."""
    from sympy import Basic, MatrixBase

    for gold, pred in product(golds, predictions):
        try:
            if isinstance(gold, (Basic, MatrixBase)) and isinstance(pred, (Basic, MatrixBase)):
                if expr_equal(gold, pred, precision):
                    return True
            elif isinstance(gold, str) and isinstance(pred, str):
                if gold.strip() and gold.strip() == pred.strip():
                    return True
        except MemoryError:
            raise
        except Exception:
            pass
    return False
