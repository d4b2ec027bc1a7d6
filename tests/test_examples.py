"""The runnable user stories in examples/, end to end, in their quick setting."""

import importlib.util
import pathlib

import pytest

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nnx_distill_quick():
    out = _load("nnx_distill").main(quick=True)
    names = {"teacher_dropout", "teacher_batchnorm", "student_alone", "student_distilled",
             "ensemble", "seconds"}
    assert set(out) == names
    assert all(0.0 <= out[n] <= 1.0 for n in names - {"seconds"})


def test_own_checkpoints_quick(tmp_path):
    out = _load("own_checkpoints").main(str(tmp_path), quick=True)
    assert set(out) == {"student", "linen_seed0", "linen_seed1", "nnx_mlp", "ensemble",
                        "seconds"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "linen_teacher_0", "linen_teacher_1", "nnx_teacher"]


@pytest.mark.slow
def test_nnx_distill_full_run_student_beats_student_alone():
    out = _load("nnx_distill").main()
    assert out["student_distilled"] > out["student_alone"] + 0.03
    assert min(out["teacher_dropout"], out["teacher_batchnorm"]) > 0.85


def test_published_teachers_quick():
    """Two published-format checkpoints (tests/fixtures/checkpoints) distilled offline into
    a small transformer on the fixtures' text: the soft loss and the held-out cross-entropy
    fall."""
    out = _load("published_teachers").main(quick=True)
    assert out["stacked"] and {"teacher_llama", "teacher_llama_bf16", "ensemble"} <= set(out)
    assert out["soft_loss_last"] < 0.6 * out["soft_loss_first"]
    assert out["student_after"] < out["student_before"]
