import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jmaml import init_state
from jmaml.core import models
from jmaml.engine import checkpoint


def _state():
    params = models.mlp([1, 4, 1]).init(jax.random.key(0))
    return init_state(params, optax.adam(1e-3), jax.random.key(5))


def _assert_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for u, v in zip(la, lb):
        if jnp.issubdtype(u.dtype, jax.dtypes.prng_key):
            u, v = jax.random.key_data(u), jax.random.key_data(v)
        np.testing.assert_array_equal(u, v)


def test_round_trip_is_exact_including_the_key(tmp_path):
    state = _state()._replace(step=jnp.asarray(7, jnp.int32))
    path = tmp_path / "c.npz"
    checkpoint.save(path, state, step=7, extra={"phase": "maml"})
    restored, header = checkpoint.restore(path, _state())
    _assert_equal(restored, state)
    assert header["step"] == 7 and header["extra"] == {"phase": "maml"}
    # The restored key draws the same numbers.
    np.testing.assert_array_equal(jax.random.normal(restored.key, (3,)), jax.random.normal(state.key, (3,)))
    assert [p.name for p in tmp_path.iterdir()] == ["c.npz"]  # no temporary file left


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, _state(), step=1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="corrupted or truncated"):
        checkpoint.restore(path, _state())


def test_flipped_bytes_fail_the_checksum(tmp_path):
    path = tmp_path / "c.npz"
    state = _state()
    checkpoint.save(path, state, step=1)
    # Rewrite one leaf with different values but a valid archive: only the checksum can tell.
    with np.load(path) as d:
        payload = {k: np.array(d[k]) for k in d.files}
    payload["params/0/w"] = payload["params/0/w"] + 1.0
    with open(path, "wb") as f:
        np.savez(f, **payload)
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.restore(path, state)


def test_template_mismatch_and_missing_file(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, _state(), step=1)
    other = init_state(models.mlp([1, 5, 1]).init(jax.random.key(0)), optax.adam(1e-3), jax.random.key(0))
    with pytest.raises(checkpoint.CheckpointError, match="different configuration"):
        checkpoint.restore(path, other)
    with pytest.raises(checkpoint.CheckpointError, match="not found"):
        checkpoint.restore(tmp_path / "nope.npz", other)
    assert os.path.exists(path)


def test_arrays_are_stored_under_their_key_paths(tmp_path):
    path = tmp_path / "c.npz"
    state = _state()
    checkpoint.save(path, state, step=3)
    # Read with plain NumPy, not through jmaml: the file itself names each array.
    with np.load(path, allow_pickle=False) as z:
        names = set(z.files) - {"header"}
        np.testing.assert_array_equal(z["params/1/w"], state.params[1]["w"])
        np.testing.assert_array_equal(z["opt_state/0/nu/0/b"], state.opt_state[0].nu[0]["b"])
    assert {"params/0/w", "params/0/b", "params/1/w", "params/1/b", "step", "key",
            "opt_state/0/count", "opt_state/0/mu/0/w"} <= names
    assert len(names) == len(jax.tree.leaves(state))
    assert list(checkpoint.arrays(path)) == checkpoint.read_header(path)["keys"]


def test_restore_matches_by_key_path_and_names_a_missing_one(tmp_path):
    path = tmp_path / "c.npz"
    checkpoint.save(path, {"b": jnp.ones(2), "a": jnp.zeros(3)}, step=0)
    with pytest.raises(checkpoint.CheckpointError, match="no array 'c'"):
        checkpoint.restore(path, {"c": jnp.ones(2), "a": jnp.zeros(3)})
    with pytest.raises(checkpoint.CheckpointError, match="array 'a' has shape"):
        checkpoint.restore(path, {"b": jnp.ones(2), "a": jnp.zeros(4)})


def _write_v1(path, tree, step):
    """The version-1 layout, written here by hand: leaves by position, no key paths."""
    import hashlib
    import json
    leaves = checkpoint.host_leaves(tree)
    h = hashlib.sha256()
    for a in leaves:
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    header = {"format": "jmaml-checkpoint-v1", "step": step, "num_leaves": len(leaves),
              "sha256": h.hexdigest(), "extra": {"phase": "maml"}}
    payload = {f"leaf_{i:05d}": a for i, a in enumerate(leaves)}
    with open(path, "wb") as f:
        np.savez(f, header=np.asarray(json.dumps(header)), **payload)


def test_version_1_checkpoints_still_load(tmp_path):
    state = _state()._replace(step=jnp.asarray(4, jnp.int32))
    path = tmp_path / "old.npz"
    _write_v1(path, state, 4)
    restored, header = checkpoint.restore(path, _state())
    _assert_equal(restored, state)
    assert header["step"] == 4 and list(checkpoint.arrays(path))[0] == "leaf_00000"


def test_a_committed_version_1_run_still_loads():
    # experiments/algorithms/results/k1/maml was written before key paths; it loads into today's state.
    from jmaml.run import recipes, rundir, train
    run = os.path.join(os.path.dirname(__file__), "..", "experiments", "algorithms", "results", "k1", "maml")
    assert checkpoint.read_header(os.path.join(run, "maml.ckpt.npz"))["format"] == "jmaml-checkpoint-v1"
    params = train.load_params(run)
    assert jax.tree.structure(params) == jax.tree.structure(recipes.initial_state(rundir.load_config(run)).params)


@pytest.mark.parametrize("step", [-1, 2.7, "3", True, None])
def test_save_refuses_a_step_its_reader_would_call_corrupt(tmp_path, step):
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        checkpoint.save(tmp_path / "c.npz", {"w": np.ones(2)}, step=step)
    assert not (tmp_path / "c.npz").exists()


@pytest.mark.parametrize("leaf", [np.array([{"a": 1}], dtype=object), np.array(["x"]), "text"])
def test_save_refuses_leaves_that_would_need_pickle(tmp_path, leaf):
    with pytest.raises(TypeError, match=r"leaf .* holds numeric arrays only"):
        checkpoint.save(tmp_path / "c.npz", {"w": np.ones(2), "bad": leaf}, step=1)
    assert not (tmp_path / "c.npz").exists()
