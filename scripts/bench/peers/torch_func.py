"""Peer (b): MAML with PyTorch ``torch.func``, as in the PyTorch MAML examples.

``functional_call`` + ``torch.func.grad`` for the inner steps (a Python loop), ``torch.func.vmap``
over tasks, ``.backward()`` through it all for the exact second-order meta-gradient, and
``torch.optim.Adam``; on a fixed meta-batch already on the device. Needs torch (optional; on
these machines ``pip install torch==2.13.0``, the CPU build on disk).
"""

from __future__ import annotations

import time


def setup(batch, num_inner_steps: int, device: str = "cpu"):
    """Returns ``run(n) -> seconds for n meta-steps``."""
    import torch
    from torch import nn
    from torch.func import functional_call, grad, vmap

    from scripts.bench.peers.common import HIDDEN, INNER_LR, META_LR

    torch.manual_seed(0)
    layers, sizes = [], [1, *HIDDEN, 1]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).to(device)
    params = dict(model.named_parameters())
    opt = torch.optim.Adam(params.values(), lr=META_LR)
    xs, ys, xq, yq = (torch.as_tensor(a, device=device) for a in batch)

    def loss_fn(p, x, y):
        return torch.mean((functional_call(model, p, (x,)) - y) ** 2)

    def task_loss(p, xs, ys, xq, yq):
        for _ in range(num_inner_steps):
            g = grad(loss_fn)(p, xs, ys)
            p = {n: p[n] - INNER_LR * g[n] for n in p}
        return loss_fn(p, xq, yq)

    batched = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))

    def run(n: int) -> float:
        sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss = batched(params, xs, ys, xq, yq).mean()
            loss.backward()
            opt.step()
        sync()
        return time.perf_counter() - t0

    return run
