"""Reading the configs: `load_config` reads `configs/common.yaml` (settings every stage shares, such as
the age groups), then the script's own file, then `--set dotted.key=value` overrides, and validates the
result against the script's pydantic model (agepipe/config: data_stages.py, model_stages.py) before any work
starts. A problem raises
ConfigError whose message names the key path and what was expected; `utils.run_script` turns it into one
line on stderr and exit status 2.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any, Container, Iterable, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

from agepipe.errors import ConfigError, shown

ModelT = TypeVar("ModelT", bound=BaseModel)

PROJECT_DIR = Path(__file__).resolve().parents[2]  # agepipe/config/loading.py
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
        text = error_text(first, where)
        if first["type"] == "extra_forbidden":
            text += closest_key_hint(model, first["loc"])
        raise ConfigError(text, tuple(str(part) for part in first["loc"] if not isinstance(part, int))) from None


def closest_key_hint(model: type[BaseModel], loc: tuple) -> str:
    """' (did you mean X?)' for the valid key of the section at `loc` closest to its last part, or ''."""
    section = model
    for part in loc[:-1]:
        field = section.model_fields.get(str(part))
        if field is None:  # a list index or a mapping's own key: the items are of the section found
            continue
        sections = _sections(field.annotation)
        if not sections:
            return ""
        section = sections[0]
    close = difflib.get_close_matches(str(loc[-1]), list(section.model_fields), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


# what a pydantic error type expects, in the words of a config file
EXPECTED = {
    "int_type": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "finite_number": "a finite number",
}


def error_text(error: dict, where: str = "") -> str:
    """One pydantic error as `key.path: expected ..., got <value>` (or the key's own rule).

    Examples
    --------
    >>> error = {"type": "greater_than_equal", "loc": ("edges", 1), "msg": "", "input": -2, "ctx": {"ge": 0}}
    >>> error_text(error, "age_groups")
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
        "greater_than_equal": f"a value >= {context.get('ge', 0):g}",
        "less_than_equal": f"a value <= {context.get('le', 0):g}",
        "literal_error": f"one of {context.get('expected')}",
        "too_short": f"at least {context.get('min_length')} items",
        "too_long": f"at most {context.get('max_length')} items",
    }.get(kind, error["msg"][:1].lower() + error["msg"][1:])
    return f"{key}: expected {expected}, got {shown(error['input'])}"


MAX_CONFIG_BYTES, MAX_YAML_ALIASES, MAX_YAML_DEPTH, MAX_YAML_VALUES = 1_000_000, 100, 32, 100_000


def _bounded_yaml(text: str, where: str) -> Any:
    """`text` parsed as YAML (safe_load's types), refusing before construction what no config needs:
    nesting deeper than MAX_YAML_DEPTH (Python's recursion and the validator's time), more than
    MAX_YAML_ALIASES aliases, or aliases that expand to more than MAX_YAML_VALUES values ("billion
    laughs": a few lines that expand into gigabytes)."""
    depth = aliases = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{where}: nests deeper than {MAX_YAML_DEPTH} levels; no config does")
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
        elif isinstance(event, yaml.AliasEvent):
            aliases += 1
            if aliases > MAX_YAML_ALIASES:
                raise ConfigError(f"{where}: uses more than {MAX_YAML_ALIASES} YAML aliases")
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and _expanded_size(node, {}) > MAX_YAML_VALUES:
            raise ConfigError(
                f"{where}: its YAML aliases expand to more than {MAX_YAML_VALUES:,} values; no config does"
            )
        return None if node is None else loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """How many values `node` stands for once every alias is expanded (an alias is the node it names,
    so `sizes`, by node identity, keeps this linear in the text)."""
    if id(node) not in sizes:
        if isinstance(node, yaml.SequenceNode):
            sizes[id(node)] = 1 + sum(_expanded_size(child, sizes) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            sizes[id(node)] = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
        else:
            sizes[id(node)] = 1
    return sizes[id(node)]


def _read_yaml(path: Path) -> dict:
    """A YAML mapping from `path`; a missing, unreadable, huge, deep or alias-bombed file is a ConfigError."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode) and not path.is_dir():
            raise ConfigError(f"{path}: is not a regular file")
        with open(path, encoding="utf-8") as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
        if len(text) > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: a config file of over {MAX_CONFIG_BYTES:,} characters is not a config file")
        data = _bounded_yaml(text, str(path))
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
        raise ConfigError(
            f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', None) or type(exc).__name__})"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def apply_override(config: dict, assignment: str, paths: Container[str] = ()) -> str:
    """Apply one `dotted.key=value` override in place and return the key. The value is parsed as YAML,
    but for a key among `paths` (a file or folder setting), whose value is taken as typed unless it
    is `null` or a [list]: `#`, `~` and line breaks are parts of file names, not YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {shown(assignment)}: expected dotted.key=value")
    try:
        verbatim = key in paths and raw != "null" and not raw.lstrip().startswith("[")
        value = raw if verbatim else _bounded_yaml(raw, f"--set {shown(key)}")
    except yaml.YAMLError:
        raise ConfigError(f"--set {shown(key)}: value {shown(raw)} is not valid YAML") from None
    node = config
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"--set {shown(key)}: {shown('.'.join(parts[: depth + 1]))} is not a config section")
        node = child
    node[parts[-1]] = value
    return key


