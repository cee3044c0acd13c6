"""Meta-steps/s for few-shot image classification shapes: jmaml against torch.func's MAML, same card, same run.

Two settings from the MAML paper, on synthetic images (the shapes are what matters for speed):
Omniglot 5-way 1-shot (28x28 grey, Conv-4 with 64 strided filters, meta-batch 32, 1 inner step at
alpha 0.4) and miniImageNet 5-way 1-shot (84x84 RGB, Conv-4 with 32 filters and max-pooling,
meta-batch 4, 5 inner steps at alpha 0.01); 15 query images per class; second-order MAML, Adam 1e-3.
Both frameworks run the same fixed meta-batch, already on the device; jmaml also runs its training
loop, which samples every meta-batch on the device inside the compiled chunk. Writes
``--out``/images_<platform>.{json,md}:

    PYTHONPATH=. python3 scripts/bench/images_bench.py --min-time 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

SETTINGS = {
    "omniglot 5-way 1-shot": dict(task="omniglot", ways=5, shots=1, queries=15, batch=32, k=1, alpha=0.4, size=28,
                                  channels=1, filters=64, strided=True),
    "miniImageNet 5-way 1-shot": dict(task="miniimagenet", ways=5, shots=1, queries=15, batch=4, k=5, alpha=0.01,
                                      size=84, channels=3, filters=32, strided=False),
}


def fixed_batch(s: dict, seed: int = 0):
    """A fixed meta-batch (NHWC float32 images, int labels) used by both frameworks."""
    rng = np.random.default_rng(seed)
    shape = lambda n: (s["batch"], s["ways"] * n, s["size"], s["size"], s["channels"])
    labels = lambda n: np.tile(np.repeat(np.arange(s["ways"]), n), (s["batch"], 1)).astype(np.int64)
    return (rng.random(shape(s["shots"]), dtype=np.float32), labels(s["shots"]),
            rng.random(shape(s["queries"]), dtype=np.float32), labels(s["queries"]))


def _time(run, min_time: float) -> float:
    run(2)  # warm-up (compiles)
    n, elapsed = 2, 0.0
    while elapsed < min_time:
        n *= 2
        elapsed = run(n)
    return n / elapsed


def jmaml_fixed(s: dict, min_time: float) -> float:
    import jax
    import jax.numpy as jnp
    import optax

    from jmaml import Batch, Task, init_state, make_loss
    from jmaml.core import estimators, models

    model = models.conv4(s["ways"], in_channels=s["channels"], filters=s["filters"], strided=s["strided"],
                         image_size=s["size"])
    loss = make_loss(model.apply, "xent")
    opt = optax.adam(1e-3)
    step = jax.jit(estimators.make_estimator_step(opt, estimators.maml(loss, num_inner_steps=s["k"], unroll=True),
                                                  inner_lr=s["alpha"]))
    xs, ys, xq, yq = fixed_batch(s)
    tasks = Task(Batch(jnp.asarray(xs), jnp.asarray(ys, jnp.int32)), Batch(jnp.asarray(xq), jnp.asarray(yq, jnp.int32)))
    state = [init_state(model.init(jax.random.key(0)), opt, jax.random.key(1))]

    def run(n):
        t0 = time.perf_counter()
        for _ in range(n):
            state[0], metrics = step(state[0], tasks)
        jax.block_until_ready(state[0].params)
        return time.perf_counter() - t0

    return _time(run, min_time)


def jmaml_training_loop(s: dict, min_time: float) -> float:
    """The real loop: jmaml.train's compiled chunk, sampling each meta-batch on the device."""
    import jax

    from jmaml.run import train
    from jmaml.tasks import images as image_tasks

    config = train.TrainConfig(task=s["task"], data_dir="synthetic", ways=s["ways"], num_support=s["shots"],
                               num_query=s["queries"], meta_batch_size=s["batch"], num_inner_steps=s["k"],
                               inner_lr=s["alpha"], image_size=s["size"], pretrain=False)
    images = np.random.default_rng(0).integers(0, 256, (64, 20, s["size"], s["size"], s["channels"]), np.uint8)
    # synthetic classes instead of a folder: the family reads its splits through config_split
    image_tasks.config_split = lambda config, split="train": jax.numpy.asarray(images)
    chunk = train.make_chunk(config)
    state = [train.initial_state(config)]

    length = 16  # one chunk length, so one compilation: n chunks of 16 steps

    def run(n):
        t0 = time.perf_counter()
        for _ in range(n):
            state[0], _ = chunk(state[0], length)
        jax.block_until_ready(state[0].params)
        return time.perf_counter() - t0

    return length * _time(run, min_time)


