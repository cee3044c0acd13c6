"""The ``jmaml`` command: argument parsing only; the work is done by the library."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from jmaml import learners, tasks
from jmaml.core import flags
from jmaml.core._checks import check_positive_int, check_seed
from jmaml.run import walkthrough

DEFAULT_RUN_DIR = os.path.join("runs", "sinusoid")
MAX_SWEEP_SEEDS = 1000  # jmaml sweep --seeds: initial-parameter seeds 0..N-1 per grid point


def _cmd_seed(args: argparse.Namespace) -> int:
    tasks = conventional = None
    if args.tasks is not None:
        tasks, conventional = walkthrough.load_tasks_json(args.tasks)
    result = walkthrough.run_walkthrough(alpha=args.alpha, beta=args.beta, theta0=args.theta0,
                                         k_max=args.k, tasks=tasks, conventional=conventional)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(walkthrough.format_walkthrough(result))
        if args.tasks is None:
            print("\nNote: the seed's prose quotes -295.32 for this meta-step; its own Eq. 20 "
                  "gives -1515.48, the value reproduced above.")
    return 0


_ints, _floats = flags.ints, flags.floats


def _algo_option_dest(name: str) -> str:
    return f"algo_option_{name}"


def _given_algo_options(args: argparse.Namespace) -> dict:
    """The algorithm options given on the command line (flags made from each learner's OPTIONS)."""
    return {name: getattr(args, _algo_option_dest(name)) for name in learners.all_options()
            if getattr(args, _algo_option_dest(name), None) is not None}


def _train_config(args: argparse.Namespace):
    from jmaml.run.train import TrainConfig, image_preset, load_config

    given = flags.given(args, TrainConfig)
    options = _given_algo_options(args)
    base = TrainConfig()
    if args.resume and os.path.exists(os.path.join(args.out, "config.json")):
        base = load_config(args.out)  # resume with the stored settings unless flags say otherwise
        if options:
            given["algo_options"] = {**base.options, **options}
    elif tasks.family(given.get("task", base.task)).preset is not None:
        # the paper's settings for the task, where no flag says otherwise; 1-shot unless --shots
        shots = given.get("num_support", 1)
        preset = image_preset(given["task"], given.get("ways", base.ways), shots)
        base = dataclasses.replace(base, num_support=shots, **preset)
        given = {k: v for k, v in given.items() if k != "num_support"}
    if options and "algo_options" not in given:
        given["algo_options"] = options
    config = dataclasses.replace(base, **given)
    for name in ("steps", "log_every", "checkpoint_every"):  # before they are divided by
        check_positive_int(getattr(config, name), "--" + name.replace("_", "-"))
    if "steps" in given and "checkpoint_every" not in given and not args.resume:
        # Short runs checkpoint at least at the end; keep the interval a multiple of log_every.
        every = min(config.checkpoint_every, config.steps)
        config = dataclasses.replace(config, checkpoint_every=max(config.log_every,
                                                                  every - every % config.log_every))
    if "steps" in given and "log_every" not in given and config.steps < config.log_every and not args.resume:
        config = dataclasses.replace(config, log_every=config.steps, checkpoint_every=config.steps)
    return config.validate()


def _mesh(args: argparse.Namespace):
    """The task-axis mesh: --devices N, or every device when there are several; None for one."""
    import jax

    from jmaml.engine import distributed

    if args.devices is None and jax.device_count() == 1:
        return None
    return distributed.task_mesh(args.devices)


def _cmd_train(args: argparse.Namespace) -> int:
    from jmaml.engine._signals import StopFlag

    # installed before JAX is imported: SIGINT/SIGTERM at any moment from here on stop the run with a
    # checkpoint where there is something to save, and the exit status says which signal it was
    early = getattr(args, "early_flag", None)
    with contextlib.nullcontext(early) if early is not None else StopFlag() as flag:
        code = _train_and_report(args, flag)
    if code == 0 and flag.signum is not None:  # a signal during evaluation or plotting, after the run ended
        print(f"jmaml train: {signal.Signals(flag.signum).name} received after training; stopped", file=sys.stderr)
        return 128 + flag.signum
    return code


def _train_and_report(args: argparse.Namespace, flag) -> int:
    from jmaml.engine import distributed

    if args.distributed:  # before any other JAX work
        distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               timeout_s=args.dist_timeout, heartbeat_timeout_s=args.dist_timeout)
        flag.reinstall()  # JAX's runtime took SIGTERM for its preemption notice
        if os.environ.get(_JOINED_ENV):  # tell the supervisor that every process arrived
            with open(os.environ[_JOINED_ENV], "w", encoding="utf-8") as f:
                f.write("joined")
    elif any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
        raise ValueError("--coordinator, --num-processes and --process-id need --distributed")
    from jmaml.run import runs, train

    recipe = runs.RECIPES["supervised"]
    config = _train_config(args)
    mesh = _mesh(args)
    writers = []
    if args.tensorboard is not None:
        from jmaml.engine.writers import TensorBoardWriter

        writers.append(TensorBoardWriter(args.tensorboard or os.path.join(args.out, "tensorboard")))
    t0 = time.perf_counter()
    try:
        recipe.train(config, args.out, resume=args.resume, overwrite=args.overwrite, mesh=mesh,
                    allow=tuple(name for name, on in (("changed-data", args.allow_changed_data),
                                                      ("changed-settings", args.allow_changed_settings)) if on),
                    writers=writers)
    except distributed.DistributedError as e:
        print(f"jmaml train: distributed run failed: {e}", file=sys.stderr)
        return 4
    except train.Interrupted as e:
        print(f"jmaml train: {e}. Resume with: jmaml train --out {args.out} --resume", file=sys.stderr)
        return 128 + (e.signum or signal.SIGINT)
    except train.DivergenceError as e:
        print(f"jmaml train: {e}", file=sys.stderr)
        return 3
    finally:
        # tensorboardX writes events from a background thread: only close() waits for its queue to drain
        for w in writers:
            w.close()
    train_s = time.perf_counter() - t0
    if not distributed.is_writer():
        return 0  # process 0 reports, evaluates and plots
    devices = f" on {mesh.devices.size} devices" if mesh is not None else ""
    print(f"trained in {train_s:.1f} s{devices}; run dir: {args.out}", file=sys.stderr)
    if args.no_eval:
        return 0
    if _up_to_date(args.out, ["eval.json"], [f"{p}.ckpt.npz" for p in config.phases()]):
        print(f"{args.out} is already trained and evaluated; showing its results "
              "(jmaml eval / jmaml plot recompute them).", file=sys.stderr)
        results = _read_json(os.path.join(args.out, "eval.json"))
    else:
        results = None
    if results is None:  # not evaluated yet, or an eval.json left truncated by an older version
        results = recipe.evaluate(config, args.out)
    print(recipe.format_table(config, results))
    if not args.no_plot and not _up_to_date(args.out, ["plots/curves.png"], ["eval.json"]):
        _plot(args.out)
    return 0


