from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ..common import ConfigError


class Section(BaseModel):
    """A params.yaml section: unknown keys are errors, values are checked strictly."""

    model_config = ConfigDict(extra="forbid", validate_default=True, frozen=False)


def first_problem(err: ValidationError) -> tuple[str, str]:
    """(dotted key, message) of a validation error's first problem, for a one-line ConfigError: "unknown key" for
    a key the schema does not know, the rejected value quoted, "(+N more)" when pydantic found others."""
    errors = err.errors()
    first = errors[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif "input" in first and first["type"] != "missing" and not isinstance(first["input"], dict):
        msg = f"{msg} (got {first['input']!r})"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return loc, msg + more


def read_yaml(path: Path) -> Any:
    """The parsed params file; ConfigError naming the file and the line for text that is not YAML."""
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path.name}:{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
