"""The MAML family behind `jmaml train --algo`: training, resume, the test-time rule each algorithm's
model adapts by (against the estimators' own inner loops), and invalid combinations."""

import io
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jmaml import Task, cli, inner_step, learners, make_loss
from jmaml.core import estimators, models
from jmaml.engine import checkpoint
from jmaml.run import evaluate, train
from jmaml.run.train import TrainConfig

TINY = TrainConfig(hidden=(8,), meta_batch_size=4, num_support=5, num_query=5, steps=20, log_every=10,
                   checkpoint_every=20, pretrain=False, num_inner_steps=2)



@pytest.mark.parametrize("algo", learners.names())
def test_every_algorithm_trains_and_records_its_settings(tmp_path, algo):
    config = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "algo": algo})
    state = train.train(config, str(tmp_path), stream=io.StringIO())["maml"]
    assert int(state.step) == 20
    assert all(np.isfinite(leaf).all() for leaf in checkpoint.host_leaves(state.params))
    with open(tmp_path / "config.json") as f:
        info = json.load(f)
    assert info["config"]["algo"] == algo and info["algorithm"]["algo"] == algo
    if algo == "imaml":
        assert info["algorithm"]["imaml_lambda"] == 1.0 and info["algorithm"]["imaml_cg_iters"] == 5
    if algo == "mamlpp":
        assert info["algorithm"]["mamlpp_msl_anneal_steps"] == 2  # a tenth of 20 steps
    # the training moved what the algorithm learns: the parameters, and the rates where they are learned
    start = train.initial_state(config).params
    moved = [not np.array_equal(a, b)
             for a, b in zip(checkpoint.host_leaves(start), checkpoint.host_leaves(state.params))]
    # CAVIA's context stays at zero (it is adapted per task, never meta-learned)
    assert all(moved) if algo in ("metasgd", "mamlpp") else any(moved)
    # the meta-learner's checkpoint is named after its algorithm
    assert os.path.exists(tmp_path / f"{algo}.ckpt.npz")
    assert algo == "maml" or not os.path.exists(tmp_path / "maml.ckpt.npz")


def test_metasgd_run_resumes_bitwise(tmp_path):
    config = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "algo": "metasgd", "checkpoint_every": 10})
    straight = train.train(config, str(tmp_path / "a"), stream=io.StringIO())["maml"]
    with pytest.raises(train.Interrupted):
        train.train(config, str(tmp_path / "b"), stop_at_step=10, stream=io.StringIO())
    assert checkpoint.read_header(tmp_path / "b" / "metasgd.ckpt.npz")["step"] == 10
    resumed = train.train(config, str(tmp_path / "b"), resume=True, stream=io.StringIO())["maml"]
    for u, v in zip(checkpoint.host_leaves(straight), checkpoint.host_leaves(resumed)):
        np.testing.assert_array_equal(u, v)


def _setup():
    model = models.mlp([1, 6, 1], "tanh")
    loss = make_loss(model.apply, "mse")
    params = model.init(jax.random.key(1))
    tasks = evaluate.heldout_tasks(num_tasks=3, max_shots=5, num_query=7)
    return loss, params, tasks


def _curve(loss, learner, meta, tasks, num_steps):
    """The learner's test-time rule: query loss after 0..num_steps steps, per task."""
    return np.asarray(jax.vmap(lambda s, q: learner.adapt(meta, s, num_steps, observe=lambda p: loss(p, q))[1])(
        tasks.support, tasks.query))


def test_test_time_rule_of_metasgd_anil_and_mamlpp_is_their_training_inner_loop():
    loss, params, tasks = _setup()
    task0 = jax.tree.map(lambda a: a[0], tasks)
    s0, q0 = task0.support, task0.query
    # Meta-SGD: one step with its (perturbed, so per-parameter) learned rates
    algo = learners.meta_sgd(loss, inner_lr=0.05, num_inner_steps=1)
    meta = algo.init(params)
    meta = meta._replace(inner_lr=jax.tree.map(lambda r: r * (1 + jnp.arange(r.size).reshape(r.shape) / r.size),
                                               meta.inner_lr))
    want = loss(inner_step(loss, meta.params, s0, inner_lr=meta.inner_lr), q0)
    assert _curve(loss, algo, meta, tasks, 3)[0, 1] == pytest.approx(float(want), rel=1e-5)
    # ANIL: only the last layer moves at test time
    algo = learners.anil(loss, inner_lr=0.05, num_inner_steps=1)
    head_only = [jax.tree.map(lambda _: 0.0, params[0]), jax.tree.map(lambda _: 0.05, params[1])]
    want = loss(inner_step(loss, params, s0, inner_lr=head_only), q0)
    assert _curve(loss, algo, params, tasks, 3)[0, 1] == pytest.approx(float(want), rel=1e-5)
    # MAML++: after k steps with per-step rates, the estimator's own final query loss
    algo = learners.mamlpp(loss, inner_lr=0.05, num_inner_steps=3, multi_step_loss=False)
    meta = algo.init(params)
    meta = meta._replace(inner_lr=jax.tree.map(lambda r: r * jnp.array([1.0, 2.0, 0.5]), meta.inner_lr))
    metrics = algo.estimate(meta, Task(tasks.support, tasks.query), 0)[2]
    np.testing.assert_allclose(_curve(loss, algo, meta, tasks, 3)[:, 3], metrics["final_query_loss"], rtol=1e-5)