def _read_json(path: str):
    """A JSON file's content, or None if it is unreadable or not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _up_to_date(run_dir: str, outputs: list[str], inputs: list[str]) -> bool:
    """Whether every output exists and is newer than every existing input."""
    outs = [os.path.join(run_dir, o) for o in outputs]
    ins = [os.path.join(run_dir, i) for i in inputs if os.path.exists(os.path.join(run_dir, i))]
    if not all(os.path.exists(o) for o in outs):
        return False
    return min(os.path.getmtime(o) for o in outs) >= max((os.path.getmtime(i) for i in ins), default=0.0)


def _plot(run_dir: str) -> None:
    from jmaml.run import plot

    try:
        paths = plot.plot_run(run_dir)
    except ImportError as e:
        print(f"jmaml: skipping plots: {e}", file=sys.stderr)
        return
    print("plots: " + ", ".join(paths))


def _cmd_eval(args: argparse.Namespace) -> int:
    from jmaml.run import evaluate

    results = evaluate.evaluate_run(args.run_dir)
    print(json.dumps(results, indent=2) if args.json else evaluate.format_table(results))
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from jmaml.run import plot

    for path in plot.plot_run(args.run_dir):
        print(path)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from jmaml.run import runinfo

    info = runinfo.inspect_run(args.run_dir)
    print(json.dumps(info, indent=2) if args.json else runinfo.format_inspection(info))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:
    from jmaml.engine._signals import StopFlag

    # as train: a signal at any moment from start-up on stops the sweep with every population checkpointed
    early = getattr(args, "early_flag", None)
    with contextlib.nullcontext(early) if early is not None else StopFlag() as flag:
        return _sweep_and_report(args, flag)


SWEEP_ARGS_FILE = "sweep-args.json"
_SWEEP_DEFAULTS: dict = {"algo": "maml", "task": "sinusoid", "data_dir": None, "ways": None,
                         "num_train_classes": None, "alpha": (0.001, 0.01, 0.1),
                         "beta": (1e-4, 1e-3, 1e-2), "k": (1,), "seeds": 1, "task_seed": 0, "steps": 10_000,
                         "meta_batch_size": 25, "shots": None, "query_shots": None, "hidden": (40, 40),
                         "activation": "relu", "optimiser": "adam", "remat": False,
                         "log_every": 1000, "checkpoint_every": None}
# an RL sweep (--task navigation2d | pendulum): jmaml rl's settings, None meaning RLConfig's default
_RL_SWEEP_FLAGS = ("horizon", "episodes", "gamma", "outer", "estimator", "eval_tasks", "eval_episodes", "eval_steps",
                   "eval_lr", "goal_tolerance")
_SWEEP_DEFAULTS.update({name: None for name in (*_RL_SWEEP_FLAGS, "raw_actions")})
_SUPERVISED_SWEEP_FLAGS = ("data_dir", "ways", "num_train_classes", "shots", "query_shots", "activation", "optimiser",
                           "remat")


def _json_value(value):
    return json.loads(json.dumps(value))


def _sweep_settings(args: argparse.Namespace) -> dict:
    """jmaml sweep's flags as given (and the algorithm options); on --resume the recorded ones
    (SWEEP_ARGS_FILE), refusing a flag that contradicts them by name."""
    given = {name: getattr(args, name) for name in _SWEEP_DEFAULTS if getattr(args, name, None) is not None}
    given["algo_options"] = _given_algo_options(args)
    given = _json_value(given)
    path = os.path.join(args.out, SWEEP_ARGS_FILE)
    if not (args.resume and not args.overwrite and os.path.exists(path)):
        return given
    recorded = _read_json(path)
    if not isinstance(recorded, dict):
        raise ValueError(f"--resume: {path} is not a sweep record jmaml wrote")
    flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731
    conflicts = [f"{flag(n)} {v!r} (recorded {recorded.get(n, _json_value(_SWEEP_DEFAULTS[n]))!r})"
                 for n, v in given.items() if n != "algo_options"
                 and v != recorded.get(n, _json_value(_SWEEP_DEFAULTS[n]))]
    old_options = recorded.get("algo_options", {})
    conflicts += [f"{flag(n)} {v!r} (recorded {old_options.get(n)!r})" for n, v in given["algo_options"].items()
                  if old_options.get(n) != v]
    if conflicts:
        raise ValueError(f"--resume continues the sweep recorded in {path}; these flags contradict it: "
                         f"{'; '.join(conflicts)}. Drop them, or start over with --overwrite")
    return recorded


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _sweep_and_report(args: argparse.Namespace, flag) -> int:
    from jmaml.run import sweep
    from jmaml.run.config import TrainConfig
    from jmaml.run.train import image_preset

    if args.resume and args.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: pick one")
    given = _sweep_settings(args)
    a = argparse.Namespace(**{**_SWEEP_DEFAULTS, **given})
    if not 1 <= a.seeds <= MAX_SWEEP_SEEDS:
        raise ValueError(f"--seeds must be between 1 and {MAX_SWEEP_SEEDS} (seeds 0..N-1 of the initial "
                         f"parameters), got {a.seeds}")
    check_seed(a.task_seed, "--task-seed")
    from jmaml.run import runs

    if runs.for_task(a.task).name == "rl":
        return _rl_sweep(args, given)
    rl_only = [_flag(n) for n in (*_RL_SWEEP_FLAGS, "raw_actions") if n in given]
    if rl_only:
        raise ValueError(f"{', '.join(rl_only)}: meta-RL settings (--task {', '.join(runs.RECIPES['rl'].tasks)}); "
                         f"--task {a.task} "
                         "takes none")
    for name in ("steps", "log_every"):  # the same words as `jmaml train`'s
        check_positive_int(getattr(a, name), _flag(name))
    algo, options = learners.specialised(a.algo, given.get("algo_options") or {})
    log_every = min(a.log_every, a.steps)
    every = _checkpoint_every(a.checkpoint_every, log_every)
    grid = sweep.Grid(tuple(a.alpha), tuple(a.beta), tuple(a.k), tuple(range(a.seeds)))
    fields: dict = {}
    if tasks.family(a.task).preset is not None:  # the paper's settings for an image family, 1-shot unless --shots
        ways = a.ways or TrainConfig().ways
        fields.update(image_preset(a.task, ways, a.shots or 1), num_support=a.shots or 1, ways=ways)
        if a.num_train_classes is not None:
            fields["num_train_classes"] = a.num_train_classes
    else:
        fields.update(num_support=a.shots or 10, hidden=tuple(a.hidden), activation=a.activation)
    for name, field in (("query_shots", "num_query"), ("meta_batch_size", "meta_batch_size"),
                        ("optimiser", "optimiser")):
        if name in given or field not in fields:
            fields[field] = getattr(a, name) if getattr(a, name) is not None else getattr(TrainConfig(), field)
    if "hidden" in given:
        fields["hidden"] = tuple(a.hidden)
    base = TrainConfig(**{**fields, "task": a.task, "data_dir": a.data_dir, "steps": a.steps,
                          "algo": algo, "remat": bool(a.remat),
                          "num_inner_steps": max(grid.ks), "log_every": log_every,
                          "checkpoint_every": min(every, a.steps), "pretrain": False,
                          "algo_options": options or ()})
    _open_sweep_out(args, given)

    def run():
        return runs.RECIPES["supervised"].sweep(
            base, grid, run_dir=args.out, task_seed=a.task_seed, mesh=_mesh(args), shard=args.shard,
            resume=args.resume, overwrite=args.overwrite, log=lambda m: print(m, file=sys.stderr, flush=True),
            on_chunk=lambda rows: sweep.write_rows(rows, args.out))  # partial results

    return _report_sweep(args, run, a.steps)


def _checkpoint_every(checkpoint_every: int | None, log_every: int) -> int:
    every = log_every if checkpoint_every is None else checkpoint_every
    if not isinstance(every, int) or every < 1 or every % log_every:
        raise ValueError(f"--checkpoint-every must be a positive multiple of --log-every ({log_every}), got {every!r}")
    return every


def _open_sweep_out(args: argparse.Namespace, given: dict) -> None:
    """--out for a sweep: refuses a finished or unfinished sweep there without --resume/--overwrite, checks it
    is writable, and on a new start records the flags (SWEEP_ARGS_FILE), which --resume continues."""
    from jmaml.engine.runstore import atomic_write_text, refuse_other_kind
    from jmaml.run import sweep

    refuse_other_kind(args.out, "sweep")
    started = os.path.isdir(args.out) and any(n.endswith(".ckpt.npz") or n == sweep.PLAN_FILE
                                              for n in os.listdir(args.out))
    if not (args.resume or args.overwrite):
        if os.path.exists(os.path.join(args.out, "sweep.json")):
            raise ValueError(f"{args.out} already holds a sweep; use --overwrite or another --out")
        if started:
            raise ValueError(f"{args.out} holds a sweep that did not finish: continue it with --resume, or start "
                             "again with --overwrite")
    _check_writable(args.out, "--out")  # before the sweep runs, not after
    if not args.resume:  # the sweep's record: --resume continues exactly this
        atomic_write_text(os.path.join(args.out, SWEEP_ARGS_FILE), json.dumps(given, indent=1) + "\n")


def _report_sweep(args: argparse.Namespace, run, steps: int) -> int:
    """Runs the sweep (``run()``), writes its results and prints its table."""
    from jmaml.engine import loop as engine
    from jmaml.run import sweep

    try:
        result = run()
    except engine.Interrupted as e:
        print(f"jmaml sweep: {e}. Resume with: jmaml sweep --out {args.out} --resume",
              file=sys.stderr)
        return 128 + (e.signum or signal.SIGINT)
    paths = sweep.write_results(result, args.out)
    meta = result["meta"]
    print(sweep.format_rows(result["rows"], meta.get("metric") or "MSE"))
    groups = (f" ({meta['num_chunks']} population(s) of up to {meta['points_per_chunk']} points)"
              if "num_chunks" in meta else "")
    print(f"\n{meta['num_points']} runs of {steps} steps in {meta['seconds']:.1f} s{groups}; wrote "
          + ", ".join(paths))
    return 0


def _rl_sweep(args: argparse.Namespace, given: dict) -> int:
    """``jmaml sweep --task navigation2d|pendulum``: MAML-RL over the grid (``jmaml.rl.recipe.sweep``), with
    jmaml rl's settings (its flags, its defaults)."""
    from jmaml.run import rl_recipe, runs, sweep

    recipe = runs.RECIPES["rl"]
    supervised = [_flag(n) for n in _SUPERVISED_SWEEP_FLAGS if n in given]
    supervised += [_flag(n) for n in given.get("algo_options") or {}]
    if given.get("algo", "maml") != "maml":
        supervised.append(f"--algo {given['algo']}")
    if supervised:
        raise ValueError(f"{', '.join(supervised)}: not a setting of a meta-RL sweep (--task {given['task']} runs "
                         "MAML-RL: its estimator and outer step are --estimator and --outer)")
    d = rl_recipe.RLConfig.paper(given["task"])
    names = ("steps", "meta_batch_size", "log_every", *_RL_SWEEP_FLAGS, "hidden")
    from_flags = _rl_given(argparse.Namespace(**given), names)
    fields = {"env": given["task"], "pretrain": False,
              **{field: tuple(v) if isinstance(v, list) else v for field, v in from_flags.items()}}  # JSON lists back
    if given.get("raw_actions") is not None:  # recorded True by sweeps of before the flags came from RLConfig
        fields["normalized_actions"] = False
    steps = fields.get("steps", d.steps)
    if isinstance(steps, int) and not isinstance(steps, bool):
        fields["log_every"] = min(fields.get("log_every", d.log_every), steps)
    alphas = tuple(given.get("alpha") or (d.inner_lr,))
    betas = tuple(given.get("beta") or (d.meta_lr,))
    fields.update(inner_lr=alphas[0], meta_lr=betas[0])
    config = dataclasses.replace(d, **fields).validate()
    every = _checkpoint_every(given.get("checkpoint_every"), config.log_every)
    grid = sweep.Grid(alphas, betas, tuple(given.get("k") or (1,)), tuple(range(given.get("seeds", 1))))
    _open_sweep_out(args, given)
    return _report_sweep(args, lambda: recipe.sweep(
        config, grid, run_dir=args.out, task_seed=given.get("task_seed", 0), resume=args.resume,
        overwrite=args.overwrite, checkpoint_every=min(every, config.steps),
        log=lambda m: print(m, file=sys.stderr, flush=True)),
        config.steps)


