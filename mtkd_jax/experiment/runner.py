"""The article's pipeline end to end, repeated over seeds: `run_seed` and `run`.

Per seed (`run_seed`), following the article's sections 2, 3 and 5:

1. train K teachers (`mtkd_jax.experiment.teachers`);
2. their predictions on the validation set, 3. their pairwise divergences, 4. the
   distillation targets of every strategy and how good each is
   (`mtkd_jax.experiment.analysis`);
5. a smaller student distilled with each strategy, and codistillation of the K teachers
   (`mtkd_jax.experiment.students`);
6. evaluation on the test set: accuracy, macro recall, macro F1 (the article's), NLL, ECE and
   agreement with the teacher ensemble, for every student, teacher and the ensemble.

`run` checks the config once (`validate_config`, which returns the run's `RunPlan`; then
`check_against_dataset` once the data is loaded), repeats this over `config.seeds` seeds, measures
the compression (parameters, FLOPs, latency), and writes the run folder
(`mtkd_jax.experiment.run_folder`). Every train loop is `mtkd_jax.training.fit.fit` over a step
compiled data-parallel over all devices (`mtkd_jax.experiment.context`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import sys
import time
from typing import Any

import jax
import ml_collections

from mtkd_jax import data as data_lib
from mtkd_jax import parallel
from mtkd_jax.experiment import (
    auto_settings,
    compression,
    report,
    run_folder,
    teacher_check,
    trust_plot,
)
from mtkd_jax.experiment.analysis import analyse
from mtkd_jax.experiment.config import ConfigError, RunPlan, validate_config
from mtkd_jax.experiment.context import Context
from mtkd_jax.experiment.dataset_check import check_against_dataset
from mtkd_jax.experiment.multi_source import train_source_teachers
from mtkd_jax.experiment.progress import RunProgress, StageTimes, log
from mtkd_jax.experiment.results import ExperimentResult, SeedResult
from mtkd_jax.experiment.students import train_students
from mtkd_jax.experiment.teachers import train_teachers

__all__ = ["Interrupted", "prepare_run_dir", "run_seed", "run"]


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C (SIGINT): `result` holds the seeds that finished (their report
    is written to `run_dir`), or is None when none had; checkpoints are kept, so the same
    command resumes. The `mtkd` command exits with code 130 on it."""

    def __init__(self, run_dir: str, result):
        super().__init__(run_dir)
        self.run_dir, self.result = run_dir, result

# May change between a run and its resume (`force`: go on after the teacher check stopped).
_IGNORED_KEYS = ("progress", "log_every", "force", "checkpoint_minutes", "checkpoint_every")


def run_seed(config, plan: RunPlan, seed: int, dataset, transfer_x, mesh, run_dir: str,
             shared: dict | None = None, *, progress: RunProgress | None = None,
             times: StageTimes | None = None):
    """Run the whole pipeline once with `seed`; return a `SeedResult` and the trained models.

    Args:
      config: a validated config.
      plan: its `RunPlan` (`validate_config`).
      seed: seeds the teachers' and the student's initialisation and the data order.
      dataset: the `mtkd_jax.data.Dataset`.
      transfer_x: `[M, ...]` unlabeled transfer inputs (`plan.transfer_size`), or None.
      mesh: the data-parallel mesh.
      run_dir: the run folder (checkpoints, TensorBoard).
      shared: a dict kept across the seeds of a run: models and compiled steps built once.
      progress: the run's `RunProgress` (None: no bar).
      times: the run's `StageTimes`, which the stages add their seconds to.

    Returns:
      `(SeedResult, models)` where `models` maps "teacher", "student", "ensemble" to
      `(apply_fn, params)` for the compression measurements.
    """
    ctx = Context(config, plan, dataset, transfer_x, mesh, run_dir, seed,
                  {} if shared is None else shared, progress=progress, times=times)
    t0 = time.perf_counter()
    with ctx.times.stage("teachers"):
        if config.sources.kind == "same":
            teachers = train_teachers(ctx)  # 1.
        else:  # teachers from different sources (experiment/multi_source.py)
            teachers = train_source_teachers(ctx)
    seconds = {"teachers": time.perf_counter() - t0}
    t0 = time.perf_counter()
    with ctx.times.stage("analysis"):
        analysis = analyse(ctx, teachers)  # 2-4.
    seconds["analysis"] = time.perf_counter() - t0
    teacher_check.check_teachers(config, analysis.val_accuracy, dataset.validation.y,
                                 seed=seed)  # noise is not distilled
    students = train_students(ctx, teachers, analysis)  # 5-6.
    seconds.update(students.seconds)

    result = SeedResult(
        seed=seed, rows={**analysis.rows, **students.rows},
        teacher_val_accuracy=[float(a) for a in analysis.val_accuracy],
        divergence=analysis.divergence, targets=analysis.targets, weights=analysis.weights,
        histories={**teachers.histories, **students.histories},
        steps={"teachers": teachers.steps, **students.steps}, seconds=seconds,
    )
    trained = {"teacher": teachers.members[0],  # the ensemble timed as one teacher is
               "ensemble": compression.ensemble_program(teachers.members)}
    if students.student is not None:
        trained["student"] = students.student
    return result, trained


