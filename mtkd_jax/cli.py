"""The `mtkd` command: run the experiment from a config file, print a run folder's report.

    mtkd run [CONFIG] [--config.KEY=VALUE ...]   # CONFIG: a .py file with get_config()
    mtkd report RUN_DIR
    mtkd run --help                              # every config key, its default, its meaning

(also `python -m mtkd_jax ...`). A config mistake (an unknown key, a value of the wrong type,
a value out of range, a model that does not fit the dataset) is one line on stderr naming
the key, exit code 2, before anything trains. Choosing a model
(``--config.teachers.model=convnet``) resets that model's `model_kwargs` to the model's
defaults unless the same command sets some. Ctrl-C stops the run cleanly: the report of the
seeds that finished is written, checkpoints are kept (the same command resumes), exit code
130.
"""

from __future__ import annotations

import argparse
import ast
import csv
import difflib
import importlib.util
import json
import logging as py_logging
import os
import signal
import sys

import ml_collections

__all__ = ["apply_overrides", "config_keys", "load_config", "main"]

EXIT_CONFIG = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command stopped by Ctrl-C


class ConfigError(ValueError):
    """A config mistake, shown as one line."""


def load_config(path: str | None) -> ml_collections.ConfigDict:
    """`get_config()` of a config file, or `default_config()` without one."""
    from mtkd_jax.experiment.config import default_config

    if not path:
        return default_config()
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    spec = importlib.util.spec_from_file_location("mtkd_user_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path!r} has no get_config()")
    return module.get_config()


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
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = tuple(v.strip() for v in text.split(",") if v.strip())
        if not isinstance(value, (tuple, list)):
            value = (value,)
        return tuple(value)
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
        if section_path.endswith("model_kwargs"):
            section = _section(config, section_path.rsplit(".", 1)[0])
            with section.model_kwargs.unlocked():
                section.model_kwargs[name] = _kwarg_value(text)
            continue
        if path not in keys or isinstance(keys[path], dict):
            near = difflib.get_close_matches(path, [k for k in keys if "model_kwargs." not in k],
                                             n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""
            raise ConfigError(f"unknown config key {path!r}{hint} (mtkd run --help lists "
                              "them)")
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


def _keys_help() -> str:
    from mtkd_jax.experiment.config import default_config
    from mtkd_jax.experiment.config_help import FIELD_HELP

    lines = ["config keys (--config.KEY=VALUE; defaults of the built-in config):"]
    for path, value in config_keys(default_config()).items():
        if "model_kwargs." in path:
            continue
        shown = value if not isinstance(value, tuple) else ",".join(map(str, value)) or "()"
        lines.append(f"  {path:<28} {str(shown):<22} {FIELD_HELP.get(path, '')}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtkd", description="Multi-teacher knowledge distillation experiments.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_keys_help())
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", help="run the experiment of a config file", epilog=_keys_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the pipeline (teachers, analysis, every student row, "
                    "codistillation) over the config's seeds. Exit codes: 0 done, 2 config "
                    "mistake, 130 stopped by Ctrl-C (report of the finished seeds written; "
                    "the same command resumes).")
    run.add_argument("config_file", nargs="?", default=None,
                     help="a .py file whose get_config() returns the config (default: the "
                          "built-in default, MNIST-1D)")
    run.add_argument("--config", dest="config_flag", default=None,
                     help="the config file, as the experiments/ scripts take it")
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
    """The `mtkd` command; returns its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    try:
        args = _parser().parse_args(rest)
    except SystemExit as e:
        return int(e.code or 0)
    if args.command == "report":
        return _report(args.run_dir)
    try:
        config = load_config(args.config_flag or args.config_file)
        apply_overrides(config, overrides)
    except ConfigError as e:
        print(f"mtkd: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_CONFIG
    return _run(config)


def _run(config) -> int:
    from absl import logging

    from mtkd_jax.experiment import runner

    logging.set_verbosity(logging.ERROR)  # orbax logs every checkpoint, TFDS its folders

    def on_sigint(signum, frame):
        # Checkpoint writes cut short by the stop log their own tracebacks: silence them,
        # the message below says what happened. A second Ctrl-C stops at once.
        logging.set_verbosity(logging.FATAL)
        py_logging.getLogger().setLevel(py_logging.CRITICAL + 1)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        runner.run(config)
    except runner.ConfigMistake as e:
        print(f"mtkd: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_CONFIG
    except runner.Interrupted as e:
        where = (f"report of the finished seed(s): {os.path.join(e.run_dir, 'results.md')}"
                 if e.result is not None else "no seed had finished, no report")
        print(f"mtkd: stopped by Ctrl-C; {where}; checkpoints kept in {e.run_dir} (the same "
              "command resumes)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("mtkd: stopped by Ctrl-C before the first training", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0