def test_test_time_rule_of_imaml_is_its_proximal_inner_solve():
    loss, params, tasks = _setup()
    algo = learners.make("imaml", loss, inner_lr=0.05, num_inner_steps=4, options={"imaml_lambda": 2.0})
    phi = params
    s0 = jax.tree.map(lambda a: a[0], tasks.support)
    q0 = jax.tree.map(lambda a: a[0], tasks.query)
    for _ in range(4):
        phi = estimators.proximal_step(loss, phi, params, s0, inner_lr=0.05, lam=2.0)
    est_loss = algo.estimate(params, Task(tasks.support, tasks.query), inner_lr=0.05)[2]["task_losses"]
    curve = _curve(loss, algo, params, tasks, 4)
    assert curve[0, 4] == pytest.approx(float(loss(phi, q0)), rel=1e-5)
    np.testing.assert_allclose(curve[:, 4], est_loss, rtol=1e-5)


def test_evaluating_a_run_uses_its_algorithm(tmp_path):
    config = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "algo": "metasgd"})
    train.train(config, str(tmp_path), stream=io.StringIO())
    results = evaluate.evaluate_run(str(tmp_path), num_tasks=20, write=True)
    assert results["algo"] == "metasgd" and results["metasgd"]["10"]["inner_lr"] == "learned"
    assert "| metasgd | 10 | learned |" in evaluate.format_table(results)


@pytest.mark.parametrize("change, match", [
    ({"algo": "protonet"}, "algo must be one of maml, fomaml, reptile"),
    ({"algo": "reptile", "algo_options": {"first_order": True}}, "first_order = True applies to algo 'maml' only"),
    ({"algo_options": {"imaml_lambda": 2.0}}, "imaml_lambda = 2.0 applies to algo 'imaml' only"),
    ({"algo_options": {"mamlpp_first_order_steps": 5}}, "applies to algo 'mamlpp' only"),
    ({"algo": "imaml", "algo_options": {"imaml_lambda": 0.0}}, "imaml_lambda must be a finite number > 0"),
    ({"algo": "imaml", "algo_options": {"imaml_lambda": -1.0}}, "imaml_lambda must be a finite number > 0"),
    ({"algo": "imaml", "algo_options": {"imaml_cg_iters": 0}}, "imaml_cg_iters must be"),
    ({"algo": "mamlpp", "algo_options": {"mamlpp_msl_anneal_steps": 0}}, "mamlpp_msl_anneal_steps must be"),
    ({"algo": "mamlpp", "num_inner_steps": 0}, "needs num_inner_steps >= 1"),
    ({"algo": "imaml", "remat": True}, "remat is not available"),
    ({"algo_options": {"rate_meta_lr": 1e-5}},
     "rate_meta_lr = 1e-05 applies to algos 'metasgd', 'mamlpp' only; this run's algo is 'maml'"),
    ({"algo": "metasgd", "algo_options": {"rate_meta_lr": -1e-5}}, "rate_meta_lr"),
    ({"algo": "mamlpp", "algo_options": {"rate_meta_lr": float("nan")}}, "rate_meta_lr"),
    ({"algo_options": {"no_such_option": 1}}, "unknown algorithm option 'no_such_option'"),
    ({"algo": "cavia", "algo_options": {"cavia_num_context": 0}}, "cavia_num_context must be"),
])
def test_invalid_algorithm_settings_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, **change}).validate()


def test_an_option_that_names_another_registered_learner_selects_it():
    assert learners.specialised("maml", {"first_order": True, "inner_optimiser": "sgd"}) == \
        ("fomaml", {"inner_optimiser": "sgd"})
    assert learners.specialised("maml", {"first_order": False}) == ("maml", {"first_order": False})
    assert learners.specialised("anil", {"first_order": True}) == ("anil", {"first_order": True})
    assert learners.specialised("reptile", {}) == ("reptile", {})


def test_registry_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="algo must be one of"):
        learners.make("maml2", lambda p, b: 0.0, inner_lr=0.1, num_inner_steps=1)


