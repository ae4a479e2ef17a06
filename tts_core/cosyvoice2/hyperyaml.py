"""Reads a CosyVoice ``cosyvoice2.yaml`` as plain data.

The official files are written for hyperpyyaml, whose tags name Python classes (``!new:``,
``!name:``) or even call functions while loading (``!apply:``). We never import or call what a
tag names: ``!new:`` / ``!name:`` / ``!apply:`` nodes become inert :class:`Tagged` records, and
``!ref`` is resolved here, including the simple arithmetic the official file uses
(``!ref <chunk_size> * <token_mel_ratio>``). Any other tag, or any other expression, is rejected.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

KINDS = ("new", "name", "apply")
_REF = re.compile(r"<([A-Za-z_][\w.]*)>")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.USub: operator.neg}


class HyperYamlError(ValueError):
    """The file uses a construct we refuse to interpret."""


@dataclass(frozen=True)
class Tagged:
    """A ``!kind:target`` node. ``target`` is a dotted name kept as text, never imported."""

    kind: str
    target: str
    args: Any  # dict of keyword arguments, list of positional ones, or None

    def get(self, key: str, default: Any = None) -> Any:
        return self.args.get(key, default) if isinstance(self.args, dict) else default


@dataclass(frozen=True)
class _Ref:
    expression: str


class _SafeLoader(yaml.SafeLoader):
    """SafeLoader that knows hyperpyyaml's tags and builds inert records from them."""


def _construct_tagged(loader: _SafeLoader, suffix: str, node: yaml.Node) -> Any:
    kind, _, target = suffix.partition(":")
    if kind not in KINDS or not target:
        raise HyperYamlError(f"unsupported tag !{suffix} at line {node.start_mark.line + 1}")
    if isinstance(node, yaml.MappingNode):
        args: Any = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.SequenceNode):
        args = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_scalar(node)
        args = None if value in ("", None) else value
    return Tagged(kind, target, args)


def _construct_ref(loader: _SafeLoader, node: yaml.Node) -> _Ref:
    return _Ref(str(loader.construct_scalar(node)))


# YAML 1.1 reads "1e-06" (no dot) as a string; the official files mean a float.
_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)
_SafeLoader.add_multi_constructor("!", _construct_tagged)
_SafeLoader.add_constructor("!ref", _construct_ref)


def _evaluate(expression: str, lookup: dict[str, Any]) -> Any:
    names: dict[str, Any] = {}

    def substitute(match: re.Match[str]) -> str:
        key = f"_r{len(names)}"
        names[key] = lookup(match.group(1))
        return key

    text = _REF.sub(substitute, expression).strip()
    if text in names:  # a plain reference: keep the value as it is (it may be a Tagged node)
        return names[text]
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as error:
        raise HyperYamlError(f"cannot read !ref {expression!r}") from error

    def calc(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return calc(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float):
            return node.value
        if isinstance(node, ast.Name) and node.id in names:
            value = names[node.id]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise HyperYamlError(f"!ref {expression!r}: arithmetic on a non-number")
            return value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](calc(node.left), calc(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](calc(node.operand))
        raise HyperYamlError(f"!ref {expression!r}: only numbers, references and + - * / allowed")

    try:
        return calc(tree)
    except ZeroDivisionError as error:
        raise HyperYamlError(f"!ref {expression!r}: division by zero") from error


# YAML aliases share one object, but resolving copies it: a few nested aliases ("billion laughs")
# would expand into billions of nodes. The official file resolves to well under a thousand.
MAX_NODES = 200_000


def _resolve(value: Any, root: dict[str, Any], stack: tuple[str, ...], budget: list[int]) -> Any:
    budget[0] -= 1
    if budget[0] < 0:
        raise HyperYamlError(f"the file expands to more than {MAX_NODES} nodes (nested aliases?)")

    def lookup(dotted: str) -> Any:
        if dotted in stack:
            raise HyperYamlError(f"circular !ref <{dotted}>")
        node: Any = root
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise HyperYamlError(f"!ref <{dotted}> names no key of the file")
            node = node[part]
        return _resolve(node, root, stack + (dotted,), budget)

    if isinstance(value, _Ref):
        return _evaluate(value.expression, lookup)
    if isinstance(value, Tagged):
        return Tagged(value.kind, value.target, _resolve(value.args, root, stack, budget))
    if isinstance(value, dict):
        return {key: _resolve(item, root, stack, budget) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, root, stack, budget) for item in value]
    return value


def loads(text: str) -> dict[str, Any]:
    """Parse hyperpyyaml text into plain dicts/lists/scalars and inert :class:`Tagged` nodes."""
    try:
        data = yaml.load(text, Loader=_SafeLoader)  # noqa: S506 - the loader is a SafeLoader
    except yaml.YAMLError as error:
        raise HyperYamlError(f"not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise HyperYamlError("the top level of a model yaml must be a mapping")
    return _resolve(data, data, (), [MAX_NODES])


def load(path: Path) -> dict[str, Any]:
    return loads(Path(path).read_text(encoding="utf-8"))
