"""The benchmark problem, shared by jmaml and the peers: sinusoid second-order MAML."""

from __future__ import annotations

import numpy as np

HIDDEN = (40, 40)
NUM_SUPPORT = 10
NUM_QUERY = 10
INNER_LR = 0.01
META_LR = 1e-3


def sample_numpy_tasks(num_tasks: int, seed: int = 0):
    """A fixed meta-batch (float32 arrays (B, K, 1)): the peers reuse it at every step."""
    rng = np.random.default_rng(seed)
    amp = rng.uniform(0.1, 5.0, (num_tasks, 1, 1))
    phase = rng.uniform(0.0, np.pi, (num_tasks, 1, 1))
    xs = rng.uniform(-5, 5, (num_tasks, NUM_SUPPORT, 1))
    xq = rng.uniform(-5, 5, (num_tasks, NUM_QUERY, 1))
    f = lambda x: amp * np.sin(x - phase)  # noqa: E731
    return tuple(a.astype(np.float32) for a in (xs, f(xs), xq, f(xq)))
