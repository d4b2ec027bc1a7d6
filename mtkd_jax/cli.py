"""The `mtkd` command: one launcher for every experiment, and a run folder's report.

    mtkd run [CONFIG] [--quick] [--config.KEY=VALUE ...]   # the seed pipeline (MNIST-1D)
    mtkd sequence [CONFIG] [--quick] [--config.KEY=VALUE ...]   # token-level distillation
    mtkd report RUN_DIR
    mtkd run --help                              # every config key, its default, its meaning

(also `python -m mtkd_jax ...`; the scripts in experiments/ call the same launcher). CONFIG
is a .py file whose `get_config()` returns the config (default: the experiment's built-in
one); ``--quick`` shrinks it to a seconds-long smoke run (the experiment's `quick`) before the
overrides apply. Every experiment kind is one `Experiment` entry of `EXPERIMENTS`.

A config mistake (a config file that does not load, a typo'd key in it or on the command
line, a value of the wrong type, a value out of range, a model that does not fit the
dataset) is a `ConfigError`: one line on stderr naming the key, exit code 2, before anything
trains. Choosing a model (``--config.teachers.model=convnet``) resets that model's
`model_kwargs` to the model's defaults unless the same command sets some. Ctrl-C stops the
run cleanly: the report of the seeds that finished is written, checkpoints are kept (the
same command resumes), exit code 130.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import difflib
import importlib
import importlib.util
import json
import logging as py_logging
import os
import re
import signal
import sys
import traceback

import ml_collections

from mtkd_jax.experiment.config import ConfigError

__all__ = ["EXPERIMENTS", "ConfigError", "Experiment", "apply_overrides", "config_keys",
           "load_config", "main"]

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One kind of experiment the launcher runs, as ``mtkd NAME [CONFIG] [--quick] ...``.

    The functions are named ``"module:attribute"`` and imported only when this kind runs.

    Attributes:
      name: the subcommand (``run``, ``sequence``).
      config: ``() -> ConfigDict``, the built-in default config (used without CONFIG).
      run: ``(config) -> Any``, runs a config; raises `ConfigError` for a config mistake
        (before training) and `mtkd_jax.experiment.runner.Interrupted` (or
        KeyboardInterrupt) on Ctrl-C.
      quick: ``(config) -> ConfigDict``, the seconds-long variant of a config (``--quick``).
      summary: one line for ``mtkd --help``.
      field_help: ``dict`` dotted key -> meaning, printed by ``mtkd NAME --help`` (keys
        without an entry print without one).
    """

    name: str
    config: str
    run: str
    quick: str
    summary: str
    field_help: str | None = None


EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in (
    Experiment(
        "run",
        config="mtkd_jax.experiment.config:default_config",
        run="mtkd_jax.experiment.runner:run",
        quick="mtkd_jax.experiment.config:quick",
        summary="the article's pipeline over seeds: teachers, analysis, every student row, "
                "codistillation (default: MNIST-1D)",
        field_help="mtkd_jax.experiment.config_help:FIELD_HELP",
    ),
    Experiment(
        "sequence",
        config="mtkd_jax.experiment.sequence:sequence_config",
        run="mtkd_jax.experiment.sequence:run_sequence",
        quick="mtkd_jax.experiment.sequence:quick_sequence",
        summary="token-level distillation of a causal student from K token teachers "
                "(procedural source)",
        field_help="mtkd_jax.experiment.config_help:SEQUENCE_HELP",
    ),
    Experiment(
        "lm",
        config="mtkd_jax.experiment.lm:lm_config",
        run="mtkd_jax.experiment.lm:run_lm",
        quick="mtkd_jax.experiment.lm:quick_lm",
        summary="language models on real text: one transformer teacher per domain -> one "
                "student (per-token weightings, top-k cache)",
        field_help="mtkd_jax.experiment.lm:LM_HELP",
    ),
)}
"""Every experiment kind of the launcher, by subcommand name."""


