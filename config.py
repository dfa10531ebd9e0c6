"""Reading the configs: `load_config` reads `configs/common.yaml` (settings every stage shares, such as
the age groups), then the script's own file, then `--set dotted.key=value` overrides, and validates the
result against the script's pydantic model (config_models.py) before any work starts. A problem raises
ConfigError whose message names the key path and what was expected; `cli.run_script` turns it into one
line on stderr and exit status 2.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from errors import ConfigError

ModelT = TypeVar("ModelT", bound=BaseModel)

PROJECT_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PROJECT_DIR / "configs"
COMMON_CONFIG = CONFIG_DIR / "common.yaml"


def validate_section(model: type[ModelT], data: Any, where: str = "") -> ModelT:
    """`data` as a `model`, or a one-line ConfigError naming the first problem's key path (under
    `where`), what was expected and what was found."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        # a misspelt key is also a missing one: naming the misspelling says more
        first = min(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
        raise ConfigError(describe_problem(first, where)) from None


# what a pydantic error type expects, in the words of a config file
EXPECTED = {"int_type": "an integer", "int_from_float": "an integer", "float_type": "a number", "bool_type": "true or false",
            "string_type": "a string", "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping",
            "model_attributes_type": "a mapping", "finite_number": "a finite number"}


def describe_problem(error: dict, where: str = "") -> str:
    """One pydantic error as `key.path: expected ..., got <value>` (or the key's own rule).

    Examples
    --------
    >>> describe_problem({"type": "greater_than_equal", "loc": ("edges", 1), "msg": "", "input": -2, "ctx": {"ge": 0}}, "age_groups")
    'age_groups.edges[1]: expected a value >= 0, got -2'
    """
    keys = [where] if where else []
    for part in error["loc"]:
        if isinstance(part, int) and keys:
            keys[-1] += f"[{part}]"
        else:
            keys.append(str(part))
    key = ".".join(keys) or "the config"
    kind, context = error["type"], error.get("ctx") or {}
    if kind == "missing":
        return f"{key}: missing key"
    if kind == "extra_forbidden":
        return f"{key}: unknown key"
    if kind == "value_error":
        return f"{key}: {context.get('error', error['msg'])}"
    expected = EXPECTED.get(kind) or {
        "greater_than_equal": f"a value >= {context.get('ge', 0):g}", "less_than_equal": f"a value <= {context.get('le', 0):g}",
        "literal_error": f"one of {context.get('expected')}", "too_short": f"at least {context.get('min_length')} items",
        "too_long": f"at most {context.get('max_length')} items",
    }.get(kind, error["msg"][:1].lower() + error["msg"][1:])
    return f"{key}: expected {expected}, got {error['input']!r}"


MAX_CONFIG_BYTES, MAX_YAML_ALIASES = 1_000_000, 100


def _read_yaml(path: Path) -> dict:
    """A YAML mapping from `path`; a missing, unreadable, huge or alias-bombed file is a ConfigError."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: a config file of over {MAX_CONFIG_BYTES:,} characters is not a config file")
        # aliases can expand a few lines into billions of nodes ("billion laughs"); configs need few
        if sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text)) > MAX_YAML_ALIASES:
            raise ConfigError(f"{path}: uses more than {MAX_YAML_ALIASES} YAML aliases")
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: is not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_override(config: dict, assignment: str) -> None:
    """Apply one `dotted.key=value` override in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {assignment!r}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML") from None
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {'.'.join(parts[:depth + 1])} is not a config section")
        node = child
    node[parts[-1]] = value


def load_config(model: type[ModelT], path: str | os.PathLike, overrides: Iterable[str] = ()) -> ModelT:
    """Read the common settings, the script's YAML file and the overrides, as a `model` (see
    config_models.py); any problem is one ConfigError line starting with the file's path."""
    config = _read_yaml(COMMON_CONFIG)
    config.update(_read_yaml(Path(path)))
    for assignment in overrides:
        apply_override(config, assignment)
    try:
        return validate_section(model, config)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def plain(value: Any) -> Any:
    """A config model (or anything else json cannot write) as JSON-ready data: json.dumps's `default`."""
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else str(value)


def config_fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable settings, to tell whether a saved state still applies."""
    text = json.dumps(parts, sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
