"""The closed forms against the seed's printed numbers and against brute-force recursion."""

import numpy as np
import pytest

from jmaml.core import analytic
from jmaml.tasks import seed

S1, Q1 = ((2.0, 3.0), (4.0, 1.0)), ((1.0,), (2.0,))
S2, Q2 = ((5.0, 6.0), (3.0, 0.0)), ((4.0,), (1.0,))


def test_seed_numbers_from_the_closed_forms():
    assert analytic.sgd_step(1.0, [1, 2, 3], [2, 4, 1], 0.1) == pytest.approx(0.8, abs=1e-12)
    assert analytic.adapt_k(1.0, *S1, 0.1, 1) == pytest.approx(0.6, abs=1e-12)
    assert analytic.adapt_k(1.0, *S2, 0.1, 1) == pytest.approx(-8.2, abs=1e-12)
    assert analytic.task_meta_grad(1.0, *S1, *Q1, 0.1) == pytest.approx(4.48, abs=1e-9)
    assert analytic.task_meta_grad(1.0, *S2, *Q2, 0.1) == pytest.approx(3028.48, abs=1e-9)
    tasks = [(*S1, *Q1), (*S2, *Q2)]
    assert analytic.meta_step(1.0, tasks, 0.1, 0.5) == pytest.approx(-1515.48, abs=1e-9)


def test_closed_form_k_steps_equals_iterating_eq7():
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = rng.normal(size=4), rng.normal(size=4)
        alpha, theta = rng.uniform(0, 0.3), rng.normal()
        w = theta
        for k in range(8):
            assert analytic.adapt_k(theta, x, y, alpha, k) == pytest.approx(w, rel=1e-9, abs=1e-9)
            w = analytic.sgd_step(w, x, y, alpha)


def test_stable_bound_matches_the_seed_tasks():
    assert analytic.stable_inner_lr_bound(S2[0]) == pytest.approx(1 / 61)
    assert abs(analytic.contraction(S2[0], 0.1)) > 1  # the seed's divergent task
    assert abs(analytic.contraction(S2[0], 0.9 / 61)) < 1


def test_seed_module_holds_the_documents_tables():
    tasks = seed.meta_tasks()
    np.testing.assert_array_equal(tasks.support.x, [[2, 3], [5, 6]])
    np.testing.assert_array_equal(tasks.support.y, [[4, 1], [3, 0]])
    np.testing.assert_array_equal(tasks.query.x, [[1], [4]])
    np.testing.assert_array_equal(tasks.query.y, [[2], [1]])
    np.testing.assert_array_equal(seed.conventional_batch().y, [2, 4, 1])
