import jax
import numpy as np
import pytest

from jmaml.tasks import sinusoid


def test_shapes_ranges_and_labels():
    key = jax.random.key(0)
    tasks = sinusoid.sample_tasks(key, 500, num_support=7, num_query=3)
    assert tasks.support.x.shape == (500, 7, 1) and tasks.query.y.shape == (500, 3, 1)
    for b in (tasks.support, tasks.query):
        x = np.asarray(b.x)
        assert x.min() >= -5.0 and x.max() <= 5.0
    params = sinusoid.sample_params(jax.random.split(key, 3)[0], 500)
    a, p = np.asarray(params.amplitude), np.asarray(params.phase)
    assert a.min() >= 0.1 and a.max() <= 5.0 and p.min() >= 0.0 and p.max() <= np.pi
    assert a.max() - a.min() > 4.0 and p.max() - p.min() > 2.5  # spans the ranges
    x = np.asarray(tasks.support.x)
    np.testing.assert_allclose(tasks.support.y, a[:, None, None] * np.sin(x - p[:, None, None]),
                               rtol=1e-5, atol=1e-5)


def test_same_key_same_tasks_other_key_other_tasks():
    a = sinusoid.sample_tasks(jax.random.key(1), 4)
    b = sinusoid.sample_tasks(jax.random.key(1), 4)
    c = sinusoid.sample_tasks(jax.random.key(2), 4)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(a.support.x, c.support.x)


def test_sampling_works_inside_jit():
    f = jax.jit(lambda k: sinusoid.sample_tasks(k, 3, num_support=5))
    assert f(jax.random.key(0)).support.x.shape == (3, 5, 1)


@pytest.mark.parametrize("kwargs", [dict(num_tasks=0), dict(num_tasks=2, num_support=0),
                                    dict(num_tasks=2, num_query=-3)])
def test_zero_or_negative_counts(kwargs):
    with pytest.raises(ValueError, match=">= 1"):
        sinusoid.sample_tasks(jax.random.key(0), **kwargs)
