"""Loading a recipe: YAML file + `key=value` overrides → OmegaConf merge → interpolation → Recipe.

Overrides use dotted paths (`stages.sft.training.lr=1e-5`, `stages.data.sources[0].weight=2`); a
leading `~` deletes a key (`~stages.ppo`), and `key+=value` appends to a list
(`stages.data.sources+={name: more, plugin: jsonl, records: text, params: {path: more.jsonl}}`). Values
parse as YAML.

A recipe file must be UTF-8 YAML holding a mapping. Nothing a user writes reaches a Python traceback:
YAML that does not parse (in the file or in an override), nesting deeper than `MAX_DEPTH` levels, a
value that refers to itself, and interpolations that would build values of more than `MAX_RESOLVED`
characters are problems with the dotted path, like every other mistake.

Interpolation is confined to the recipe itself: `${model.seq_length}` and friends work, but no
resolver that reaches outside the document (OmegaConf's `oc.env`, `oc.decode`, anything registered by
another library) is allowed. The one way out is `${env:NAME}` / `${env:NAME,default}`, and only for
names the recipe lists under `allow_env` — a recipe says explicitly which environment it depends on.
"""

from __future__ import annotations

import io
import os
import re
import reprlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import BaseModel, ValidationError

from .errors import Problem, RecipeError, did_you_mean
from .schema import Recipe

MAX_DEPTH = 32  # levels of nesting; the shipped recipes use 6, a plugin's params a few more
MAX_RESOLVED = 1_000_000  # characters an interpolated value may grow to
_REFERENCE = re.compile(r"\$\{([^${}:]+)\}")
_RESOLVER_CALL = re.compile(r"\$\{\s*([A-Za-z_][\w.]*)\s*:")
_ENV_ARG = re.compile(r"\$\{\s*env\s*:\s*([^,}\s]*)")
_allowed_env: ContextVar[frozenset[str]] = ContextVar("engine_allowed_env", default=frozenset())
_UNSET = object()


def _env_resolver(name: str, default: Any = _UNSET) -> Any:
    if name not in _allowed_env.get():
        raise KeyError(f"environment variable {name!r} is not listed under allow_env")
    value = os.environ.get(name)
    if value is None:
        if default is _UNSET:
            raise KeyError(f"environment variable {name!r} is not set and has no default")
        return default
    return value


# `${env:...}` is the recipe's own syntax; it replaces any resolver of that name in this process.
OmegaConf.register_resolver("env", _env_resolver, replace=True, annotation_validation="off")


@contextmanager
def _env_allowed(names: frozenset[str]) -> Iterator[None]:
    token = _allowed_env.set(names)
    try:
        yield
    finally:
        _allowed_env.reset(token)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> Recipe:
    """Read, merge, interpolate and validate a recipe; every problem is raised as one RecipeError."""
    source = str(path)
    cfg = _read_yaml(Path(path), source)
    problems = _apply_overrides(cfg, overrides)
    if problems:
        raise RecipeError(problems, source=source)
    data = _interpolate(cfg, source)
    return parse_recipe(data, source=source)


def parse_recipe(data: Any, *, source: str = "") -> Recipe:
    """Validate plain data (already interpolated) into a Recipe, converting pydantic's errors."""
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise RecipeError(problems_from_validation(exc, Recipe, data), source=source) from None