def _check_writable(folder: str, flag: str) -> None:
    """Creates ``folder`` and writes a probe file in it, or raises ValueError naming the flag and the OS error."""
    probe = os.path.join(folder, f".jmaml-probe-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag} {folder} is not a writable folder: {e.strerror or e}") from None


def _add_sweep_parser(sub) -> None:
    from jmaml import learners

    p = sub.add_parser("sweep", help="meta-train a whole alpha x beta x k x seed grid as one compiled program",
                       description="Every grid point is a full run of the learner (MAML by default) on the task "
                                   "family; points train together (vmapped) on the same tasks, checkpointed in "
                                   "--out (--resume continues an interrupted sweep), then are evaluated on "
                                   "held-out tasks.")
    p.add_argument("--algo", choices=learners.names(), default=None, help="the learner (default maml)")
    from jmaml.run import runs

    p.add_argument("--task", choices=runs.all_tasks(), default=None,
                   help="the task family (default sinusoid; image families take the paper's settings, 1-shot "
                        "unless --shots; navigation2d and pendulum sweep MAML-RL with jmaml rl's settings)")
    p.add_argument("--alpha", type=_floats, default=None, help="inner rates (default 0.001,0.01,0.1)")
    p.add_argument("--beta", type=_floats, default=None, help="meta rates (default 1e-4,1e-3,1e-2)")
    p.add_argument("--k", type=_ints, default=None, help="inner steps (default 1)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 for the initial parameters (default 1)")
    p.add_argument("--task-seed", type=int, default=None,
                   help="the training tasks shared by every point (default 0)")
    from jmaml.run.config import TrainConfig

    # TrainConfig's flags, at the sweep's defaults (shorter runs; the paper's preset for image tasks)
    flags.add_flags(p, TrainConfig, ("data_dir", "ways", "num_train_classes", "steps", "meta_batch_size", "shots",
                                     "query_shots", "hidden", "activation", "optimiser", "remat", "log_every",
                                     "checkpoint_every"),
                    defaults={"steps": _SWEEP_DEFAULTS["steps"], "log_every": _SWEEP_DEFAULTS["log_every"],
                              "checkpoint_every": "every chunk, so a kill loses at most one chunk of a population"})
    _add_algo_option_flags(p.add_argument_group("algorithm (each learner's own settings apply to it only)"))
    rl = p.add_argument_group("meta-RL (--task navigation2d or pendulum: jmaml rl's settings and defaults; "
                              "--alpha, --beta default to its --inner-lr, --meta-lr, and the evaluation's rates "
                              "are scaled to each point's alpha)")
    _add_rl_flags(rl, (*_RL_SWEEP_FLAGS, "raw_actions"))
    p.add_argument("--out", default=os.path.join("runs", "sweep"), help="output dir (default runs/sweep)")
    p.add_argument("--devices", type=int, default=None,
                   help="spread the sweep over the first N devices (default: all, when there are several)")
    p.add_argument("--shard", choices=("grid", "tasks"), default="grid",
                   help="with several devices: split the grid points (default) or each meta-batch's tasks")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out that holds a sweep")
    p.add_argument("--resume", action="store_true",
                   help=f"continue the sweep in --out as recorded ({SWEEP_ARGS_FILE}) where it stopped (bitwise); "
                        "a flag that contradicts the record is refused")
    p.set_defaults(func=_cmd_sweep)


