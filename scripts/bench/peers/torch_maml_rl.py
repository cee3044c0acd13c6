"""Peer: MAML-RL on 2D navigation in PyTorch with the usual Python rollout loop (learn2learn's MAML-TRPO
example and pytorch-maml-rl style): per task, a Python loop over the horizon, the Gaussian MLP policy run
on the batch of the task's episodes, each episode's gym-style environment stepped in Python (no worker
processes: their inter-process traffic would only slow it further); the inner
REINFORCE step with the linear feature baseline and ``torch.autograd.grad(create_graph=True)``, the outer
loss on the adapted policy's episodes through ProMP's per-step likelihood ratios, ``.backward()`` and Adam
(the same algorithm and batch sizes as ``jmaml.rl.maml_rl``; the outer step is Adam on both sides).
Needs torch (optional)."""

from __future__ import annotations

import time

import numpy as np


def setup(meta_batch: int = 20, episodes: int = 20, horizon: int = 100, hidden=(100, 100), inner_lr: float = 0.1,
          gamma: float = 0.99, seed: int = 0):
    """Returns ``run(n) -> seconds for n meta-steps`` and the environment steps one meta-step takes."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sizes = [2, *hidden, 2]
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    mean_net = nn.Sequential(*layers)
    log_std = nn.Parameter(torch.zeros(2))
    params = [*mean_net.parameters(), log_std]
    opt = torch.optim.Adam(params, lr=1e-2)

    def forward(p, obs):
        h = obs
        for i in range(0, len(p) - 1, 2):
            h = h @ p[i].T + p[i + 1]
            if i < len(p) - 3:
                h = torch.relu(h)
        return h

    def log_prob(p, obs, act):
        mean, ls = forward(p[:-1], obs), p[-1]
        z = (act - mean) * torch.exp(-ls)
        return (-0.5 * z ** 2 - ls - 0.5 * np.log(2 * np.pi)).sum(-1)

    class Navigation2D:
        """One environment, gym-style (pytorch-maml-rl's ``Navigation2DEnv``, stepped one at a time by a
        synchronous vector environment, as its sampler does)."""

        def __init__(self, goal):
            self.goal, self.pos = goal, np.zeros(2, np.float32)

        def reset(self):
            self.pos = np.zeros(2, np.float32)
            return self.pos.copy()

        def step(self, action):
            self.pos = self.pos + np.clip(action, -0.1, 0.1)
            return self.pos.copy(), -float(np.sqrt(np.sum((self.pos - self.goal) ** 2)))

    def rollout(p, goal):
        """The usual Python rollout loop: per step, the policy on the batch of observations, then each of the
        task's ``episodes`` environments stepped in Python."""
        envs = [Navigation2D(goal) for _ in range(episodes)]
        obs_np = np.stack([e.reset() for e in envs])
        obs_l, act_l, rew_l = [], [], []
        with torch.no_grad():
            for _ in range(horizon):
                obs = torch.from_numpy(obs_np)
                mean = forward([q.detach() for q in p[:-1]], obs)
                act = mean + torch.exp(p[-1].detach()) * torch.randn_like(mean)
                steps = [e.step(a) for e, a in zip(envs, act.numpy())]
                obs_l.append(obs)
                act_l.append(act)
                rew_l.append([r for _, r in steps])
                obs_np = np.stack([o for o, _ in steps])
        return (torch.stack(obs_l, 1), torch.stack(act_l, 1),
                torch.tensor(np.asarray(rew_l, np.float32).T.copy()))

    def advantages(obs, rewards):
        returns = torch.zeros_like(rewards)
        acc = torch.zeros(rewards.shape[0])
        for t in reversed(range(horizon)):
            acc = rewards[:, t] + gamma * acc
            returns[:, t] = acc
        t = (torch.arange(horizon, dtype=torch.float32) / 100).expand(episodes, horizon)[..., None]
        o = obs.clamp(-10, 10)
        feats = torch.cat([o, o ** 2, t, t ** 2, t ** 3, torch.ones_like(t)], -1).reshape(-1, 8)
        w = torch.linalg.solve(feats.T @ feats + 1e-5 * torch.eye(8), feats.T @ returns.reshape(-1))
        adv = returns - (feats @ w).reshape(episodes, horizon)
        return (adv - adv.mean()) / (adv.std(unbiased=False) + 1e-8)

    def meta_step():
        opt.zero_grad()
        total = 0.0
        for _ in range(meta_batch):
            goal = rng.uniform(-0.5, 0.5, 2).astype(np.float32)
            obs, act, rew = rollout(params, goal)
            adv = advantages(obs, rew)
            lp = log_prob(params, obs, act)
            inner = -(torch.exp(lp - lp.detach()) * adv).mean()
            grads = torch.autograd.grad(inner, params, create_graph=True)
            adapted = [p - inner_lr * g for p, g in zip(params, grads)]
            obs2, act2, rew2 = rollout(adapted, goal)
            adv2 = advantages(obs2, rew2)
            outer = -(log_prob(adapted, obs2, act2) * adv2).sum() / episodes
            total = total + outer / meta_batch
        total.backward()
        opt.step()

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            meta_step()
        return time.perf_counter() - t0

    return run, meta_batch * 2 * episodes * horizon
