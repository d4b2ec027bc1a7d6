"""Teachers saved by users' own orbax code (no mtkd_jax call before the save) load and run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import mtkd_jax as mk
from mtkd_jax.models.zoo import nnx as nm
from mtkd_jax.teachers import load_orbax_teachers

D, C, B = 6, 3, 8


def _linen_params(seed):
    model = mk.models.MLP(num_classes=C, features=(5,))
    return model, model.init(jax.random.key(seed), jnp.zeros((1, D)))["params"]


def _save(path, tree):
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, tree)


def test_standard_checkpointer_linen_params_stacked(tmp_path):
    model, p0 = _linen_params(0)
    _, p1 = _linen_params(1)
    paths = [tmp_path / "t0", tmp_path / "t1"]
    for path, p in zip(paths, (p0, p1), strict=True):
        _save(path, p)
    abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, D)))["params"]
    stacked = load_orbax_teachers(paths, abstract)
    assert mk.teachers.num_stacked(stacked) == 2
    x = jnp.asarray(np.random.default_rng(0).normal(size=(B, D)), jnp.float32)
    logits = jax.jit(mk.make_stacked_apply(mk.apply_fn_of(model), strategy="loop"))(stacked, x)
    np.testing.assert_array_equal(logits[1], model.apply({"params": p1}, x))
    # One path: one teacher's tree, unstacked.
    one = load_orbax_teachers(paths[0], abstract)
    np.testing.assert_array_equal(one["Dense_0"]["kernel"], p0["Dense_0"]["kernel"])


def test_checkpoint_manager_nnx_with_batch_norm(tmp_path):
    net = nm.MLP(D, C, features=(5,), batch_norm=True, dropout=0.2, rngs=nnx.Rngs(3))
    net.train()
    net(jnp.ones((B, D)))  # move the batch statistics away from their init
    with ocp.CheckpointManager(tmp_path / "mgr") as manager:
        for step in (1, 7):
            manager.save(step, args=ocp.args.StandardSave(nnx.state(net)))
    abstract = nnx.eval_shape(
        lambda: nm.MLP(D, C, features=(5,), batch_norm=True, dropout=0.2, rngs=nnx.Rngs(0))
    )
    variables = load_orbax_teachers(tmp_path / "mgr", abstract)  # newest step, item "default"
    model = mk.as_model(abstract)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(B, D)), jnp.float32)
    net.eval()
    np.testing.assert_allclose(model.eval_apply(variables, x), net(x), rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(variables["model_state"]["norms"][0]["mean"][...]).max()) > 0
    # An explicit step, and a stack of two checkpoints of one architecture.
    stacked = load_orbax_teachers([tmp_path / "mgr", tmp_path / "mgr"], abstract, step=1)
    logits = mk.make_stacked_apply(model, strategy="vmap")(stacked, x)
    assert logits.shape == (2, B, C)


def test_train_state_saved_whole_is_read_under_its_prefix(tmp_path):
    model, params = _linen_params(0)
    tx = optax.adam(1e-3)
    tree = {"step": jnp.int32(10), "params": params, "opt_state": tx.init(params)}
    with ocp.CheckpointManager(tmp_path / "run") as manager:
        manager.save(10, args=ocp.args.Composite(state=ocp.args.StandardSave(tree),
                                                 extra=ocp.args.StandardSave({"a": jnp.ones(2)})))
    with pytest.raises(ValueError, match=r"holds the items \['extra', 'state'\]: pass `item=`"):
        load_orbax_teachers(tmp_path / "run", params)
    got = load_orbax_teachers(tmp_path / "run", params, item="state")
    np.testing.assert_array_equal(got["Dense_1"]["bias"], params["Dense_1"]["bias"])
    # adam's mu and nu have the params' layout too: the shortest prefix that fits wins,
    # unless named.
    mu = load_orbax_teachers(tmp_path / "run", params, item="state", subtree="opt_state.0.mu")
    np.testing.assert_array_equal(mu["Dense_1"]["bias"], np.zeros(C))


def test_mismatch_names_the_path_and_what_was_found(tmp_path):
    _, params = _linen_params(0)
    _save(tmp_path / "t", params)
    wrong = {"Dense_0": {"kernel": jnp.zeros((D, 7)), "bias": jnp.zeros(7)},
             "Dense_1": {"kernel": jnp.zeros((7, C)), "bias": jnp.zeros(C)}}
    with pytest.raises(ValueError) as err:
        load_orbax_teachers(tmp_path / "t", wrong)
    text = str(err.value)
    assert str(tmp_path / "t") in text and "StandardCheckpointer" in text
    assert "Dense_0.kernel is (6, 5) there, (6, 7) in the target" in text
    assert "The checkpoint holds [Dense_0.bias (5,) float32" in text
    with pytest.raises(ValueError, match=r"missing in the checkpoint: \[head.kernel \(5, 3\)"):
        load_orbax_teachers(tmp_path / "t", {"head": {"kernel": jnp.zeros((5, C))}})
    with pytest.raises(ValueError, match="in the checkpoint but not in the target: "):
        load_orbax_teachers(tmp_path / "t", {"Dense_0": params["Dense_0"]})
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        load_orbax_teachers(tmp_path / "absent", params)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no orbax checkpoint at .*empty"):
        load_orbax_teachers(tmp_path / "empty", params)
    # The library's own loader points to this function for a plain orbax checkpoint.
    with pytest.raises(ValueError, match="load_orbax_teachers"):
        mk.load_teachers(tmp_path / "t")