# --------------------------------------------------------------------------------------------------
# Paths: one rule for every setting that names a file or folder
# --------------------------------------------------------------------------------------------------
class PathKind(str):
    """The marker of a config field that holds a path (schema.WorkspacePath, ProjectPath)."""


WORKSPACE, PROJECT = PathKind("workspace"), PathKind("project")


def path_fields(model: type[BaseModel], prefix: str = "") -> dict[str, PathKind]:
    """Dotted keys of the path fields of a config model (in nested sections too), with their kind."""
    found = {}
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        kind = _path_kind(field.annotation, field.metadata)
        if kind:
            found[key] = kind
        for section in _sections(field.annotation):
            found.update(path_fields(section, key + "."))
    return found


def _path_kind(annotation: Any, metadata: list) -> PathKind | None:
    for item in list(metadata) + list(getattr(annotation, "__metadata__", ())):
        if isinstance(item, PathKind):
            return item
    for argument in get_args(annotation):
        kind = _path_kind(argument, [])
        if kind:
            return kind
    return None


def _sections(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [section for argument in get_args(annotation) for section in _sections(argument)]


def typed_on_command_line(key: str, typed: set[str]) -> bool:
    """Whether the dotted `key` was set by a --set of it, or of a section holding it (`typed`)."""
    return any(key == k or key.startswith(k + ".") for k in typed)


def resolve_paths(config: dict, kinds: dict[str, PathKind], typed: set[str]) -> None:
    """Make every relative path of `config` absolute, in place, by one rule: a path typed on the command
    line (its key, or a section holding it, in `typed`) is relative to the current folder; a path from
    a config file is relative to the workspace (`workspace`, by default the project folder), except
    the project's own data files (ProjectPath), relative to the project folder. `~` is the home folder."""
    workspace = config.get("workspace")
    if isinstance(workspace, str):
        base = Path.cwd() if "workspace" in typed else PROJECT_DIR
        config["workspace"] = workspace = str(base / Path(workspace).expanduser())
    root = Path(workspace) if isinstance(workspace, str) else PROJECT_DIR
    for key, kind in kinds.items():
        *sections, name = key.split(".")
        node = config
        for section in sections:
            node = node.get(section) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node or key == "workspace":
            continue
        base = Path.cwd() if typed_on_command_line(key, typed) else PROJECT_DIR if kind == PROJECT else root
        value = node[name]
        if isinstance(value, str):
            node[name] = str(base / Path(value).expanduser())
        elif isinstance(value, list):
            node[name] = [str(base / Path(v).expanduser()) if isinstance(v, str) else v for v in value]


def read_settings(path: str | os.PathLike) -> dict:
    """The common settings and a script's YAML file, merged, as written (no --set, no validation)."""
    config = _read_yaml(COMMON_CONFIG)
    config.update(_read_yaml(Path(path)))
    return config


def load_config(model: type[ModelT], path: str | os.PathLike, overrides: Iterable[str] = ()) -> ModelT:
    """Read the common settings, the script's YAML file and the overrides, make the paths absolute
    (resolve_paths) and validate the result as a `model` (data_stages.py, model_stages.py); any problem is one
    ConfigError line starting with what set the key: the file's path, or `--set`."""
    config = read_settings(path)
    kinds = path_fields(model)
    typed = {apply_override(config, assignment, kinds) for assignment in overrides}
    resolve_paths(config, kinds, typed)
    try:
        return validate_section(model, config)
    except ConfigError as exc:
        # blame what set the key: the command line, or the file
        typed_here = typed_on_command_line(".".join(exc.keys), typed)
        raise ConfigError(f"--set {exc}" if typed_here else f"{path}: {exc}") from None


def plain(value: Any) -> Any:
    """A config model (or anything else json cannot write) as JSON-ready data: json.dumps's `default`."""
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else str(value)


def config_fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-serialisable settings, to tell whether a saved state still applies."""
    text = json.dumps(parts, sort_keys=True, default=plain)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
