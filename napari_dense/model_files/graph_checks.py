"""What the graph of a serialised program may hold: torch operators, plain shape expressions
and plain size guards (nothing that torch would ``eval``, ``exec`` or look up by name).

:func:`torch.export.load` evaluates every symbolic-shape string with ``sympy.sympify`` (an
``eval``), ``ExportedProgram.module()`` ``exec``-s the program's ``guards_code``, and a node's
target is looked up by name under ``torch``, ``math`` or ``operator`` and called when the
program runs. :func:`check_graph` accepts targets ``torch.ops.<namespace>.<op>[.<overload>]``
and :data:`SAFE_FUNCTION_TARGETS`, symbolic expressions that are sympy constructors of symbols
and numbers, and guards that compare input sizes.
"""

from __future__ import annotations

import ast
import re
from typing import Any

from napari_dense.model_files.errors import REEXPORT, ArchiveProblem

__all__ = ["SAFE_FUNCTION_TARGETS", "check_graph"]

#: Functions a graph node may call besides ``torch.ops`` operators (serialised names).
SAFE_FUNCTION_TARGETS = frozenset(
    [f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "truediv", "floordiv")]
    + [f"_operator.{name}" for name in ("mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt")]
    + [f"_operator.{name}" for name in ("le", "gt", "ge", "and_", "or_", "not_", "invert")]
    + [f"math.{name}" for name in ("ceil", "floor", "trunc", "sqrt")]
    + [f"torch.{name}" for name in ("sym_max", "sym_min", "sym_float", "sym_int", "sym_not")]
    + ["torch.sym_ite", "torch.sym_sqrt", "torch.sym_sum", "torch._sym_sqrt"]
)
_OP_TARGET = re.compile(
    r"torch\.ops\.[A-Za-z][A-Za-z0-9_]*\.[A-Za-z][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)?"
)
# Sympy constructors that symbolic shapes are written with (``srepr``), and torch's functions.
_SYMPY_CALLS = frozenset(
    "Symbol Integer Rational Float Add Mul Pow Mod Max Min Abs floor ceiling Eq Ne Lt Le Gt Ge "
    "StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not "
    "Piecewise ExprCondPair FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt "
    "FloorToInt CeilDiv LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv "
    "IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal ToFloat "
    "Identity".split()
)
_SYMPY_NAMES = frozenset("oo zoo nan true false True False pi E".split())
_SYMBOL = re.compile(r"[a-z]+[0-9]+")
_PLAIN_STRING = re.compile(r"[A-Za-z0-9_.+\-]*")
_GUARD_METHODS = frozenset({"size", "stride", "dim", "numel", "storage_offset"})
# Syntax allowed in both: arithmetic, comparisons and boolean logic.
_OPERATORS: tuple[type[ast.AST], ...] = (ast.Expression, ast.Load, ast.BinOp, ast.UnaryOp)
_OPERATORS += (ast.BoolOp, ast.Compare, ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv)
_OPERATORS += (ast.Mod, ast.Pow, ast.USub, ast.UAdd, ast.Not, ast.And, ast.Or, ast.Eq)
_OPERATORS += (ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def check_graph(name: str, program: Any) -> None:
    """Targets, symbolic expressions and guards of a serialised program (see module docs)."""
    if not isinstance(program, dict):
        raise ArchiveProblem(f"{name} is not a serialised program; {REEXPORT}")
    guards = program.get("guards_code") or []
    if not isinstance(guards, list):
        raise ArchiveProblem(f"{name}: guards_code is not a list; {REEXPORT}")
    for guard in guards:
        if not (isinstance(guard, str) and _is_safe_guard(guard)):
            raise ArchiveProblem(
                f"{name} holds a guard that is not a plain size check ({str(guard)[:80]!r}), "
                f"Python code torch would run; {REEXPORT}"
            )
    stack: list[Any] = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            target = item.get("target")
            if "inputs" in item and isinstance(target, str) and not _is_safe_target(target):
                raise ArchiveProblem(
                    f"{name} calls {target[:80]!r}, which is not a torch operator; {REEXPORT}"
                )
            expression = item.get("expr_str")
            if expression is not None and not (
                isinstance(expression, str) and _is_safe_expression(expression)
            ):
                raise ArchiveProblem(
                    f"{name} holds a symbolic shape that is not a plain expression "
                    f"({str(expression)[:80]!r}), Python code torch would evaluate; {REEXPORT}"
                )
            stack.extend(item.values())


def _is_safe_target(target: str) -> bool:
    return target in SAFE_FUNCTION_TARGETS or bool(_OP_TARGET.fullmatch(target))


def _parse(text: str) -> ast.AST | None:
    if len(text) > 10_000:
        return None
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None


def _is_safe_expression(text: str) -> bool:
    """A sympy ``srepr`` of symbols and numbers: ``Symbol('s31', positive=True, integer=True)``."""
    tree = _parse(text)
    if tree is None:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
                return False
        elif isinstance(node, ast.Name):
            if not (
                node.id in _SYMPY_CALLS or node.id in _SYMPY_NAMES or _SYMBOL.fullmatch(node.id)
            ):
                return False
        elif isinstance(node, ast.keyword):
            if node.arg is None or not isinstance(node.value, ast.Constant):
                return False
        elif isinstance(node, ast.Constant):
            if not _is_plain_constant(node.value):
                return False
        elif not isinstance(node, _OPERATORS):
            return False
    return True


def _is_safe_guard(text: str) -> bool:
    """``L['x'].size()[0] >= 2`` and the like: comparisons of input sizes, nothing else."""
    tree = _parse(text)
    if tree is None:
        return False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if node.keywords or len(node.args) > 1:
                return False
            if not (isinstance(node.func, ast.Attribute) and node.func.attr in _GUARD_METHODS):
                return False
        elif isinstance(node, ast.Attribute):
            if node.attr not in _GUARD_METHODS:
                return False
        elif isinstance(node, ast.Name):
            if node.id != "L":
                return False
        elif isinstance(node, ast.Constant):
            if not _is_plain_constant(node.value):
                return False
        elif not isinstance(node, (*_OPERATORS, ast.Subscript)):
            return False
    return True


def _is_plain_constant(value: Any) -> bool:
    if isinstance(value, str):
        return bool(_PLAIN_STRING.fullmatch(value))
    return value is None or isinstance(value, bool | int | float)