def _config_json(config) -> dict:
    d = json.loads(config.to_json_best_effort())
    for key in _IGNORED_KEYS:
        d.pop(key, None)
    return d


def prepare_run_dir(config) -> str:
    """Create the run folder and write `config.json`; refuse one made with another config.

    Re-running the same command in the same folder resumes it: finished trainings are read
    back from their checkpoints and unfinished ones continue. A different config (other than
    `progress`, `log_every`, `force` and the checkpoint intervals) in a folder that holds
    checkpoints or results is refused, so results never mix; a folder whose run failed
    before saving anything is reused. `run` writes the config as given, with the fields left
    to the data at 0 (`auto_settings` fills them in the same way on every rerun; results.md
    says what they were).

    Returns:
      The absolute run folder path.
    """
    run_dir = os.path.abspath(config.output_dir)
    path = os.path.join(run_dir, "config.json")
    current = _config_json(config)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        saved = {k: v for k, v in saved.items() if k not in _IGNORED_KEYS}
        if saved != current and not _holds_results(run_dir):
            log(f"{run_dir}: replacing the config of a run that saved nothing")
        elif saved != current:
            diff = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
            raise ValueError(
                f"{run_dir} holds a run made with another config (differs in {diff}); use "
                "another `--config.output_dir` or delete that folder."
            )
    if jax.process_index() == 0:
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            f.write(config.to_json_best_effort(indent=2, sort_keys=True))
    return run_dir


def _holds_results(run_dir: str) -> bool:
    """Whether a run folder holds a checkpoint or a report."""
    if os.path.exists(os.path.join(run_dir, "results.md")):
        return True
    for _, _, files in os.walk(os.path.join(run_dir, "checkpoints")):
        if files:
            return True
    return False


def _compression_labels(config, plan: RunPlan) -> dict[str, str]:
    names = plan.teacher_models
    ensemble = f"{len(names)} x {names[0]}" if len(set(names)) == 1 else " + ".join(names)
    return {"student": f"student ({config.student.model})",
            "teacher": f"one teacher ({names[0]})", "ensemble": f"ensemble ({ensemble})"}


def _environment() -> dict[str, Any]:
    devices = jax.devices()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "backend": jax.default_backend(),
        "devices": f"{len(devices)} x {devices[0].device_kind}",
        "processes": jax.process_count(),
        "jax": jax.__version__,
        "python": sys.version.split()[0],
        "command": " ".join(["python", *sys.argv]),
    }


def run(config: ml_collections.ConfigDict) -> ExperimentResult:
    """Run the pipeline over `config.seeds` seeds and write the run folder.

    The config is checked once (`validate_config`, which returns the `RunPlan` every stage
    reads), before any data is loaded or model trained; a mistake is a `ConfigError`. With
    `config.distributed` (or `MTKD_*` variables that ask for it, see
    `mtkd_jax.parallel`), `initialize_distributed()` is called first, before any JAX work,
    taking the coordinator, process count and id from `MTKD_*` variables or JAX's cluster
    detection, and every host feeds its slice of each global batch.

    Args:
      config: see `mtkd_jax.experiment.config.default_config`.

    Returns:
      An `ExperimentResult`; the run folder holds `results.md`, `results.csv`,
      `results_per_seed.csv`, `analysis.json`, `histories.json`, PNG plots, TensorBoard
      events, `config.json` and checkpoints.

    Raises:
      ConfigError: a config mistake, found before anything trains.
      Interrupted: Ctrl-C.
    """
    if config.distributed or parallel.distributed_requested():
        parallel.initialize_distributed()
    plan = validate_config(config, num_devices=jax.device_count())
    times = StageTimes()
    with times.listening():
        return _run(config, plan, times)