def _add_train_parser(sub) -> None:
    p = sub.add_parser("train", help="meta-train on sinusoid regression (the MAML paper's setting) or a few-shot "
                                     "image benchmark, then evaluate and plot",
                       description="Sinusoid few-shot regression, Finn et al. 2017 Section 5.1. "
                                   "Defaults are the paper's settings.")
    from jmaml.run.config import ALGORITHM, MAML, MODEL, RUN, TrainConfig

    groups = {MODEL: p.add_argument_group("model and task"), MAML: p.add_argument_group("MAML"),
              ALGORITHM: p.add_argument_group("algorithm (the MAML family; each one's own settings apply to it "
                                              "only)"),
              RUN: p.add_argument_group("run")}
    flags.add_flags(p, TrainConfig, groups=groups)  # every flag from TrainConfig's fields
    _add_algo_option_flags(groups[ALGORITHM])
    g = groups[RUN]
    g.add_argument("--out", default=DEFAULT_RUN_DIR, help=f"run dir (default {DEFAULT_RUN_DIR})")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace a different run in --out")
    g.add_argument("--allow-changed-data", action="store_true",
                   help="--resume although the dataset's files changed since the checkpoint (refused otherwise)")
    g.add_argument("--allow-changed-settings", action="store_true",
                   help="--resume this run's state with other settings on purpose (e.g. a smaller rate after a "
                        "divergence stop); config.json records the change")
    g.add_argument("--no-eval", action="store_true", help="skip evaluation and plots")
    g.add_argument("--tensorboard", nargs="?", const="", default=None, metavar="DIR",
                   help="also log every metric to TensorBoard event files in DIR (default OUT/tensorboard); "
                        "needs pip install 'jmaml[tensorboard]'")
    g = p.add_argument_group("scale-out (the task axis sharded over devices and processes; see README)")
    g.add_argument("--devices", type=int, default=None,
                   help="shard each meta-batch over the first N devices (default: all, when there are several)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process job via jax.distributed (one process per host or GPU)")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address (default: JAX_COORDINATOR_ADDRESS or what JAX detects, e.g. SLURM)")
    g.add_argument("--num-processes", type=int, default=None, help="processes in the job (default: detected)")
    g.add_argument("--process-id", type=int, default=None, help="this process's id, 0..N-1 (default: detected)")
    g.add_argument("--dist-timeout", type=int, default=60,
                   help="seconds to wait for the coordinator and the other processes, and for a silent "
                        "process before the others stop (default 60)")
    g.add_argument("--no-plot", action="store_true", help="skip plots")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("eval", help="adaptation curves of a run on 600 held-out tasks (table + eval.json)")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print the JSON instead of the table")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="write a run's figures (fits.png, curves.png) into RUN_DIR/plots")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("inspect", help="what a run dir holds: config, checkpoints (step, every array's key "
                                       "path and shape), last metrics",
                       description="Lists a run dir's contents without running anything. Works on run dirs "
                                   "of `jmaml train` and of jmaml.fit.")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_inspect)


