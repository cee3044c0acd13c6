import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jmaml import checkpoint, init_state, models


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
    payload["leaf_00000"] = payload["leaf_00000"] + 1.0
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