def _resolve(name: str):
    """The object ``"module:attribute"`` names."""
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


# ---------------------------------------------------------------------------------------------
# Config files


def _leaf_keys(config) -> list[str]:
    return [k for k in config_keys(config) if "model_kwargs." not in k]


def _near(key: str, keys: list[str]) -> str:
    """'; did you mean ...?' for the keys closest to `key` (whole or last part), or ''."""
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    if not near:
        by_leaf = {k.rsplit(".", 1)[-1]: k for k in keys}
        near = [by_leaf[n] for n in difflib.get_close_matches(key.rsplit(".", 1)[-1], by_leaf,
                                                              n=3, cutoff=0.6)]
    return f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""


def _file_error(path: str, e: BaseException, keys: list[str]) -> ConfigError:
    """One line for an exception raised while loading config file `path`: where in the file
    and what (an unknown key gets the closest valid ones)."""
    where = ""
    frames = [f for f in traceback.extract_tb(e.__traceback__)
              if os.path.abspath(f.filename) == os.path.abspath(path)]
    if isinstance(e, SyntaxError) and e.lineno:
        where = f", line {e.lineno}"
    elif frames:
        where = f", line {frames[-1].lineno} (`{(frames[-1].line or '').strip()}`)"
    message = _one_line(e)
    unknown = re.search(r'Key "([^"]+)" does not exist', str(e))
    if unknown:
        key = unknown.group(1)
        message = f"unknown config key {key!r}{_near(key, keys)} (mtkd run --help lists them)"
    elif isinstance(e, SyntaxError):
        message = f"syntax error: {e.msg}"
    else:
        message = f"{type(e).__name__}: {message}"
    return ConfigError(f"config file {path}{where}: {message}")


def load_config(path: str | None, default=None) -> ml_collections.ConfigDict:
    """`get_config()` of the config file `path`, or `default()` without one.

    Args:
      path: a .py file with a `get_config()` returning an `ml_collections.ConfigDict`.
      default: ``() -> ConfigDict``, the experiment's built-in config (default: the seed
        pipeline's `default_config`).

    Raises:
      ConfigError: one line: a missing file, a syntax error, an unknown key or a value of the
        wrong type set in it (with its line), no `get_config`, or not a ConfigDict.
    """
    if default is None:
        default = _resolve(EXPERIMENTS["run"].config)
    if not path:
        return default()
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        spec = importlib.util.spec_from_file_location("mtkd_user_config", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not callable(getattr(module, "get_config", None)):
            raise ConfigError(f"config file {path} has no get_config()")
        config = module.get_config()
    except ConfigError:
        raise
    except Exception as e:  # anything a config file raises is the file's mistake
        raise _file_error(path, e, _leaf_keys(default())) from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"get_config() of {path} must return an ml_collections.ConfigDict, "
                          f"got {type(config).__name__}")
    return config


def config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
    """Every settable key of `config` (dotted path -> value); `model_kwargs` entries too."""
    out = {}
    for name, value in config.items():
        path = f"{prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict):
            if name == "model_kwargs":
                out[path] = value.to_dict()
            out.update(config_keys(value, prefix=f"{path}."))
        else:
            out[path] = value
    return out


# ---------------------------------------------------------------------------------------------
# Command-line overrides


_TYPE_NAMES = {str: "names (strings)", int: "ints", float: "numbers"}