def _add_algo_option_flags(group) -> None:
    """One flag per learner option, from the learners' own OPTIONS (``--imaml-lambda``, ...)."""
    for name, option in learners.all_options().items():
        who = ", ".join(learners.spec(n).label for n in learners.owners(name))
        flag = "--" + name.replace("_", "-")
        if option.type is bool:
            negatives = ["--no-" + name.replace("_", "-")]
            owner = learners.owners(name)[0]
            if name.startswith(owner + "_"):  # --mamlpp-no-msl reads better than --no-mamlpp-msl
                negatives.insert(0, f"--{owner}-no-" + name[len(owner) + 1:].replace("_", "-"))
            group.add_argument(flag, dest=_algo_option_dest(name), action="store_const", const=True, default=None,
                               help=f"{who}: {option.help}" + (" (default)" if option.default else ""))
            group.add_argument(*negatives, dest=_algo_option_dest(name), action="store_const", const=False,
                               default=None, help=f"{who}: the opposite of {flag}")
        else:
            group.add_argument(flag, dest=_algo_option_dest(name), type=option.type, default=None,
                               metavar=name.split("_")[-1].upper(), help=f"{who}: {option.help}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jmaml", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Meta-learning with MAML and its family (FOMAML, Reptile, Meta-SGD, ANIL, MAML++, iMAML, "
                    "CAVIA) in JAX:\nmeta-train on sinusoid regression or few-shot image benchmarks, evaluate, "
                    "plot, sweep rates,\nand inspect runs. `jmaml COMMAND --help` lists a command's options.",
        epilog="examples:\n"
               "  jmaml seed                                   the single-neuron worked example, checked\n"
               "  jmaml train                                  the MAML paper's sinusoid run into runs/sinusoid\n"
               "  jmaml train --algo reptile --out runs/rep    another algorithm\n"
               "  jmaml train --task cifarfs --data-dir DATA --backbone resnet12 --out runs/cfs\n"
               "  jmaml train --out runs/sinusoid --resume     continue an interrupted run\n"
               "  jmaml eval runs/sinusoid                     adaptation curves on 600 held-out tasks\n"
               "  jmaml inspect runs/sinusoid                  what a run dir holds\n"
               "  jmaml sweep --alpha 0.001,0.01 --beta 0.001,0.003 --out runs/sweep\n"
               "  jmaml rl --env navigation2d --out runs/nav  meta-RL: MAML-TRPO on 2D navigation\n"
               "\nLibrary use, your own model, tasks and algorithm: see README.md and the API reference\n"
               "(bash scripts/docs.sh).")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("seed", help="the seed document's single-neuron MAML walk-through",
                       description="Reproduces the seed's worked example (float64) with the "
                                   "library and checks it against the closed forms.")
    p.add_argument("--alpha", type=float, default=0.1, help="inner rate alpha (default 0.1)")
    p.add_argument("--beta", type=float, default=0.5, help="meta rate beta (default 0.5)")
    p.add_argument("--theta0", type=float, default=1.0, help="initial theta (default 1)")
    p.add_argument("--k", type=int, default=5, help="rows k = 1..K of the dW/dtheta table (default 5)")
    p.add_argument("--tasks", metavar="FILE", default=None,
                   help='JSON file of your own tasks: {"tasks": [{"support": {"x": [...], '
                        '"y": [...]}, "query": {"x": [...], "y": [...]}}, ...], '
                        '"conventional": {"x": [...], "y": [...]} (optional)}')
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_seed)
    _add_train_parser(sub)
    _add_sweep_parser(sub)
    _add_rl_parser(sub)
    return parser