def test_run_dirs_of_the_old_layout_still_load_and_resume(tmp_path):
    # before algorithms owned their options and named their checkpoints: flat option fields in
    # config.json, and the meta-learner in maml.ckpt.npz whatever the algorithm
    config = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "algo": "imaml",
                            "algo_options": {"imaml_lambda": 2.0}})
    with pytest.raises(train.Interrupted):
        train.train(config, str(tmp_path), stop_at_step=10, stream=io.StringIO())
    with open(tmp_path / "config.json") as f:
        info = json.load(f)
    legacy = {k: v for k, v in info["config"].items() if k != "algo_options"}
    legacy.update(imaml_lambda=2.0, imaml_cg_iters=5, first_order=False, mamlpp_msl=True, rate_meta_lr=None)
    info["config"] = legacy
    with open(tmp_path / "config.json", "w") as f:
        json.dump(info, f)
    os.replace(tmp_path / "imaml.ckpt.npz", tmp_path / "maml.ckpt.npz")
    assert train.load_config(str(tmp_path)).options == {"imaml_lambda": 2.0}
    np.testing.assert_array_equal(checkpoint.host_leaves(train.load_params(str(tmp_path)))[0],
                                  checkpoint.host_leaves(train.load_params(str(tmp_path), "imaml"))[0])
    resumed = train.train(config, str(tmp_path), resume=True, stream=io.StringIO())["imaml"]
    straight = train.train(config, str(tmp_path / "straight"), stream=io.StringIO())["imaml"]
    for u, v in zip(checkpoint.host_leaves(straight), checkpoint.host_leaves(resumed)):
        np.testing.assert_array_equal(u, v)
    # an eval.json written before results were named after the algorithm still reads
    old = {"algo": "reptile", "maml": {"10": {"inner_lr": 0.01, "mean": [1.0, 0.5], "ci95": [0.1, 0.1],
                                              "median": [1.0, 0.5], "diverged": [0, 0], "num_tasks": 3}}}
    assert "| reptile | 10 | 0.01 |" in evaluate.format_table(old)


def test_cli_algorithm_flags(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--algo", "protonet", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "invalid choice: 'protonet'" in capsys.readouterr().err
    code = cli.main(["train", "--algo", "maml", "--imaml-lambda", "3", "--out", str(tmp_path / "y")])
    assert code == 2 and "applies to algo 'imaml' only" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "y")
    code = cli.main(["train", "--algo", "imaml", "--imaml-lambda", "-1", "--out", str(tmp_path / "z")])
    assert code == 2 and "imaml_lambda must be a finite number > 0" in capsys.readouterr().err
    args = cli.build_parser().parse_args(["train", "--algo", "mamlpp", "--mamlpp-no-msl", "--mamlpp-first-order-steps",
                                          "7", "--out", str(tmp_path / "w")])
    config = cli._train_config(args)
    assert (config.algo, config.options) == ("mamlpp", {"mamlpp_msl": False, "mamlpp_first_order_steps": 7})
    args = cli.build_parser().parse_args(["train", "--algo", "metasgd", "--rate-meta-lr", "1e-5"])
    assert cli._train_config(args).options["rate_meta_lr"] == 1e-5
    # every learner option has its flag, made from the learner's own declaration
    help_text = cli.build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for name in learners.all_options():
        assert "--" + name.replace("_", "-") in help_text


def test_rate_optimiser_is_two_independent_optimisers():
    # oracle: optax.adam run separately on the parameters and on the rates
    params = {"w": jnp.array([0.5, -1.0]), "b": jnp.array(0.2)}
    meta = estimators.meta_sgd_init(params, 0.01)
    opt = learners.rate_optimiser(optax.adam(1e-3), optax.adam(1e-5))
    state = opt.init(meta)
    p_opt, r_opt = optax.adam(1e-3), optax.adam(1e-5)
    p_state, r_state = p_opt.init(meta.params), r_opt.init(meta.inner_lr)
    for i in range(3):
        grads = jax.tree.map(lambda x: jnp.cos(x + i) * (1 + i), meta)
        updates, state = opt.update(grads, state, meta)
        p_up, p_state = p_opt.update(grads.params, p_state)
        r_up, r_state = r_opt.update(grads.inner_lr, r_state)
        for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves((p_up, r_up))):
            np.testing.assert_array_equal(a, b)
        meta = optax.apply_updates(meta, updates)
    with pytest.raises(TypeError, match="needs meta-parameters with .params and .inner_lr"):
        opt.init(params)


def test_metasgd_with_frozen_rates_trains_as_maml(tmp_path):
    # rate_meta_lr = 0 keeps every rate at alpha, and Meta-SGD at rates alpha is MAML: the same parameters
    base = {**TINY.to_dict(), "hidden": TINY.hidden}
    maml = train.train(TrainConfig(**base), str(tmp_path / "m"), stream=io.StringIO())["maml"]
    msgd = train.train(TrainConfig(**{**base, "algo": "metasgd", "algo_options": {"rate_meta_lr": 0.0}}),
                       str(tmp_path / "s"),
                       stream=io.StringIO())["maml"]
    for r in jax.tree.leaves(msgd.params.inner_lr):
        np.testing.assert_array_equal(r, np.full(r.shape, TINY.inner_lr, np.float32))
    for a, b in zip(checkpoint.host_leaves(msgd.params.params), checkpoint.host_leaves(maml.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with open(tmp_path / "s" / "config.json") as f:
        assert json.load(f)["algorithm"]["rate_meta_lr"] == 0.0
