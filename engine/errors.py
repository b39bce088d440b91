"""User-facing errors.

A user error (bad recipe, missing file, unknown plugin, impossible parallelism) is reported once, with
every problem found, each naming the dotted path in the recipe, the offending value and the fix. The CLI
prints it and exits with code 2, without a traceback. Anything else that escapes is a bug in the engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

EXIT_USER_ERROR = 2


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe: where, what, and how to fix it."""

    path: str
    message: str
    fix: str = ""

    def render(self) -> str:
        sep = "" if self.message.startswith("=") else ": "
        text = f"{self.path}{sep}{self.message}" if self.path else self.message
        return f"{text}; {self.fix}" if self.fix else text


class EngineError(Exception):
    """Base class of the errors the CLI turns into a message and exit code 2."""

    def render(self) -> str:
        return str(self)


class RecipeError(EngineError):
    """Every problem found in a recipe, collected into one error."""

    def __init__(self, problems: Iterable[Problem], *, source: str = "") -> None:
        self.problems: tuple[Problem, ...] = tuple(problems)
        self.source = source
        super().__init__(self.render())

    def render(self) -> str:
        where = f" in {self.source}" if self.source else ""
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''}{where}:"
        return "\n".join([head, *(f"  - {p.render()}" for p in self.problems)])

    def paths(self) -> list[str]:
        return [p.path for p in self.problems]


class PluginError(EngineError):
    """A plugin failed to load, collides with another, or is malformed."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """A short hint naming the closest valid choices, or listing them all when none is close."""
    import difflib

    options = sorted(set(choices))
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    return "valid: " + ", ".join(options) if options else "nothing is valid here"


class ForgedTurn(ValueError):
    """A chat message's text contains a special token of the template (parsed, it would forge a turn)."""