def _add_rl_flags(p, names=None) -> list[str]:
    """RLConfig's flags (``names``; default all) on ``p``: its fields declare them (``jmaml.flags``)."""
    from jmaml.run.rl_recipe import RLConfig

    return flags.add_flags(p, RLConfig, names)


def _add_rl_parser(sub) -> None:
    p = sub.add_parser("rl", help="meta-reinforcement learning: MAML with a policy-gradient inner loop on 2D "
                                  "navigation (the MAML paper's) or Pendulum with varied physics",
                       description="Trains MAML (and the multi-task pretrained policy) through jmaml.fit in --out "
                                   "(progress, checkpoints, --resume bitwise), keeping MAML's best policy on "
                                   "validation tasks, then evaluates the return after 0-3 policy-gradient steps on "
                                   "held-out tasks by the paper's protocol (eval.json, eval.md). "
                                   "jmaml rl eval RUN_DIR re-scores a finished run.")
    p.add_argument("--out", default="runs/rl", help="run folder (default runs/rl)")
    _add_rl_flags(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its recorded settings (rl_config.json)")
    p.add_argument("--overwrite", action="store_true", help="start over in --out")
    p.add_argument("--no-eval", action="store_true")
    p.set_defaults(func=_cmd_rl)
    e = sub.add_parser("rl-eval", help="(jmaml rl eval RUN_DIR) re-score a finished jmaml rl run",
                       description="Evaluates the policies of a finished jmaml rl run again, under the recorded "
                                   "protocol or another one given by flags; writes NAME.json and NAME.md there.")
    e.add_argument("run_dir", help="a jmaml rl run folder")
    e.add_argument("--name", default="eval", help="output files NAME.json, NAME.md in the run folder (default eval)")
    _add_rl_flags(e, _rl_eval_flags())
    e.set_defaults(func=_cmd_rl_eval)


def _rl_eval_flags() -> list[str]:
    """The flags of RLConfig's evaluation section: what ``jmaml rl eval`` may change."""
    from jmaml.run.rl_recipe import EVALUATION, RLConfig

    return [dest for dest, o in flags.options(RLConfig).items() if o.flag.group == EVALUATION]


def _rl_given(args: argparse.Namespace, names=None) -> dict:
    from jmaml.run.rl_recipe import RLConfig

    return flags.given(args, RLConfig, names)


def _rl_config(args: argparse.Namespace):
    """jmaml rl's settings: the defaults and the flags, or on --resume the recorded run's, refusing a flag that
    contradicts it."""
    from jmaml.run import rl_recipe as recipe

    if args.resume and not args.overwrite and os.path.exists(os.path.join(args.out, recipe.CONFIG_FILE)):
        recorded = recipe.load_config(args.out)
        # as for jmaml train: --steps N continues the recorded run to N meta-steps (rl_recipe.train refuses
        # shortening it); any other flag that contradicts the record is refused by name
        others = [name for name in flags.options(recipe.RLConfig) if name != "steps"]
        flags.refuse_conflicts(args, recipe.RLConfig, recorded, f"{args.out}/{recipe.CONFIG_FILE}", others)
        steps = _rl_given(args, ["steps"]).get("steps", recorded.steps)
        return dataclasses.replace(recorded, steps=steps).validate()
    given = _rl_given(args)
    return recipe.RLConfig.paper(**given).validate()  # the paper's settings for the family where no flag is given


def _cmd_rl(args: argparse.Namespace) -> int:
    from jmaml.engine._signals import StopFlag

    early = getattr(args, "early_flag", None)
    # fit reads the installed flag: a signal stops it between chunks with a checkpoint
    with contextlib.nullcontext(early) if early is not None else StopFlag():
        from jmaml.engine.loop import DivergenceError, Interrupted
        from jmaml.run import rl_recipe, runs

        recipe = runs.RECIPES["rl"]
        rl_recipe.check_run_dir(args.out)
        config = _rl_config(args)
        try:
            recipe.train(config, args.out, resume=args.resume, overwrite=args.overwrite)
        except Interrupted as e:
            print(f"jmaml rl: {e}. Resume with: jmaml rl --out {args.out} --resume", file=sys.stderr)
            return 128 + (e.signum or signal.SIGINT)
        except DivergenceError as e:
            print(f"jmaml rl: {e}", file=sys.stderr)
            return 3
        if not args.no_eval:
            print(recipe.format_table(config, recipe.evaluate(config, args.out)))
    return 0


def _cmd_rl_eval(args: argparse.Namespace) -> int:
    from jmaml.run import runs

    recipe = runs.RECIPES["rl"]
    if not os.path.isdir(args.run_dir):
        raise ValueError(f"run_dir {args.run_dir!r} is not a folder")
    if os.sep in args.name or args.name in ("", ".", "..") or args.name.startswith("rl_config"):
        raise ValueError(f"--name must be a plain file name other than rl_config, got {args.name!r}")
    recorded = recipe.load_config(args.run_dir)
    config = dataclasses.replace(recorded, **_rl_given(args, _rl_eval_flags())).validate()
    print(recipe.format_table(config, recipe.evaluate(config, args.run_dir, name=args.name)))
    return 0


_WORKER_ENV = "JMAML_DISTRIBUTED_WORKER"
_JOINED_ENV = "JMAML_DISTRIBUTED_JOINED_FILE"  # the worker creates it once the job's processes have all joined
_PEER_LOST = ("another process probably died or became unreachable; its own log says why. Resume all processes "
              "with --resume.")


def _supervise(argv: list[str]) -> int:
    """Run a distributed ``jmaml train`` in a child process and report how it ended.

    When another process of the job dies, JAX's coordination service stops the survivors with a
    C++ abort (SIGABRT and a stack trace) that Python cannot catch, and it may do so before the
    failed collective reaches our own error handling. This parent does nothing JAX-related: it
    forwards SIGINT/SIGTERM to the child (which checkpoints and stops; a repeat of the same signal
    within two seconds counts once), and turns a child killed by a signal into one clear message.
    It must not start a JAX backend: on a GPU that would hold the memory the worker needs.
    """
    joined = os.path.join(tempfile.mkdtemp(prefix="jmaml-dist-"), "joined")
    child = subprocess.Popen([sys.executable, "-m", "jmaml", *argv],
                             env={**os.environ, _WORKER_ENV: "1", _JOINED_ENV: joined})

    def forward(signum, frame):
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        was_joined = os.path.exists(joined)
        shutil.rmtree(os.path.dirname(joined), ignore_errors=True)
    if code >= 0:
        return code
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    if -code == signal.SIGABRT and not was_joined:
        print(f"jmaml train: distributed run failed: the other processes of the job never joined: JAX's "
              f"distributed runtime stopped this process ({name}) while it waited for them. Start every process "
              "of the job (the same --coordinator and --num-processes, ids 0..N-1) within --dist-timeout seconds.",
              file=sys.stderr)
        return 4
    if -code == signal.SIGABRT:
        print(f"jmaml train: distributed run failed: JAX's distributed runtime stopped this process ({name}) -- "
              f"{_PEER_LOST}", file=sys.stderr)
        return 4
    print(f"jmaml train: distributed run failed: this process was killed by {name} (by the scheduler or the "
          "out-of-memory killer?). Resume all processes with --resume.", file=sys.stderr)
    return 128 - code


COMPILE_CACHE_ENV = "JMAML_COMPILE_CACHE"
_COMPILING_COMMANDS = ("train", "sweep", "rl", "rl-eval", "eval")


def compile_cache_dir() -> str | None:
    """The folder where the ``jmaml`` command keeps compiled programs between runs (JAX's persistent
    compilation cache): ``$JMAML_COMPILE_CACHE``, or ``off`` for none; by default
    ``$XDG_CACHE_HOME/jmaml/xla`` (``~/.cache/jmaml/xla``). A ``JAX_COMPILATION_CACHE_DIR`` the user set wins."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    value = os.environ.get(COMPILE_CACHE_ENV)
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none", "false") else value
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "jmaml", "xla")


def _use_compile_cache() -> None:
    """Turns on JAX's persistent compilation cache for this process (the command owns it; the library never
    changes a user's process-wide settings). A cache that cannot be created is skipped with a note."""
    folder = compile_cache_dir()
    if folder is None:
        return
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        print(f"jmaml: compilation cache off ({folder}: {e.strerror or e}; set {COMPILE_CACHE_ENV}=off to silence)",
              file=sys.stderr)
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # the step programs, not tiny helpers
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _use_recorded_xla_flags(args: argparse.Namespace) -> None:
    """On ``--resume``, where this process sets no ``XLA_FLAGS`` of its own, the ones the run in ``--out`` was
    written under (recorded in its checkpoints by ``jmaml.fit``), before JAX's backend starts: a resumed run then
    compiles with the same XLA:CPU settings, and a bitwise resume holds. A user's own ``XLA_FLAGS`` are left as
    they are (``fit`` then says on stderr that they differ)."""
    out = getattr(args, "out", None)
    if not getattr(args, "resume", False) or "XLA_FLAGS" in os.environ or not out or not os.path.isdir(out):
        return
    from jmaml.engine import checkpoint
    from jmaml.engine.runstore import recorded_xla_flags

    for name in sorted(os.listdir(out)):
        if name.endswith(".ckpt.npz"):
            try:
                flags_there = recorded_xla_flags(checkpoint.read_header(os.path.join(out, name)))
            except checkpoint.CheckpointError:
                continue  # the resume itself reports a damaged checkpoint
            if flags_there:
                os.environ["XLA_FLAGS"] = flags_there
                print(f"jmaml {args.command}: resuming with the run's recorded XLA_FLAGS={flags_there!r}",
                      file=sys.stderr)
                return


def main(argv: list[str] | None = None, early_flag=None) -> int:
    """Runs the ``jmaml`` command. ``early_flag``: the ``StopFlag`` the entry point installed before
    importing JAX; ``jmaml train`` keeps honouring it, the other commands stop on a signal it caught."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["rl", "eval"]:  # jmaml rl eval RUN_DIR: its own parser
        argv = ["rl-eval", *argv[2:]]
    args = parser.parse_args(argv)
    args.early_flag = early_flag
    if early_flag is not None and (args.command not in ("train", "sweep", "rl") or (getattr(args, "distributed", False)
                                                               and os.environ.get(_WORKER_ENV) != "1")):
        early_flag.__exit__(None, None, None)  # only train and sweep checkpoint on a signal; the rest: default
        if early_flag.signum is not None:
            print(f"jmaml {args.command}: {signal.Signals(early_flag.signum).name} received during start-up; "
                  "stopped", file=sys.stderr)
            return 128 + early_flag.signum
    if args.command == "train" and args.distributed and os.environ.get(_WORKER_ENV) != "1":
        return _supervise(argv)
    try:
        if args.command in _COMPILING_COMMANDS:
            _use_compile_cache()
            _use_recorded_xla_flags(args)
        return args.func(args)
    except (ValueError, TypeError, ImportError) as e:
        print(f"jmaml {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a read-only or full disk, a missing folder: one line naming the path
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"jmaml {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from jmaml.engine.distributed import DistributedError

        if "RESOURCE_EXHAUSTED" in str(e):  # out of device memory, e.g. while evaluating: one line
            print(f"jmaml {args.command}: error: out of device memory: {str(e).splitlines()[0][:300]}",
                  file=sys.stderr)
            return 2
        if isinstance(e, DistributedError):
            print(f"jmaml {args.command}: distributed run failed: {e}", file=sys.stderr)
            return 4
        if getattr(args, "distributed", False):  # a collective failed mid-run: say what it likely means
            print(f"jmaml {args.command}: distributed run failed: {type(e).__name__}: {str(e).splitlines()[0]}"
                  f" -- {_PEER_LOST}", file=sys.stderr)
            return 4
        raise
    except KeyboardInterrupt:
        print(f"jmaml {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
