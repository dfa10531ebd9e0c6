"""What every script and notebook starts with: its config read and validated (`load_config`, or
`notebook_config` in a notebook), logging, the command line (`--config`, `--set`, and `--help` listing
every setting), and `run_script`, which turns a user's mistake into one line on stderr (exit status 2)
instead of a traceback.

    from utils import load_config, run_script, setup_logging
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, get_args, get_origin

import yaml
from pydantic import BaseModel

from agepipe.config.loading import CONFIG_DIR, ModelT, load_config, read_settings
from agepipe.errors import ConfigError, UserError

WORKSPACE_VARIABLE = "AGEPIPE_WORKSPACE"  # the workspace of a notebook opened in Jupyter

__all__ = ["load_config", "notebook_config", "one_line", "parse_args", "run_script", "settings_help", "setup_logging"]


def parse_args(
    description: str,
    default_config: str,
    model: type[BaseModel] | None = None,
    examples: Iterable[str] = (),
    argv: list[str] | None = None,
) -> argparse.Namespace:
    """--config and --set; --help also lists every setting of `model` with its value in the config files
    and its meaning, and `examples` (commands that run as written)."""
    argv = sys.argv[1:] if argv is None else argv
    return argument_parser(description, default_config, model, examples, argv).parse_args(argv)


def argument_parser(
    description: str, default_config: str, model: type[BaseModel] | None, examples: Iterable[str], argv: list[str]
) -> argparse.ArgumentParser:
    """The parser of parse_args, for a script that adds arguments of its own."""
    epilog = (
        settings_help(model, CONFIG_DIR / default_config, examples)
        if model and ({"-h", "--help"} & set(argv))
        else None
    )
    parser = argparse.ArgumentParser(
        description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config", default=str(CONFIG_DIR / default_config), help="YAML config file (default: %(default)s)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change one setting (repeatable): dotted keys reach nested ones, values are YAML: "
        "--set num_workers=1 --set checks.blurry.below=10 --set inputs=[photos,more/photos]",
    )
    return parser


def settings_help(model: type[BaseModel], config_path, examples: Iterable[str]) -> str:
    """Every setting of `model` (dotted key: its value in the config files; its meaning), then examples."""
    try:
        values = read_settings(config_path)
    except ConfigError as exc:
        return f"settings: cannot be listed ({exc})"
    lines = [
        f"settings ({config_path} and {CONFIG_DIR / 'common.yaml'}; relative paths in them are relative to the "
        "workspace, paths typed with --set to the current folder):"
    ]
    lines += _setting_lines(model, values, "")
    if examples:
        lines += ["", "examples:"] + [f"  {example}" for example in examples]
    return "\n".join(lines)


def _setting_lines(model: type[BaseModel], values: Any, prefix: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        key, value = prefix + name, values.get(name) if isinstance(values, dict) else None
        sections = [
            a
            for a in (field.annotation, *get_args(field.annotation))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        if get_origin(field.annotation) is dict and isinstance(
            value, dict
        ):  # named entries (checks, repairs): one line each
            lines.append(f"  {key}: {field.description or ''}")
            lines += [f"  {key}.{entry} = {_flow(entry_value)}" for entry, entry_value in value.items()]
            continue
        if sections and isinstance(value, dict):
            lines.append(f"  {key}: {field.description or ''}")
            lines += _setting_lines(sections[0], value, key + ".")
            continue
        lines.append(f"  {key} = {_flow(value)}")
        if field.description:
            lines.append(f"      {field.description}")
    return lines


FILE_SYSTEM_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _flow(value: Any) -> str:
    """A value as YAML on one line, as --set takes it."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def run_script(
    main: Callable[[argparse.Namespace], None],
    description: str,
    default_config: str,
    model: type[BaseModel] | None = None,
    examples: Iterable[str] = (),
):
    """Entry point shared by the scripts: parse arguments, run, turn user errors into one line."""
    args = parse_args(description, default_config, model, examples)
    try:
        main(args)
    except (ConfigError, UserError) as exc:
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted: re-run the same command to continue where it stopped", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:
        if exc.errno not in FILE_SYSTEM_ERRORS:
            raise
        # a full disk or a read-only folder: what was written stays whole (atomic writes), re-run after fixing
        print(
            one_line(f"error: {exc.strerror}: {exc.filename or 'while writing'}; re-run the same command once fixed"),
            file=sys.stderr,
        )
        sys.exit(2)


MAX_ERROR_CHARACTERS = 1000


def one_line(message: str) -> str:
    """An error message as one line of at most MAX_ERROR_CHARACTERS (a path or value in it may be long).

    Examples
    --------
    >>> one_line("first\\nsecond")
    'first second'
    """
    flat = " ".join(message.split())
    return flat if len(flat) <= MAX_ERROR_CHARACTERS else flat[:MAX_ERROR_CHARACTERS] + "…"


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level), format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    # TensorFlow and matplotlib are chatty at INFO; the stages' own messages are what users need.
    for noisy in ("matplotlib", "PIL", "h5py", "distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("tensorflow").setLevel(logging.ERROR)  # its retracing advice is for its developers, not the user


def require_workspace(workspace: str | None) -> None:
    """One line, before any work, when the workspace a stage reads from does not exist: only making the
    sample and exploring start a workspace (a typo would otherwise cost a run and leave a stray folder)."""
    if workspace and not Path(workspace).expanduser().is_dir():
        raise UserError(
            f"workspace {workspace} does not exist: start it with `python explore_images.py --set "
            f"workspace={workspace} --set dataset_dir=...` (or make pipeline WORKSPACE={workspace})"
        )


def notebook_config(model: type[ModelT], path: str | os.PathLike, overrides: Iterable[str] = ()) -> ModelT:
    """A notebook's config, from its `parameters` cell (which run_notebook.py sets through papermill).
    Opened in Jupyter, where nothing sets them, it works in the workspace the environment variable
    AGEPIPE_WORKSPACE names (`make lab WORKSPACE=W` sets it), as the scripts run with --set workspace=W."""
    overrides = list(overrides)
    workspace = os.environ.get(WORKSPACE_VARIABLE)
    if workspace and not any(o.startswith("workspace=") for o in overrides):
        overrides.insert(0, f"workspace={workspace}")
    config = load_config(model, path, overrides)
    setup_logging(config.log_level)
    require_workspace(config.workspace)
    return config