@contextlib.contextmanager
def _config_mistakes():
    """The data's errors before training (an unknown dataset, a missing or unreadable image
    folder, a run folder of another run: ValueError/TypeError/FileNotFoundError) are the
    config's: `ConfigError`."""
    try:
        yield
    except ConfigError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from e


def _load(config, plan: RunPlan):
    """`data.load` of the config's dataset; says what was carved, converted or resized."""
    folder = config.dataset.startswith(data_lib.FOLDER_PREFIX)
    kwargs = dict(image_size=tuple(config.image_size), color_mode=config.color_mode,
                  flip=config.flip) if folder else {}
    dataset = data_lib.load(config.dataset, data_dir=config.data_dir or None, **kwargs)
    info = dataset.info
    log(f"dataset {config.dataset}: {len(dataset.train)} train / {len(dataset.validation)} "
        f"validation / {len(dataset.test)} test, inputs {tuple(info.input_shape)}, "
        f"{info.num_classes} classes")
    for note in info.notes:
        log(f"  {note}")
    if folder:
        log(f"  horizontal flips {'keep' if config.flip else 'change'} the label (config.flip)")
    if config.transfer.size and not plan.transfer_size:
        log("  no transfer set: it is generated for mnist1d only (config.transfer.size)")
    return dataset


def _run(config, plan: RunPlan, times: StageTimes) -> ExperimentResult:
    start = time.perf_counter()
    with times.stage("data"):
        with _config_mistakes():
            dataset = _load(config, plan)
            given = config  # config.json holds it as given: a rerun resolves it the same way
            config = auto_settings.settle(config, dataset)  # fields left to the data
            plan = validate_config(config, num_devices=jax.device_count())
            check_against_dataset(config, dataset)
            run_dir = prepare_run_dir(given)
        transfer_x = None
        if plan.transfer_size:
            t0 = time.perf_counter()
            transfer_x = data_lib.mnist1d_transfer_set(
                plan.transfer_size, seed=config.transfer.seed, info=dataset.info
            )
            log(f"transfer set: {len(transfer_x)} unlabeled inputs "
                f"({time.perf_counter() - t0:.1f} s)")
    mesh = parallel.make_mesh()
    log(f"devices: {jax.device_count()} ({jax.default_backend()}), processes: "
        f"{jax.process_count()}; run folder: {run_dir}")
    progress = RunProgress(plan.trainings_per_seed * config.seeds, enabled=config.progress)
    seeds, trained, shared, interrupted = [], None, {}, False
    try:
        for seed in range(config.first_seed, config.first_seed + config.seeds):
            result, models_of_seed = run_seed(config, plan, seed, dataset, transfer_x, mesh,
                                              run_dir, shared, progress=progress, times=times)
            seeds.append(result)
            trained = trained or models_of_seed
    except teacher_check.TeachersAtChance as e:
        raise ConfigError(str(e)) from None
    except KeyboardInterrupt:
        interrupted = True
        progress.close()
        log(f"\ninterrupted: {len(seeds)} of {config.seeds} seed(s) finished; checkpoints are "
            "kept, the same command resumes")
        if not seeds:
            raise Interrupted(run_dir, None) from None
    finally:
        progress.close()
    comp = []
    if config.compression.enabled and not interrupted:
        with times.stage("compression"):
            comp = compression.measure(
                trained, example_x=dataset.test.x, labels=_compression_labels(config, plan),
                repeats=config.compression.repeats, log=log,
            )
    result = ExperimentResult(
        config=config, run_dir=run_dir, seeds=seeds, compression=comp,
        environment=_environment(), wall_seconds=time.perf_counter() - start, files=[],
        times=times.as_dict(), interrupted=interrupted, plan=plan,
    )
    if jax.process_index() == 0:
        result.files = run_folder.write_run_folder(result, plan.strategies)
        if config.plots and config.sources.kind != "same":  # experiment/trust_plot.py
            result.files.append(trust_plot.write_trust_plot(result, dataset))
        print(report.summary(result, plan.strategies), flush=True)
        print("time per stage:\n" + "\n".join(times.lines()), flush=True)
    if interrupted:
        raise Interrupted(run_dir, result)
    return result