def _read_text(path: Path, source: str) -> str:
    """The recipe file's text; a missing, unreadable or non-UTF-8 file is one problem naming it."""
    try:
        if path.is_dir():
            raise RecipeError([Problem("", f"recipe file {source!r} is a directory", "give a recipe YAML file")])
        data = path.read_bytes()
    except FileNotFoundError:
        raise RecipeError([Problem("", f"recipe file {source!r} not found", "check the path")]) from None
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise RecipeError([Problem("", f"cannot read recipe file {source!r}: {why}", "check the path")]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([Problem("", f"recipe file {source!r} is not UTF-8 text (byte {data[exc.start]:#04x} at "
                                       f"offset {exc.start})", "save it as UTF-8")]) from None  # fmt: skip


def _yaml_problem(where: str, exc: BaseException) -> Problem:
    if isinstance(exc, RecursionError):
        return Problem(where, "is nested too deeply to read", f"nest at most {MAX_DEPTH} levels")
    text = " ".join(str(exc).split()) or type(exc).__name__
    return Problem(where, f"cannot parse YAML: {text[:300]}", "fix the syntax")


def _read_yaml(path: Path, source: str) -> DictConfig:
    text = _read_text(path, source)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None and not isinstance(node, yaml.MappingNode):
            what = "list" if isinstance(node, yaml.SequenceNode) else "single value"
            raise RecipeError([Problem("", f"holds a YAML {what}; a recipe is a mapping of keys to values",
                                       "start from recipes/tiny.yaml")], source=source)  # fmt: skip
        if (deep := _too_deep(node)) is not None:
            raise RecipeError([Problem("", f"nests more than {MAX_DEPTH} levels deep (line {deep})",
                                       f"nest at most {MAX_DEPTH} levels")], source=source)  # fmt: skip
        cfg = OmegaConf.load(io.StringIO(text))
    except (yaml.YAMLError, OmegaConfBaseException, RecursionError, ValueError, TypeError) as exc:
        raise RecipeError([_yaml_problem("", exc)], source=source) from None
    if not isinstance(cfg, DictConfig):
        raise RecipeError([Problem("", "a recipe must be a mapping of keys to values", "")], source=source)
    return cfg


def _too_deep(node: yaml.Node | None) -> int | None:
    """The line of a YAML node nested deeper than MAX_DEPTH, walked without recursion."""
    stack = [(node, 0)] if node is not None else []
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            return int(item.start_mark.line) + 1
        if isinstance(item, yaml.MappingNode):
            stack += [(v, depth + 1) for _, v in item.value]
        elif isinstance(item, yaml.SequenceNode):
            stack += [(v, depth + 1) for v in item.value]
    return None


def _depth_of(value: Any) -> int:
    """How deeply plain data nests, walked without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        if isinstance(item, dict):
            stack += [(v, depth + 1) for v in item.values()]
        elif isinstance(item, list):
            stack += [(v, depth + 1) for v in item]
    return deepest


def _parse_value(raw: str) -> Any:
    """An override's value, parsed as YAML (errors propagate to the caller's problem)."""
    if (deep := _too_deep(yaml.compose(raw, Loader=yaml.SafeLoader) if raw.strip() else None)) is not None:
        raise ValueError(f"the value nests more than {MAX_DEPTH} levels deep (line {deep})")
    parsed: Any = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={raw}"]), resolve=False)
    return parsed["v"]


def _apply_overrides(cfg: DictConfig, overrides: Sequence[str]) -> list[Problem]:
    problems: list[Problem] = []
    for item in overrides:
        head, plus, _ = item.partition("+=")
        if plus and "=" not in head:
            problems += _append(cfg, item)
            continue
        delete = item.startswith("~")
        key, eq, raw = item.removeprefix("~").partition("=")
        key = key.strip()
        if not key or (not eq and not delete) or (eq and delete):
            problems.append(
                Problem(item, "an override is `key=value` (or `~key` to delete)", "e.g. stages.sft.training.lr=1e-5")
            )
            continue
        try:
            if delete:
                _delete(cfg, key)
            else:
                # `key=value` sets: a mapping given for a mapping replaces it (`stages={}` empties the stages).
                OmegaConf.update(cfg, key, _parse_value(raw), merge=False, force_add=True)
        except (yaml.YAMLError, RecursionError) as exc:
            problems.append(_yaml_problem(key, exc))
        except (OmegaConfBaseException, KeyError, IndexError, ValueError, TypeError) as exc:
            problems.append(Problem(key, f"cannot apply override {_short(item)}: {_short(exc)}", "check the dotted path"))
    return problems


def _append(cfg: DictConfig, item: str) -> list[Problem]:
    """`key+=value` appends value (or each item of a list value) to the list at key."""
    key, _, raw = item.partition("+=")
    key = key.strip()
    try:
        current = OmegaConf.select(cfg, key, default=None)
        if current is None or not OmegaConf.is_list(current):
            return [Problem(key, f"cannot apply override {item!r}: {key} is not a list", "use key=value to set it")]
        value = _parse_value(raw)
        added = value if isinstance(value, list) else [value]
        existing = OmegaConf.to_container(current, resolve=False)
        assert isinstance(existing, list)
        OmegaConf.update(cfg, key, [*existing, *added], merge=False, force_add=True)
    except (yaml.YAMLError, RecursionError) as exc:
        return [_yaml_problem(key, exc)]
    except (OmegaConfBaseException, KeyError, IndexError, ValueError, TypeError) as exc:
        return [Problem(key, f"cannot apply override {_short(item)}: {_short(exc)}", "check the dotted path")]
    return []


def _delete(cfg: DictConfig, key: str) -> None:
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig) or leaf not in parent:
        raise KeyError(f"{key} does not exist")
    del parent[leaf]


def _interpolate(cfg: DictConfig, source: str) -> Any:
    try:
        raw = OmegaConf.to_container(cfg, resolve=False)
    except RecursionError:
        raise RecipeError([Problem("", "is nested too deeply to read", f"nest at most {MAX_DEPTH} levels")],
                          source=source) from None  # fmt: skip
    if _depth_of(raw) > MAX_DEPTH:
        raise RecipeError([Problem("", f"nests more than {MAX_DEPTH} levels deep", f"nest at most {MAX_DEPTH} levels")],
                          source=source)  # fmt: skip
    allow = raw.get("allow_env", []) if isinstance(raw, dict) else []
    allowed = frozenset(x for x in allow if isinstance(x, str)) if isinstance(allow, list) else frozenset()
    problems = list(_check_interpolations(raw, "", allowed)) or _interpolation_sizes(raw)
    if problems:
        raise RecipeError(problems, source=source)
    try:
        with _env_allowed(allowed):
            return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except RecursionError:
        raise RecipeError([Problem("", "an interpolation refers to itself", "remove the self-reference")],
                          source=source) from None  # fmt: skip
    except OmegaConfBaseException as exc:
        where = getattr(exc, "full_key", "") or ""
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        fix = "set a value" if "Missing mandatory value" in msg else "interpolations may only name recipe keys"
        raise RecipeError([Problem(str(where), msg, fix)], source=source) from None


def _interpolation_sizes(raw: Any) -> list[Problem]:
    """Bound what `${...}` may build before OmegaConf builds it: each value's resolved length, at most, from
    the lengths of the values it names (nine lines of ${a}${a} double a string nine times); a value that
    names itself, directly or through others, is a problem too."""
    values: dict[str, Any] = {}
    stack: list[tuple[str, Any]] = [("", raw)]
    while stack:
        path, node = stack.pop()
        values[path] = node
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        stack += [(f"{path}.{k}" if path else str(k), v) for k, v in items]
    sizes: dict[str, int] = {}
    problems: list[Problem] = []

    def size(path: str, active: tuple[str, ...]) -> int:
        if path in sizes:
            return sizes[path]
        if path in active:
            raise _SelfReference(path)
        node = values[path]
        if isinstance(node, dict | list):
            keys = node.keys() if isinstance(node, dict) else range(len(node))
            total = sum(size(f"{path}.{k}" if path else str(k), (*active, path)) + 4 for k in keys)
        elif isinstance(node, str) and "${" in node:
            refs = [re.sub(r"\[(\d+)\]", r".\1", r.strip()) for r in _REFERENCE.findall(node)]
            total = len(node) + sum(size(r, (*active, path)) for r in refs if r in values)
        else:
            total = len(str(node))
        sizes[path] = min(total, 10 * MAX_RESOLVED)
        return sizes[path]

    for path, node in values.items():
        if not (isinstance(node, str) and "${" in node):
            continue
        try:
            if size(path, ()) > MAX_RESOLVED:
                problems.append(Problem(path, f"interpolates to more than {MAX_RESOLVED:,} characters",
                                        "interpolate smaller values"))  # fmt: skip
        except _SelfReference as exc:
            problems.append(Problem(path, f"refers to itself (through {exc.args[0] or 'the whole recipe'})",
                                    "remove the self-reference"))  # fmt: skip
        except RecursionError:
            problems.append(Problem(path, "interpolates through too many levels", "interpolate values directly"))
    return problems


class _SelfReference(Exception):
    """An interpolation that leads back to itself."""


def _check_interpolations(node: Any, path: str, allowed: frozenset[str]) -> Iterator[Problem]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _check_interpolations(v, f"{path}.{k}" if path else str(k), allowed)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _check_interpolations(v, f"{path}[{i}]", allowed)
    elif isinstance(node, str) and "${" in node:
        for name in _RESOLVER_CALL.findall(node):
            if name != "env":
                yield Problem(
                    path,
                    f"interpolation resolver {name!r} is not allowed in recipes (in {node!r})",
                    "refer to recipe keys like ${model.seq_length}, or read the environment with "
                    "${env:NAME} after listing NAME under allow_env",
                )
        for name in _ENV_ARG.findall(node):
            if name not in allowed:
                yield Problem(
                    path,
                    f"environment variable {name!r} is read but not listed under allow_env",
                    f"add `allow_env: [{name}]` to the recipe if it should depend on it",
                )


# ---- pydantic errors → dotted paths with fixes -------------------------------------------------
def problems_from_validation(exc: ValidationError, root: type[BaseModel], data: Any) -> list[Problem]:
    """Turn pydantic's errors into Problems whose paths read like the recipe (`stages.sft.training.lr`)."""
    out: list[Problem] = []
    for err in exc.errors(include_url=False):
        path, parent, at = _walk(root, tuple(err["loc"]))
        kind = err["type"]
        value = err.get("input")
        if kind == "extra_forbidden":
            leaf = str(err["loc"][-1])
            choices = list(parent.model_fields) if parent is not None else []
            out.append(Problem(path, f"unknown key {leaf!r}", did_you_mean(leaf, choices)))
        elif kind == "missing":
            out.append(Problem(path, "is required", "add it" + _described(parent, err["loc"])))
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            tags = [str(_tag_of(m)) for m in _union_members(_unwrap(at))]
            out.append(Problem(path, err["msg"], f"set `kind` to one of {', '.join(tags)}"))
        else:
            out.append(Problem(path, f"{err['msg']} (got {_short(value)})", "fix the value"))
    return out


