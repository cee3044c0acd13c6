r"""Closed forms of the seed's single-neuron MAML, :math:`f_\theta(x) = \theta x`, sum-of-squares loss.

Written directly from the seed's equations in plain NumPy float64, sharing no code with the
autodiff path (``jmaml.inner``/``jmaml.meta``), so they serve as a test oracle and a teaching aid.
Each function names the equation it implements. Arguments are 1-D arrays of points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def sgd_step(w, x, y, alpha) -> float:
    r"""Eqs. 3 / 7: :math:`w^{(1)} = w + 2\alpha \sum_i x_i (y_i - w x_i)`."""
    x, y = _f64(x), _f64(y)
    return float(w + 2.0 * alpha * np.sum(x * (y - w * x)))


def contraction(x, alpha) -> float:
    r"""Eq. 14: :math:`\partial\varphi/\partial\theta = 1 - 2\alpha \sum_i x_i^2` for one step."""
    return float(1.0 - 2.0 * alpha * np.sum(_f64(x) ** 2))


def adapt_k(theta, x, y, alpha, k: int) -> float:
    r"""Eq. 21 in closed form: :math:`W^{(k)} = c^k \theta + (1 - c^k)\,\theta^*`.

    With :math:`c = 1 - 2\alpha\sum x^2` and the least-squares fixed point
    :math:`\theta^* = \sum xy / \sum x^2`, each step of Eq. 21 is
    :math:`\varphi \mapsto c\,\varphi + (1 - c)\,\theta^*`; unrolling it k times gives this.
    """
    x, y = _f64(x), _f64(y)
    sxx = np.sum(x * x)
    if sxx == 0.0:  # the loss does not depend on theta: no step moves it
        return float(theta)
    c = 1.0 - 2.0 * alpha * sxx
    theta_star = np.sum(x * y) / sxx
    return float(c**k * theta + (1.0 - c**k) * theta_star)


def dW_dtheta(x, alpha, k: int) -> float:
    r"""Eq. 28: :math:`\partial W^{(k)}/\partial\theta^{(0)} = (1 - 2\alpha\sum_i x_i^2)^k`."""
    return contraction(x, alpha) ** k


def query_grad(phi, xq, yq) -> float:
    r"""Eq. 13 / 27: :math:`\partial\mathcal{L}_Q/\partial\varphi = -2\sum_q x_q (y_q - \varphi x_q)`."""
    xq, yq = _f64(xq), _f64(yq)
    return float(-2.0 * np.sum(xq * (yq - phi * xq)))


def query_loss(phi, xq, yq) -> float:
    r"""Eq. 10 / 24: :math:`\mathcal{L}_Q = \sum_q (y_q - \varphi x_q)^2`."""
    xq, yq = _f64(xq), _f64(yq)
    return float(np.sum((yq - phi * xq) ** 2))


def task_meta_grad(theta: float, xs: Any, ys: Any, xq: Any, yq: Any, alpha: float, k: int = 1) -> float:
    r"""Eqs. 15 / 26: :math:`(1-2\alpha\sum_S x^2)^k \cdot (-2\sum_Q x_q(y_q - W^{(k)} x_q))`."""
    return dW_dtheta(xs, alpha, k) * query_grad(adapt_k(theta, xs, ys, alpha, k), xq, yq)


def task_fomaml_grad(theta, xs, ys, xq, yq, alpha, k: int = 1) -> float:
    """First-order MAML: Eq. 15 with the factor ∂W/∂θ replaced by 1."""
    return query_grad(adapt_k(theta, xs, ys, alpha, k), xq, yq)


def meta_step(theta, tasks: Sequence[tuple], alpha, beta, k: int = 1) -> float:
    r"""Eqs. 11 / 20 / 25: :math:`\theta^{(1)} = \theta - \beta \sum_j \partial\mathcal{L}_{Q_j}/\partial\theta`.

    Args:
      tasks: a sequence of ``(xs, ys, xq, yq)`` tuples.
    """
    return float(theta - beta * sum(task_meta_grad(theta, xs, ys, xq, yq, alpha, k) for xs, ys, xq, yq in tasks))


def stable_inner_lr_bound(x) -> float:
    r"""The largest α for which inner SGD on support inputs ``x`` does not diverge.

    Inner SGD contracts iff :math:`|1 - 2\alpha\sum x^2| < 1`, i.e. :math:`\alpha < 1/\sum x^2`
    (the Hessian of the sum-of-squares loss is :math:`\lambda = 2\sum x^2`; the bound is 2/λ).
    """
    sxx = float(np.sum(_f64(x) ** 2))
    return float("inf") if sxx == 0.0 else 1.0 / sxx