def _parse_tuple(path: str, text: str, current) -> tuple:
    """`text` as a tuple: ``a,b``, ``(1, 2)`` or ``()``; when the key's current value holds
    elements of one type (names, ints, numbers), every element must be of that type."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = tuple(v.strip() for v in text.split(",") if v.strip())
    value = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    kinds = {type(v) for v in current}
    if len(kinds) == 1 and (kind := kinds.pop()) in _TYPE_NAMES:
        if kind is str and all(isinstance(v, int | float) and not isinstance(v, bool)
                               for v in value):
            value = tuple(str(v) for v in value)  # e.g. --config.x=1: a name that is a number
        ok = all(isinstance(v, str) if kind is str else
                 isinstance(v, int | float) and not isinstance(v, bool) and
                 (kind is float or isinstance(v, int)) for v in value)
        if not ok:
            raise ConfigError(f"--config.{path}={text}: expects a tuple of "
                              f"{_TYPE_NAMES[kind]}, e.g. "
                              f"{','.join(map(str, current))} (now {current!r})")
        if kind is float:
            value = tuple(float(v) for v in value)
    return value


def _parse_value(path: str, text: str, current):
    """`text` as the type of the key's current value."""
    def bad(kind):
        return ConfigError(f"--config.{path}={text}: expects {kind} (now {current!r})")

    if isinstance(current, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise bad("True or False")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise bad("an int") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise bad("a number") from None
    if isinstance(current, (tuple, list)):
        return _parse_tuple(path, text, current)
    if current is None or isinstance(current, str):
        return text
    raise bad(type(current).__name__)


def _kwarg_value(text: str):
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text
    return tuple(value) if isinstance(value, list) else value


def apply_overrides(config: ml_collections.ConfigDict, overrides: list[str]):
    """Apply ``--config.KEY=VALUE`` strings; return the config.

    Model choices go first and reset that model's `model_kwargs` (to the model's defaults)
    when they change the model; `model_kwargs.NAME` may then be set freely (the model
    checks them against the dataset before training).

    Raises:
      ConfigError: an unknown key (with the closest valid ones) or a value of the wrong type.
    """
    keys = config_keys(config)
    parsed = []
    for item in overrides:
        body = item[len("--config."):]
        if "=" not in body:
            raise ConfigError(f"{item}: expected --config.KEY=VALUE")
        path, text = body.split("=", 1)
        parsed.append((path, text))
    parsed.sort(key=lambda pv: not pv[0].endswith(".model"))  # models first
    for path, text in parsed:
        section_path, _, name = path.rpartition(".")
        if section_path.endswith("model_kwargs") and section_path in keys:
            section = _section(config, section_path.rsplit(".", 1)[0])
            with section.model_kwargs.unlocked():
                section.model_kwargs[name] = _kwarg_value(text)
            continue
        if path not in keys or isinstance(keys[path], dict):
            raise ConfigError(f"unknown config key {path!r}{_near(path, _leaf_keys(config))} "
                              "(mtkd run --help lists them)")
        value = _parse_value(path, text, keys[path])
        section = _section(config, section_path)
        with section.unlocked():
            if name == "model" and "model_kwargs" in section and value != section.model:
                section.model_kwargs = ml_collections.ConfigDict()  # the new model's defaults
            section[name] = value
    return config


def _section(config, path: str):
    section = config
    for part in filter(None, path.split(".")):
        section = section[part]
    return section


# ---------------------------------------------------------------------------------------------
# The command


def _keys_help(experiment: Experiment) -> str:
    meaning = _resolve(experiment.field_help) if experiment.field_help else {}
    lines = ["config keys (--config.KEY=VALUE; defaults of the built-in config):"]
    for path, value in config_keys(_resolve(experiment.config)()).items():
        if "model_kwargs." in path:
            continue
        shown = value if not isinstance(value, tuple) else ",".join(map(str, value)) or "()"
        lines.append(f"  {path:<28} {str(shown):<22} {meaning.get(path, '')}")
    return "\n".join(lines)


def _parser(help_for: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; the config keys are listed in the epilog of `help_for` only
    (building them imports that experiment)."""
    parser = argparse.ArgumentParser(
        prog="mtkd", description="Multi-teacher knowledge distillation experiments.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="`mtkd COMMAND --help` lists the command's config keys.")
    sub = parser.add_subparsers(dest="command", required=True)
    for e in EXPERIMENTS.values():
        p = sub.add_parser(
            e.name, help=e.summary,
            epilog=_keys_help(e) if help_for == e.name else None,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            description=f"Run {e.summary}. Exit codes: 0 done, 2 config mistake, 130 "
                        "stopped by Ctrl-C (what finished is written; the same command "
                        "resumes where the experiment keeps checkpoints).")
        p.add_argument("config_file", nargs="?", default=None,
                       help="a .py file whose get_config() returns the config (default: the "
                            "built-in one)")
        p.add_argument("--config", dest="config_flag", default=None,
                       help="the config file, as the experiments/ scripts take it")
        p.add_argument("--quick", action="store_true",
                       help="a seconds-long smoke run of the config (every stage and output; "
                            "the numbers mean nothing); run folder <output_dir>_quick")
    report = sub.add_parser("report", help="print the results of a run folder")
    report.add_argument("run_dir")
    return parser


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _report(run_dir: str) -> int:
    path = os.path.join(run_dir, "results.csv")
    if not os.path.isfile(path):
        print(f"mtkd: error: {run_dir} holds no results.csv (no finished seed yet)",
              file=sys.stderr)
        return EXIT_CONFIG
    with open(path) as f:
        rows = list(csv.DictReader(f))
    print(f"{'row':<28}{'accuracy %':>16}{'macro F1 %':>16}{'n seeds':>9}")
    for r in rows:
        cells = [f"{100 * float(r[f'{m}_mean']):.1f} ± {100 * float(r[f'{m}_std'] or 0):.1f}"
                 for m in ("accuracy", "f1")]
        print(f"{r['row']:<28}{cells[0]:>16}{cells[1]:>16}{r['n_seeds']:>9}")
    analysis = os.path.join(run_dir, "analysis.json")
    if os.path.isfile(analysis):
        with open(analysis) as f:
            a = json.load(f)
        print(f"wall time {a.get('wall_seconds', float('nan')):.0f} s; full report: "
              f"{os.path.join(run_dir, 'results.md')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `mtkd` command; returns its exit code.

    The experiments/ scripts are ``sys.exit(main([KIND, DEFAULT_CONFIG_FILE, *argv]))``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    help_for = rest[0] if rest and {"-h", "--help"} & set(rest) else None
    try:
        args = _parser(help_for).parse_args(rest)
    except SystemExit as e:
        return int(e.code or 0)
    if args.command == "report":
        return _report(args.run_dir)
    experiment = EXPERIMENTS[args.command]
    try:
        config = load_config(args.config_flag or args.config_file,
                             _resolve(experiment.config))
        if args.quick:
            config = _resolve(experiment.quick)(config)
        apply_overrides(config, overrides)
    except ConfigError as e:
        print(f"mtkd: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_CONFIG
    return _run(experiment, config)


def _run(experiment: Experiment, config) -> int:
    from absl import logging

    from mtkd_jax.experiment.runner import Interrupted

    logging.set_verbosity(logging.ERROR)  # orbax logs every checkpoint, TFDS its folders
    run = _resolve(experiment.run)

    def on_sigint(signum, frame):
        # Checkpoint writes cut short by the stop log their own tracebacks: silence them,
        # the message below says what happened. A second Ctrl-C stops at once.
        logging.set_verbosity(logging.FATAL)
        py_logging.getLogger().setLevel(py_logging.CRITICAL + 1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        run(config)
    except ConfigError as e:
        print(f"mtkd: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_CONFIG
    except Interrupted as e:
        where = (f"report of the finished seed(s): {os.path.join(e.run_dir, 'results.md')}"
                 if e.result is not None else "no seed had finished, no report")
        print(f"mtkd: stopped by Ctrl-C; {where}; checkpoints kept in {e.run_dir} (the same "
              "command resumes)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("mtkd: stopped by Ctrl-C before anything was reported", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0