def _described(parent: type[BaseModel] | None, loc: tuple[Any, ...]) -> str:
    if parent is None:
        return ""
    field = parent.model_fields.get(str(loc[-1]))
    return f": {field.description}" if field is not None and field.description else ""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict = 3, 60, 60, 6, 6


def _short(value: Any) -> str:
    """A value as the message shows it: at most 80 characters, however large or deep it is."""
    text = _REPR.repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _walk(root: type[BaseModel], loc: tuple[Any, ...]) -> tuple[str, type[BaseModel] | None, Any]:
    """Dotted path of a pydantic loc, dropping discriminator tags, the model holding the last key, and the type
    the loc ends at."""
    path = ""
    tp: Any = root
    parent: type[BaseModel] | None = None
    for item in loc:
        tp = _unwrap(tp)
        if item == "[key]":
            break
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            parent = tp
            field = tp.model_fields.get(str(item))
            tp = field.annotation if field is not None else None
            path = f"{path}.{item}" if path else str(item)
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
            path = f"{path}.{item}" if path else str(item)
        elif get_origin(tp) is list:
            tp = get_args(tp)[0]
            path = f"{path}[{item}]"
        elif _union_members(tp):
            member = next((m for m in _union_members(tp) if _tag_of(m) == item), None)
            if member is None:
                path = f"{path}.{item}" if path else str(item)
            tp = member
        else:
            path = f"{path}.{item}" if path else str(item)
            tp = None
    return path, parent, tp


def _unwrap(tp: Any) -> Any:
    """Strip Annotated[...] and Optional[...] down to the interesting type."""
    while True:
        args = get_args(tp)
        if getattr(tp, "__metadata__", None) is not None:  # Annotated
            tp = args[0]
        elif args and type(None) in args and len(args) == 2:
            tp = next(a for a in args if a is not type(None))
        else:
            return tp


def _union_members(tp: Any) -> list[type[BaseModel]]:
    args = get_args(tp)
    if get_origin(tp) is dict or get_origin(tp) is list:
        return []
    return [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]


def _tag_of(model: type[BaseModel]) -> Any:
    field = model.model_fields.get("kind")
    if field is None:
        return None
    args = get_args(field.annotation)
    return args[0] if args else None