def torch_fixed(s: dict, min_time: float, device: str) -> float:
    import torch
    import torch.nn.functional as F
    from torch.func import grad, vmap

    torch.manual_seed(0)
    c, f = s["channels"], s["filters"]
    params = {}
    for i in range(4):
        fan_in = 9 * (c if i == 0 else f)
        params[f"w{i}"] = torch.randn(f, c if i == 0 else f, 3, 3, device=device) * (2.0 / fan_in) ** 0.5
        params[f"s{i}"] = torch.ones(f, device=device)
        params[f"o{i}"] = torch.zeros(f, device=device)
    side = s["size"]
    for _ in range(4):
        side = -(-side // 2) if s["strided"] else side // 2
    feats = f if s["strided"] else f * side * side
    params["hw"] = (torch.rand(s["ways"], feats, device=device) * 2 - 1) / feats ** 0.5
    params["hb"] = torch.zeros(s["ways"], device=device)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.Adam(params.values(), lr=1e-3)

    def forward(p, x):
        h = x
        for i in range(4):
            h = F.conv2d(h, p[f"w{i}"], stride=2 if s["strided"] else 1, padding=1)
            h = F.batch_norm(h, None, None, weight=p[f"s{i}"], bias=p[f"o{i}"], training=True)
            h = F.relu(h)
            if not s["strided"]:
                h = F.max_pool2d(h, 2)
        h = h.mean(dim=(2, 3)) if s["strided"] else h.flatten(1)
        return F.linear(h, p["hw"], p["hb"])

    def loss_fn(p, x, y):
        return F.cross_entropy(forward(p, x), y)

    def task_loss(p, xs, ys, xq, yq):
        for _ in range(s["k"]):
            g = grad(loss_fn)(p, xs, ys)
            p = {n: p[n] - s["alpha"] * g[n] for n in p}
        return loss_fn(p, xq, yq)

    batched = vmap(task_loss, in_dims=(None, 0, 0, 0, 0))
    xs, ys, xq, yq = fixed_batch(s)
    nchw = lambda a: torch.as_tensor(a, device=device).permute(0, 1, 4, 2, 3).contiguous()
    xs, xq = nchw(xs), nchw(xq)
    ys, yq = torch.as_tensor(ys, device=device), torch.as_tensor(yq, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run(n):
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            batched(params, xs, ys, xq, yq).mean().backward()
            opt.step()
        sync()
        return time.perf_counter() - t0

    return _time(run, min_time)


def main(argv: list[str] | None = None) -> int:
    import jax

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds per timed cell (default 2)")
    parser.add_argument("--out", default=os.path.join(ROOT, "scripts", "bench", "results"))
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args(argv)
    platform = jax.devices()[0].platform
    device_name = f"{jax.devices()[0].device_kind} ({platform}), JAX {jax.__version__}"
    rows = []
    for name, s in SETTINGS.items():
        row = {"setting": name, "jmaml_fixed": jmaml_fixed(s, args.min_time),
               "jmaml_loop": jmaml_training_loop(s, args.min_time)}
        if not args.no_torch:
            import torch

            row["torch_func"] = torch_fixed(s, args.min_time, "cuda" if platform == "gpu" else "cpu")
            row["torch_version"] = torch.__version__
            row["ratio_fixed"] = row["jmaml_fixed"] / row["torch_func"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    lines = [f"# Few-shot image classification: meta-steps/s (second-order MAML, Conv-4)\n\nDevice: {device_name}"
             + (f"; torch {rows[0]['torch_version']}" if "torch_version" in rows[0] else "") + ".\n",
             "| setting | jmaml, fixed batch | jmaml training loop (sampling on device) | torch.func, fixed batch | "
             "jmaml / torch.func |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        torch_cells = (f"{r['torch_func']:.1f} | {r['ratio_fixed']:.2f}x" if "torch_func" in r else "— | —")
        lines.append(f"| {r['setting']} | {r['jmaml_fixed']:.1f} | {r['jmaml_loop']:.1f} | {torch_cells} |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"images_{platform}.json"), "w", encoding="utf-8") as fh:
        json.dump({"device": device_name, "settings": SETTINGS, "rows": rows}, fh, indent=2)
    with open(os.path.join(args.out, f"images_{platform}.md"), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
