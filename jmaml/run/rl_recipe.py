"""A meta-RL run from a handful of settings, as ``jmaml rl`` runs it: MAML and the multi-task "pretrained"
policy trained through ``jmaml.fit`` in one run folder (progress, checkpoints, bitwise resume, the
fingerprint), then evaluated as the paper reports it (``eval.json``, ``eval.md``)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import numbers
import os
from typing import Any, TextIO

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jmaml.core._checks import check_positive_finite, check_positive_int
from jmaml.core.flags import floats, ints, setting
from jmaml.engine import checkpoint
from jmaml.engine import rl_evaluation as evaluation
from jmaml.engine.evaluation import learner_curves
from jmaml.engine.runstore import checkpoints_beyond, refuse_other_kind
from jmaml.rl import envs
from jmaml.rl.learner import ESTIMATORS, maml_rl, task_distribution, trpo_optimiser
from jmaml.rl.policies import categorical_mlp, gaussian_mlp

METHODS = ("maml", "maml_best", "pretrained", "random")  # maml: the last meta-step; maml_best: best on validation
# MAML's outer step: maml_rl's outer ("promp": ProMP's, on its LVC estimator), "adam" its "gradient"
OUTER_STEPS = ("trpo", "ppo", "promp", "adam")
BASELINE_LRS = (0.01, 0.03, 0.1, 0.3, 1.0)  # the baselines' first test-time rates tried on the validation tasks
PAPER_GOAL_TOLERANCE = {"navigation2d": 0.01}  # cbfinn/maml_rl's point environment ends an episode this close
EVAL_KEY, VALIDATION_KEY = 10_000, 20_000  # + seed: the held-out test tasks and the separate validation tasks
BEST_FILE = "maml_best.npz"  # MAML's parameters at its best validation return, kept during training
CONFIG_FILE = "rl_config.json"
# the families jmaml rl trains on (locomotion: brax, the paper's half-cheetah and ant; pip install 'jmaml[brax]')
RL_ENVS = ("navigation2d", "pendulum", "cartpole", *envs.LOCOMOTION)
EVALUATION = "evaluation"  # the flags `jmaml rl eval` takes too
# The paper's settings per family where they differ from RLConfig's defaults (2D navigation's): the locomotion
# runs of Finn et al. (2017, App. A.2) and cbfinn/maml_rl's cluster_maml_trpo_{cheetah,ant}.py -- horizon 200,
# 40 tasks per meta-step, 20 episodes per step (ant forward/backward: 40), alpha 0.1, a 100-100 ReLU policy,
# TRPO with KL 0.01 (RLConfig's defaults already).
_LOCOMOTION = {"horizon": 200, "meta_batch_size": 40}
PAPER_SETTINGS: dict[str, dict[str, Any]] = {
    "halfcheetah_velocity": _LOCOMOTION, "halfcheetah_direction": _LOCOMOTION, "ant_velocity": _LOCOMOTION,
    "ant_direction": {**_LOCOMOTION, "inner_episodes": 40, "outer_episodes": 40}}


@dataclasses.dataclass(frozen=True)
class RLConfig:
    """The settings of a meta-RL run: the MAML paper's for 2D navigation by default (Finn et al. 2017, §5.3 and
    App. A.2; cbfinn/maml_rl's test protocol).

    Evaluation: ``eval_tasks`` held-out tasks, ``eval_episodes`` episodes per step, after 0..``eval_steps``
    test-time policy-gradient steps at ``eval_lr`` (the rate of step 1, 2, ...; its last entry repeats;
    default ``None``: the paper's α then α/2). MAML is scored at its last meta-step (``maml``) and at the
    meta-step with the best validation return after one step (``maml_best``, the paper's "best policy seen
    in training"), judged every ``log_every`` meta-steps on ``validation_tasks`` tasks drawn apart from the
    test tasks. The pretrained and random policies are fine-tuned with the same schedule scaled to the first
    rate in ``baseline_lrs`` that scores best on the validation tasks (the paper tuned their step sizes).
    ``goal_tolerance``: navigation2d's episodes end within that distance of the goal in each coordinate
    (``None``: the paper's 0.01 on navigation2d; 0: they never end early); pendulum has none.
    ``normalized_actions``: navigation2d's policy acts in units of its ±0.1 box (``None``: yes, as
    cbfinn/maml_rl's environment under rllab's ``normalize``); False: the action is the velocity itself
    (jmaml's earlier setting).
    """

    env: str = setting("navigation2d", "navigation2d (the MAML paper's 2D navigation), pendulum, cartpole "
                                       "(gymnax's, pole length and mass per task; pip install 'jmaml[gymnax]'), or "
                                       "the paper's locomotion: halfcheetah_velocity, halfcheetah_direction, "
                                       "ant_velocity, ant_direction (brax/MJX; pip install 'jmaml[brax]'; with the "
                                       "paper's horizon 200 and 40 tasks per meta-step unless flags say otherwise)",
                       choices=RL_ENVS)
    horizon: int = setting(100, "steps per episode (locomotion: 200)", parse=int)
    steps: int = setting(100, "meta-steps", parse=int)
    meta_batch_size: int = setting(20, "tasks per meta-step (locomotion: 40)", parse=int)
    inner_lr: float = setting(0.1, "the inner policy-gradient rate alpha", parse=float)
    inner_episodes: int = setting(20, "episodes per task, inner and outer (ant_direction: 40)", name="episodes",
                                  also=("outer_episodes",), parse=int)
    outer_episodes: int = 20
    gamma: float = setting(0.99, "discount", parse=float)
    hidden: tuple[int, ...] = setting((100, 100), "policy widths", parse=ints)
    # MAML's outer step: "trpo", "ppo" (PPO-clip) or "adam"
    outer: str = setting("trpo", "MAML's outer step: TRPO (the paper's), PPO-clip, ProMP's (PPO-clip with its inner "
                                 "KL penalty; with --estimator lvc), or Adam on the meta-gradient",
                         choices=OUTER_STEPS)
    # Adam's rate (the pretrained policy's, and MAML's with outer="adam")
    meta_lr: float = setting(0.01, "Adam's rate (the pretrained policy's; MAML's with --outer adam)", parse=float)
    estimator: str = setting("lvc", "the meta-gradient estimator (emaml: E-MAML's, the naive one plus its exploration "
                                    "term; with --outer trpo, E-MAML-TRPO)", choices=ESTIMATORS)
    seed: int = setting(0, "seed", parse=int)
    log_every: int = setting(5, "meta-steps per chunk, checkpoint and validation of the best policy", parse=int)
    pretrain: bool = setting(True, "skip the pretrained baseline", name="no_pretrain", const=False)
    eval_tasks: int = setting(40, "held-out test tasks", parse=int, group=EVALUATION)
    eval_episodes: int = setting(40, "episodes per evaluation step", parse=int, group=EVALUATION)
    eval_steps: int = setting(3, "test-time policy-gradient steps", parse=int, group=EVALUATION)
    eval_lr: tuple[float, ...] | None = setting(
        None, "test-time rates of steps 1, 2, ... (the last repeats); default: inner-lr then inner-lr/2, the "
              "paper's", parse=floats, group=EVALUATION)
    goal_tolerance: float | None = setting(
        None, "navigation2d: an episode ends this close to the goal (0: never; default: the paper's 0.01)",
        parse=float)
    normalized_actions: bool | None = setting(
        None, "navigation2d: the action is the velocity itself, not in units of the ±0.1 box (the reference "
              "environment's, rllab's normalize)", name="raw_actions", const=False)
    validation_tasks: int = setting(20, "validation tasks (the best MAML policy, the baselines' rates)", parse=int,
                                    group=EVALUATION)
    baseline_lrs: tuple[float, ...] = setting(BASELINE_LRS, "the baselines' first test-time rates tried on the "
                                                            "validation tasks", parse=floats, group=EVALUATION)

    @classmethod
    def paper(cls, env: str = "navigation2d", **settings: Any) -> RLConfig:
        """The config of a run on ``env`` with the paper's settings for that family (``PAPER_SETTINGS``: the
        locomotion runs' horizon 200, meta-batch 40, ...) where ``settings`` does not say otherwise -- what
        ``jmaml rl --env ENV`` trains. ``RLConfig(env=...)`` keeps the plain defaults."""
        if env not in RL_ENVS:
            raise ValueError(f"env must be one of {list(RL_ENVS)}, got {env!r}")
        preset = dict(PAPER_SETTINGS.get(env, {}))
        if "inner_episodes" in settings:  # --episodes sets both; an explicit one wins over the preset's
            preset.pop("outer_episodes", None)
        return cls(env=env, **{**preset, **settings})

    def validate(self) -> RLConfig:
        if self.env not in envs.ENVS or self.env == "bandit":
            raise ValueError(f"env must be one of {sorted(set(envs.ENVS) - {'bandit'})}, got {self.env!r}")
        for name in ("horizon", "steps", "meta_batch_size", "inner_episodes", "outer_episodes", "log_every",
                     "eval_tasks", "eval_episodes", "eval_steps", "validation_tasks"):
            check_positive_int(getattr(self, name), name)
        if self.eval_tasks < 2 or self.validation_tasks < 2:
            raise ValueError(f"eval_tasks and validation_tasks must be >= 2 (a confidence interval needs two), got "
                             f"{self.eval_tasks} and {self.validation_tasks}")
        for name in ("inner_lr", "meta_lr"):
            check_positive_finite(getattr(self, name), name)
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, numbers.Real) or not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be a number in (0, 1], got {self.gamma!r}")
        if not isinstance(self.hidden, tuple) or not self.hidden:
            raise ValueError(f"hidden must be a non-empty tuple of layer widths, got {self.hidden!r}")
        for width in self.hidden:
            check_positive_int(width, "hidden")
        for name in ("eval_lr", "baseline_lrs"):
            rates = getattr(self, name)
            if rates is None and name == "eval_lr":
                continue
            if not isinstance(rates, tuple) or not rates:
                raise ValueError(f"{name} must be a non-empty tuple of rates, got {rates!r}")
            for rate in rates:
                check_positive_finite(rate, name)
        if self.goal_tolerance is not None:
            tol = self.goal_tolerance
            if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not math.isfinite(tol) or tol < 0:
                raise ValueError(f"goal_tolerance must be a finite number >= 0 (0: episodes never end early), "
                                 f"got {tol!r}")
            if tol > 0 and self.env not in PAPER_GOAL_TOLERANCE:
                raise ValueError(f"goal_tolerance is navigation2d's; env {self.env!r} has no goal (got {tol!r})")
        if self.outer not in OUTER_STEPS:
            raise ValueError(f"outer must be one of {OUTER_STEPS}, got {self.outer!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
        if not isinstance(self.pretrain, bool):
            raise TypeError(f"pretrain must be True or False, got {self.pretrain!r}")
        if self.normalized_actions is not None:
            if not isinstance(self.normalized_actions, bool):
                raise TypeError(f"normalized_actions must be True, False or None, got {self.normalized_actions!r}")
            if self.env not in PAPER_GOAL_TOLERANCE:
                raise ValueError(f"normalized_actions is navigation2d's; env {self.env!r} takes its own actions")
        try:  # the outer step's own rules: ProMP is LVC's, E-MAML takes TRPO or Adam ...
            self.parts()
        except ValueError as e:
            raise ValueError(f"outer {self.outer!r} with estimator {self.estimator!r}: {e}") from None
        return self

    def eval_schedule(self) -> tuple[float, ...]:
        """MAML's test-time rate for each of the ``eval_steps`` steps (``eval_lr``, its last entry repeated)."""
        rates = self.eval_lr if self.eval_lr is not None else (self.inner_lr, self.inner_lr / 2)
        return tuple(rates[min(j, len(rates) - 1)] for j in range(self.eval_steps))

    def env_settings(self) -> dict[str, Any]:
        tol = PAPER_GOAL_TOLERANCE.get(self.env) if self.goal_tolerance is None else self.goal_tolerance
        if self.env not in PAPER_GOAL_TOLERANCE:
            return {"horizon": self.horizon}
        return {"horizon": self.horizon, "goal_tolerance": tol or None,
                "normalized_actions": self.normalized_actions is not False}

    def parts(self):
        """``(env, policy, maml learner, pretrained learner)``."""
        env = envs.ENVS[self.env](**self.env_settings())
        if env.num_actions is not None:  # discrete actions (cartpole): a softmax over them
            policy = categorical_mlp(env.observation_shape[0], env.num_actions, hidden=self.hidden)
        else:
            policy = gaussian_mlp(env.observation_shape[0], env.action_shape[0], hidden=self.hidden)
        return env, policy, self.maml(env, policy), maml_rl(env, policy, num_inner_steps=0, **self._common())

    def maml(self, env: envs.Env, policy: Any, num_inner_steps: int = 1):
        """MAML as this config trains it (its estimator and outer step), with ``num_inner_steps`` inner steps."""
        return maml_rl(env, policy, num_inner_steps=num_inner_steps, estimator=self.estimator,
                       outer="gradient" if self.outer == "adam" else self.outer, **self._common())

    def _common(self) -> dict[str, Any]:
        return dict(inner_lr=self.inner_lr, inner_episodes=self.inner_episodes, outer_episodes=self.outer_episodes,
                    gamma=self.gamma)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> RLConfig:
        """The config a run folder's ``rl_config.json`` records (lists back to tuples), checked."""
        if not isinstance(record, dict):
            raise ValueError(f"{CONFIG_FILE} must hold an object of settings, got {type(record).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ValueError(f"{CONFIG_FILE} has settings jmaml rl does not know: {unknown}")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items()}
        return cls(**values).validate()


def load_config(run_dir: str) -> RLConfig:
    """The ``RLConfig`` recorded in ``run_dir`` by ``train``."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ValueError(f"{run_dir} holds no {CONFIG_FILE}: not a jmaml rl run folder")
    with open(path, encoding="utf-8") as f:
        try:
            record = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
    return RLConfig.from_json(record)


def check_run_dir(run_dir: str) -> None:
    """Refuses (ValueError) a folder that holds another kind of run: a ``jmaml train`` or ``jmaml sweep`` run's
    files, or checkpoints and metrics without ``rl_config.json`` -- ``--overwrite`` replaces an RL run only."""
    if not os.path.isdir(run_dir):
        return
    refuse_other_kind(run_dir, "rl")
    names = set(os.listdir(run_dir))
    if CONFIG_FILE in names:
        return
    other = sorted(n for n in names if n in ("config.json", "metrics.jsonl", "sweep.json") or n.endswith(".ckpt.npz"))
    if other:
        raise ValueError(f"{run_dir} holds another kind of run ({', '.join(other)}; no {CONFIG_FILE}): "
                         "jmaml rl will not resume or overwrite it; choose another --out")


def read_best(path: str, like: Any = None) -> tuple[Any, dict[str, Any]]:
    """MAML's best-on-validation parameters in ``path`` (``maml_best.npz``) and their record: the meta-step, its
    validation return and every judged step's score."""
    header = checkpoint.read_header(path)
    info = {"step": header["step"], "validation_return": header["extra"]["validation_return"],
            "scores": dict(header["extra"]["scores"])}
    return checkpoint.restore_params(path, like), info


def returns_program(learner: Any, env: envs.Env, policy: Any, eval_episodes: int):
    """``returns(params, rates, key, num_tasks) -> (R, num_tasks, S + 1)``: the returns of ``params`` after
    0..S test-time steps (``learner.adapt``) for each schedule in ``rates`` (shape ``(R, S)``), on the same
    ``num_tasks`` held-out tasks drawn with the integer ``key``; one compiled program per shape, every schedule
    in one batch (the curves ``evaluation.returns_after_steps`` computes, vmapped over the rates)."""
    metric = evaluation.return_metric(env, policy, eval_episodes)
    heldout = task_distribution(env).heldout
    assert heldout is not None

    @functools.partial(jax.jit, static_argnums=(3,))
    def curves(params, rates, key, num_tasks):
        batch = heldout(jax.random.key(key), num_tasks)
        one = lambda r: learner_curves(learner, params, batch, metric, rates.shape[1], hyper={"inner_lr": r})
        return jax.vmap(one)(rates)

    def returns(params, rates, key, num_tasks):
        return np.asarray(curves(params, jnp.asarray(rates, dtype=jnp.float32), key, num_tasks))

    return returns


def tune_baseline_rate(config: RLConfig, returns: Any, params: Any) -> dict[str, Any]:
    """The baseline's test-time schedule: MAML's (``eval_schedule``) scaled so its first rate is the one of
    ``baseline_lrs`` with the highest mean return over steps 1..``eval_steps`` on the validation tasks."""
    schedule = np.asarray(config.eval_schedule())
    candidates = np.stack([schedule * (lr / schedule[0]) for lr in config.baseline_lrs])
    curves = returns(params, candidates, VALIDATION_KEY + config.seed, config.validation_tasks)
    scores = np.nan_to_num(curves[:, :, 1:].mean(axis=(1, 2)), nan=-np.inf)  # a diverging rate scores worst
    best = int(np.argmax(scores))
    return {"schedule": candidates[best].tolist(),
            "validation_scores": {str(lr): float(s) for lr, s in zip(config.baseline_lrs, scores)}}


class _BestKeeper:
    """``fit``'s callback for MAML: every chunk, the validation return after one test-time step; the
    parameters with the highest so far are kept in ``run_dir``/maml_best.npz (with every step's score), before
    the chunk's checkpoint is written, so a resumed run replays the same comparisons."""

    def __init__(self, config: RLConfig, returns: Any, run_dir: str | None, *, load: bool):
        self.config, self.returns = config, returns
        self.path = None if run_dir is None else os.path.join(run_dir, BEST_FILE)
        self.params: Any = None
        self.step, self.score, self.scores = 0, -np.inf, {}
        if load and self.path is not None and os.path.exists(self.path):
            self.params, info = read_best(self.path)
            self.step, self.score, self.scores = info["step"], info["validation_return"], info["scores"]

    def __call__(self, record: dict, state: Any) -> None:
        rate = self.config.eval_schedule()[0]
        returns = self.returns(state.params, [[rate]], VALIDATION_KEY + self.config.seed,
                               self.config.validation_tasks)
        score = float(np.mean(returns[0, :, 1]))
        step = int(record["step"])
        self.scores[str(step)] = score
        if math.isfinite(score) and (score > self.score or self.step == step):
            self.params, self.step, self.score = jax.tree.map(np.asarray, state.params), step, score
        if self.path is not None and self.params is not None:
            checkpoint.save(self.path, {"params": self.params}, step=self.step,
                            extra={"validation_return": self.score, "scores": self.scores})


def train(config: RLConfig, run_dir: str | None, *, resume: bool = False, overwrite: bool = False,
          stream: TextIO | None = None, progress: bool = True, stop_at_step: int | None = None) -> dict[str, Any]:
    """MAML's (at its last meta-step and at its best validation return) and, with ``pretrain``, the pretrained
    policy's parameters, each trained by ``jmaml.fit`` in ``run_dir`` (``maml_rl*.ckpt.npz``, ``maml_best.npz``,
    ``pretrained_rl.ckpt.npz``, ``metrics.jsonl``, ``rl_config.json``); ``random`` is the initialisation.
    ``resume`` continues (or returns) the runs there; it refuses a ``config`` other than the recorded one."""
    from jmaml.engine.loop import Logging, RunDir, fit

    config.validate()
    env, policy, maml, pretrained = config.parts()
    params = policy.init(jax.random.key(config.seed))
    out = {"random": params}
    if run_dir is not None:
        check_run_dir(run_dir)
        path = os.path.join(run_dir, CONFIG_FILE)
        extend = False
        if resume and os.path.exists(path) and not overwrite:
            recorded = load_config(run_dir)
            changed = [f.name for f in dataclasses.fields(config)
                       if f.name != "steps" and getattr(recorded, f.name) != getattr(config, f.name)]
            if changed:
                raise ValueError(f"{run_dir} records another run (settings differ: {', '.join(changed)}); resume "
                                 "it with its own settings (jmaml rl --out DIR --resume) or --overwrite")
            extend = recorded.steps != config.steps
            if extend:  # the rule of jmaml train: a resumed run may be lengthened, never shortened
                beyond = checkpoints_beyond(run_dir, config.steps)
                if beyond:
                    raise ValueError(f"--resume --steps {config.steps}: {run_dir} holds checkpoints at steps "
                                     f"{beyond}; a run cannot be shortened (evaluate it as it is, or use another "
                                     "--out)")
        os.makedirs(run_dir, exist_ok=True)
        if overwrite or extend or not os.path.exists(path):
            if overwrite and os.path.exists(os.path.join(run_dir, BEST_FILE)):
                os.remove(os.path.join(run_dir, BEST_FILE))
            checkpoint.atomic_write(path, lambda f: json.dump(dataclasses.asdict(config), f, indent=2), text=True)
    phases = [("maml", maml)] + ([("pretrained", pretrained)] if config.pretrain else [])
    keeper = None
    for method, learner in phases:
        optimiser = trpo_optimiser() if method == "maml" and config.outer != "adam" else optax.adam(config.meta_lr)
        exists = run_dir is not None and os.path.exists(os.path.join(run_dir, f"{learner.name}.ckpt.npz"))
        where = None if run_dir is None else RunDir(run_dir, checkpoint_every=config.log_every,
                                                    resume=resume and exists, overwrite=overwrite)
        if method == "maml":
            keeper = _BestKeeper(config, returns_program(maml, env, policy, config.eval_episodes), run_dir,
                                 load=resume and exists)
        state = fit(learner, task_distribution(env), optimiser, params, steps=config.steps,
                    meta_batch_size=config.meta_batch_size, key=jax.random.fold_in(jax.random.key(config.seed), 1),
                    run=where, log=Logging(every=config.log_every, progress=progress, stream=stream,
                                           callback=keeper if method == "maml" else None),
                    stop_at_step=stop_at_step)
        out[method] = state.params
        if method == "maml" and keeper is not None:
            if keeper.params is None:  # no chunk ran: a finished run resumed without its best file
                keeper(dict(step=config.steps), state)
            out["maml_best"] = jax.tree.map(jnp.asarray, keeper.params)
            out["_best"] = {"step": keeper.step, "validation_return": keeper.score, "scores": keeper.scores}
    return out


def evaluate(config: RLConfig, trained: dict[str, Any], run_dir: str | None = None, *,
             name: str = "eval") -> dict:
    """Returns after 0..``eval_steps`` steps on ``eval_tasks`` held-out tasks for every trained policy (mean,
    95% CI; per task), the baselines at their validation-tuned rates; written to ``run_dir``/``name``.json and
    ``name``.md when given."""
    env, policy, maml, _ = config.parts()
    results = {}
    schedule = list(config.eval_schedule())
    returns_of = returns_program(maml, env, policy, config.eval_episodes)
    for method in METHODS:
        if method not in trained:
            continue
        params = trained[method]
        tuned = None
        if method in ("pretrained", "random"):
            tuned = tune_baseline_rate(config, returns_of, params)
        rates = tuned["schedule"] if tuned else schedule
        returns = returns_of(params, [rates], EVAL_KEY + config.seed, config.eval_tasks)[0]
        results[method] = {**evaluation.summarize(returns), "per_task": returns.tolist(), "test_lr": rates,
                           **({"validation_scores": tuned["validation_scores"]} if tuned else {})}
    if "_best" in trained and "maml_best" in results:
        results["maml_best"]["best"] = trained["_best"]
    if run_dir is not None:
        with open(os.path.join(run_dir, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump({"config": dataclasses.asdict(config), "results": results}, f, indent=2)
        with open(os.path.join(run_dir, f"{name}.md"), "w", encoding="utf-8") as f:
            f.write(format_table(config.env, results) + "\n")
    return results




def sweep(config: RLConfig, grid: Any, run_dir: str | None = None, *, task_seed: int = 0, resume: bool = False,
          overwrite: bool = False, checkpoint_every: int | None = None, progress: bool = False,
          stream: TextIO | None = None, log: Any = None) -> dict[str, Any]:
    """MAML-RL over a grid (``jmaml.sweep.Grid``: inner rates α, meta rates β, inner steps k, seeds of the
    initial policy), every point a whole run of ``config``'s MAML (its environment, policy, estimator and
    outer step) trained as one population per k on the same tasks (``task_seed``), then scored by the
    paper's protocol at its own α: the return after 0..``eval_steps`` test-time steps (rates α, α/2, ...
    as ``eval_schedule``, or ``eval_lr`` scaled to the point's α) on ``eval_tasks`` held-out tasks.

    The outer step TRPO (and PPO) returns its update itself and has no meta rate: the grid then takes one β,
    which it ignores. ``config``'s ``inner_lr``, ``meta_lr`` and ``seed`` are the grid's; the pretrained
    baseline and the best-on-validation policy are single runs' (``train``). ``run_dir``, ``resume``,
    ``overwrite``, ``checkpoint_every`` (default: every ``log_every``): the sweep as a run, as
    ``jmaml.sweep.sweep_learner``'s, which writes the same files (``sweep.csv``, ``sweep.md``, heatmaps of
    the return). Returns ``sweep_learner``'s result."""
    from jmaml.run.sweep import sweep_learner

    config.validate()
    grid.validate()
    env, policy, _, _ = config.parts()
    schedule = config.eval_schedule()

    return sweep_learner(
        lambda k: config.maml(env, policy, k), task_distribution(env), optax.adam, policy.init, grid,
        steps=config.steps, meta_batch_size=config.meta_batch_size,
        task_key=jax.random.fold_in(jax.random.key(task_seed), 1),
        log_every=config.log_every, checkpoint_every=config.log_every if checkpoint_every is None else checkpoint_every,
        metric=evaluation.return_metric(env, policy, config.eval_episodes), eval_tasks=config.eval_tasks,
        eval_steps=config.eval_steps, eval_key=EVAL_KEY + task_seed,
        eval_lr=lambda alpha: [r * alpha / schedule[0] for r in schedule], run_dir=run_dir, resume=resume,
        overwrite=overwrite, progress=progress, stream=stream, log=log)


def load_trained(config: RLConfig, run_dir: str) -> dict[str, Any]:
    """The policies a finished ``train`` left in ``run_dir``, for ``evaluate`` (``jmaml rl eval``)."""
    env, policy, maml, pretrained = config.parts()
    like = policy.init(jax.random.key(config.seed))
    out: dict[str, Any] = {"random": like}
    for method, learner in (("maml", maml), ("pretrained", pretrained)):
        path = os.path.join(run_dir, f"{learner.name}.ckpt.npz")
        if method == "pretrained" and not config.pretrain:
            continue
        if not os.path.exists(path):
            raise ValueError(f"{run_dir} holds no {learner.name}.ckpt.npz: train the run first (jmaml rl --out "
                             f"{run_dir} --resume)")
        step = checkpoint.read_header(path)["step"]
        if step != config.steps:
            raise ValueError(f"{path} is at step {step} of {config.steps}: finish the run first (jmaml rl --out "
                             f"{run_dir} --resume)")
        out[method] = checkpoint.restore_params(path, like)
    best = os.path.join(run_dir, BEST_FILE)
    if os.path.exists(best):
        out["maml_best"], out["_best"] = read_best(best, like)
    return out


def format_table(env_name: str, results: dict) -> str:
    """A Markdown table: average return (± 95% CI) after each number of policy-gradient steps."""
    methods = [m for m in METHODS if m in results]
    steps = len(results[methods[0]]["mean"])
    lines = [f"| {env_name} | " + " | ".join(f"after {s} step{'s' if s != 1 else ''}" for s in range(steps)) + " |",
             "|" + " --- |" * (steps + 1)]
    for method in methods:
        r = results[method]
        lines.append(f"| {method} | " + " | ".join(f"{m:.2f} ± {c:.2f}" for m, c in zip(r["mean"], r["ci95"])) + " |")
    return "\n".join(lines)
