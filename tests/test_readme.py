"""README's API examples run as written (the multi-host script is covered by test_multihost)."""

import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks(start: str, end: str) -> list[str]:
    text = README.read_text()
    section = text[text.index(start):text.index(end)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_the_functional_examples_run():
    """The jitted train step and the registered weighting, with a linear student."""
    blocks = _python_blocks("## Use the functions inside your own", "## The whole pipeline")
    assert len(blocks) == 2
    rng = np.random.default_rng(0)
    k, b, d, c = 3, 8, 5, 4
    w = jnp.asarray(rng.normal(size=(d, c)), jnp.float32)
    namespace = {"student_apply": lambda p, x: x @ p}
    exec(blocks[0], namespace)
    params, opt_state = w, namespace["tx"].init(w)
    teacher_logits = jnp.asarray(rng.normal(size=(k, b, c)), jnp.float32)
    x = jnp.asarray(rng.normal(size=(b, d)), jnp.float32)
    y = jnp.asarray(rng.integers(0, c, size=b), jnp.int32)
    losses = []
    for _ in range(5):
        params, opt_state, loss = namespace["train_step"](params, opt_state, teacher_logits, x, y)
        losses.append(float(loss))
    assert losses[-1] < losses[0]
    try:
        exec(blocks[1], namespace)
        step = jax.jit(namespace["step"])
        state = namespace["mk"].init_train_state(w, namespace["tx"])
        batch = {"x": x, "y": y, "teacher_logits": teacher_logits}
        state, m = step(state, batch, jax.random.key(0))
        assert int(state.step) == 1 and m["teacher_weights"].shape == (k,)
        assert namespace["sharper"](jax.nn.softmax(teacher_logits)).shape == (k, b)
    finally:
        namespace["mk"].WEIGHTINGS.pop("margin", None)


def test_the_whole_pipeline_example_runs():
    """Teachers trained at once, 'auto' inference, data-parallel distillation, evaluation."""
    (block,) = _python_blocks("## The whole pipeline", "### Data parallel")
    namespace = {}
    exec(block, namespace)
    res = namespace["res"]
    assert sorted(res) == ["ensemble", "student", "teacher_0", "teacher_1", "teacher_2"]
    assert res["student"]["n"] == len(namespace["ds"].test)
    assert int(namespace["state"].step) == 2 * (len(namespace["ds"].train) // 128)
    # Two epochs are enough to leave chance (10%) well behind.
    assert res["ensemble"]["accuracy"] > 0.2 and res["student"]["accuracy"] > 0.15


def test_the_teachers_you_already_have_example_runs(tmp_path):
    """Checkpoints written by plain orbax, read back as the README shows."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from mtkd_jax.models import MLP

    (block,) = _python_blocks("## Distil from teachers you already have", "## Data\n")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(40, 10, rngs=rngs)
            self.bn = nnx.BatchNorm(10, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.linear(x))

    linen_paths = [str(tmp_path / f"t{k}") for k in range(2)]
    with ocp.StandardCheckpointer() as ckptr:
        for k, path in enumerate(linen_paths):
            ckptr.save(path, MLP(num_classes=10).init(jax.random.key(k), jnp.zeros((1, 40)))[
                "params"])
    manager_dir = str(tmp_path / "mgr")
    with ocp.CheckpointManager(manager_dir) as manager:
        manager.save(3, args=ocp.args.StandardSave(nnx.state(Net(nnx.Rngs(5)))))
    namespace = {"linen_paths": linen_paths, "manager_dir": manager_dir, "Net": Net}
    exec(block, namespace)
    x = jnp.ones((4, 40))
    assert namespace["teacher_apply"](namespace["t_params"], x).shape == (2, 4, 10)
    want = nnx.merge(*nnx.split(Net(nnx.Rngs(5))))
    want.eval()
    np.testing.assert_allclose(
        namespace["nnx_teacher"].eval_apply(namespace["nnx_vars"], x), want(x),
        rtol=1e-6, atol=1e-6)
