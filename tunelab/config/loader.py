"""Read a config (a plain-Python file or a built-in name), apply --cfg-options, validate, and write copies."""
from __future__ import annotations

import ast
import logging
import textwrap
import types
from pathlib import Path
from typing import Any

from tunelab.config import catalogue, foreign
from tunelab.config.schema import (DATASET_FORMATS, FIELDS, GROUP_TITLES, PREFERENCE_FORMATS, REQUIRED, Config,
                                   build_config, check_value, default_value, suggest)
from tunelab.errors import ConfigError

log = logging.getLogger("tunelab")


def read_config_file(path: Path) -> dict[str, Any]:
    """Run a config file and return its public top-level settings (modules, functions, _private skipped).
    An XTuner config is read without running it; other tools' files are refused with one line."""
    try:
        source = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason}); save the config as UTF-8") from None
    foreign.refuse_other_tools(path, source)
    try:
        tree = ast.parse(source, str(path))
    except SyntaxError as exc:
        raise ConfigError(f"{path}: line {exc.lineno}: syntax error: {exc.msg}; fix the Python syntax") from None
    if foreign.is_xtuner_config(tree):
        xtuner = foreign.read_xtuner_config(tree)
        log.info("%s: read as an XTuner config, without running it; took %s; ignored %s", path,
                 ", ".join(xtuner.taken) or "nothing", ", ".join(xtuner.ignored) or "nothing")
        return xtuner.values
    code = compile(tree, str(path), "exec")
    namespace: dict[str, Any] = {"__file__": str(path), "__name__": "__tunelab_config__"}
    try:
        exec(code, namespace)  # a config is the user's own Python file, like XTuner/mmengine configs
    except Exception as exc:  # noqa: BLE001 - any error in the user's file is reported as bad input
        line = _traceback_line(exc, str(path))
        raise ConfigError(f"{path}{line}: {type(exc).__name__}: {exc}") from None
    return {k: v for k, v in namespace.items()
            if not k.startswith("_") and not isinstance(v, (types.ModuleType, types.FunctionType, type))}


def _traceback_line(exc: BaseException, filename: str) -> str:
    tb, line = exc.__traceback__, None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == filename:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f": line {line}" if line else ""


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """--cfg-options key=value ...: values are Python literals, else plain strings."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--cfg-options: '{item}' is not key=value (e.g. --cfg-options lr=1e-4)")
        try:
            out[key.strip()] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key.strip()] = raw
    return out


def resolve_config(spec: str) -> tuple[dict[str, Any], str, str]:
    """(settings, run name, where) for a config path or a built-in name."""
    path = Path(spec)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise ConfigError(f"{spec}: config file not found; give a path to a .py config or a built-in "
                              f"name from `tunelab list-cfg`")
        return read_config_file(path), path.stem, str(path)
    if spec in catalogue.BUILTIN:
        return dict(catalogue.BUILTIN[spec]), spec, f"built-in config '{spec}'"
    raise ConfigError(f"{spec}: no such config file or built-in config{suggest(spec, catalogue.BUILTIN)}; "
                      f"`tunelab list-cfg` lists the built-in names")


def load_config(spec: str, overrides: list[str] | None = None) -> tuple[Config, str]:
    """Load, override and validate a config. Returns (config, run name)."""
    values, name, where = resolve_config(spec)
    for key in values:  # report a misspelt key against the file before any override hides it
        if key not in FIELDS:
            raise ConfigError(f"{where}: unknown config key '{key}'{suggest(key, FIELDS)}")
    opts = parse_overrides(overrides)
    for key, value in opts.items():  # a bad override is the command line's fault, not the file's
        opts[key] = check_value(key, value, "--cfg-options")
    values.update(opts)
    cfg = build_config(values, f"{where} with --cfg-options {', '.join(opts)}" if opts else where)
    _check_names(cfg, where)
    return cfg, name


def _check_names(cfg: Config, where: str) -> None:
    from tunelab.config.templates import UnknownTemplateError, get_template

    if cfg.prompt_template != "auto":
        try:
            get_template(cfg.prompt_template)
        except UnknownTemplateError as exc:
            raise ConfigError(f"{where}: 'prompt_template': {exc}") from None
    formats = DATASET_FORMATS if cfg.objective == "sft" else PREFERENCE_FORMATS
    if cfg.dataset_format != "auto" and cfg.dataset_format not in formats:
        raise ConfigError(f"{where}: 'dataset_format': unknown format '{cfg.dataset_format}'"
                          f"{suggest(cfg.dataset_format, formats)}; valid: auto, {', '.join(formats)}")


def render_config(values: dict[str, Any], name: str) -> str:
    """A complete, commented, standalone config file holding `values` (defaults for the rest)."""
    merged = {key: values.get(key, default_value(key)) for key in FIELDS}
    lines = [f'"""tunelab config: {name}.',
             "",
             "Every setting of tunelab is below with its meaning; edit what you need and run",
             f"    tunelab train {name}_copy.py",
             "Real work: point pretrained_model_name_or_path at a real model (a local Hugging Face folder",
             "or a hub id) and data_path at your data.",
             '"""', ""]
    group = None
    for key, f in FIELDS.items():
        if f.metadata["group"] != group:
            group = f.metadata["group"]
            lines += ["", f"# {'=' * 20} {GROUP_TITLES[group]} {'=' * (60 - len(GROUP_TITLES[group]))}"]
        for text in textwrap.wrap(f.metadata["help"], 96):
            lines.append(f"# {text}")
        value = merged[key]
        if value is REQUIRED:
            lines.append(f"{key} = None  # REQUIRED: set this")
        else:
            lines.append(f"{key} = {value!r}")
    return "\n".join(lines) + "\n"
