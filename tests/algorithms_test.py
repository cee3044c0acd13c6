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

from jmaml import Task, algorithms, checkpoint, cli, estimators, evaluate, inner_step, make_loss, models, train
from jmaml.train import TrainConfig

TINY = TrainConfig(hidden=(8,), meta_batch_size=4, num_support=5, num_query=5, steps=20, log_every=10,
                   checkpoint_every=20, pretrain=False, num_inner_steps=2)



@pytest.mark.parametrize("algo", algorithms.ALGORITHMS)
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
    assert all(moved) if algo in ("metasgd", "mamlpp") else any(moved)


def test_metasgd_run_resumes_bitwise(tmp_path):
    config = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "algo": "metasgd", "checkpoint_every": 10})
    straight = train.train(config, str(tmp_path / "a"), stream=io.StringIO())["maml"]
    with pytest.raises(train.Interrupted):
        train.train(config, str(tmp_path / "b"), stop_at_step=10, stream=io.StringIO())
    assert checkpoint.read_header(tmp_path / "b" / "maml.ckpt.npz")["step"] == 10
    resumed = train.train(config, str(tmp_path / "b"), resume=True, stream=io.StringIO())["maml"]
    for u, v in zip(checkpoint.host_leaves(straight), checkpoint.host_leaves(resumed)):
        np.testing.assert_array_equal(u, v)


def _setup():
    model = models.mlp([1, 6, 1], "tanh")
    loss = make_loss(model.apply, "mse")
    params = model.init(jax.random.key(1))
    tasks = evaluate.heldout_tasks(num_tasks=3, max_shots=5, num_query=7)
    return loss, params, tasks


def _curve(loss, algo, meta, tasks, num_steps):
    return np.asarray(evaluate.adaptation_curve(
        loss, algo.model_params(meta), tasks.support, tasks.query, inner_lr=algo.step_rates(meta, num_steps),
        num_steps=num_steps, per_step=True, prox_lambda=algo.prox_lambda))


def test_test_time_rule_of_metasgd_anil_and_mamlpp_is_their_training_inner_loop():
    loss, params, tasks = _setup()
    task0 = jax.tree.map(lambda a: a[0], tasks)
    s0, q0 = task0.support, task0.query
    # Meta-SGD: one step with its (perturbed, so per-parameter) learned rates
    algo = algorithms.make_algorithm("metasgd", loss, inner_lr=0.05, num_inner_steps=1)
    meta = algo.init(params)
    meta = meta._replace(inner_lr=jax.tree.map(lambda r: r * (1 + jnp.arange(r.size).reshape(r.shape) / r.size),
                                               meta.inner_lr))
    want = loss(inner_step(loss, meta.params, s0, inner_lr=meta.inner_lr), q0)
    assert _curve(loss, algo, meta, tasks, 3)[0, 1] == pytest.approx(float(want), rel=1e-5)
    # ANIL: only the last layer moves at test time
    algo = algorithms.make_algorithm("anil", loss, inner_lr=0.05, num_inner_steps=1)
    head_only = [jax.tree.map(lambda _: 0.0, params[0]), jax.tree.map(lambda _: 0.05, params[1])]
    want = loss(inner_step(loss, params, s0, inner_lr=head_only), q0)
    assert _curve(loss, algo, params, tasks, 3)[0, 1] == pytest.approx(float(want), rel=1e-5)
    # MAML++: after k steps with per-step rates, the estimator's own final query loss
    algo = algorithms.make_algorithm("mamlpp", loss, inner_lr=0.05, num_inner_steps=3, mamlpp_msl=False)
    meta = algo.init(params)
    meta = meta._replace(inner_lr=jax.tree.map(lambda r: r * jnp.array([1.0, 2.0, 0.5]), meta.inner_lr))
    metrics = algo.estimator(meta, Task(tasks.support, tasks.query), meta_step=0)[2]
    np.testing.assert_allclose(_curve(loss, algo, meta, tasks, 3)[:, 3], metrics["final_query_loss"], rtol=1e-5)


def test_test_time_rule_of_imaml_is_its_proximal_inner_solve():
    loss, params, tasks = _setup()
    algo = algorithms.make_algorithm("imaml", loss, inner_lr=0.05, num_inner_steps=4, imaml_lambda=2.0)
    phi = params
    s0 = jax.tree.map(lambda a: a[0], tasks.support)
    q0 = jax.tree.map(lambda a: a[0], tasks.query)
    for _ in range(4):
        phi = estimators.proximal_step(loss, phi, params, s0, inner_lr=0.05, lam=2.0)
    est_loss = algo.estimator(params, Task(tasks.support, tasks.query), inner_lr=0.05)[2]["task_losses"]
    curve = _curve(loss, algo, params, tasks, 4)
    assert curve[0, 4] == pytest.approx(float(loss(phi, q0)), rel=1e-5)
    np.testing.assert_allclose(curve[:, 4], est_loss, rtol=1e-5)


def test_evaluating_a_run_uses_its_algorithm(tmp_path):
    config = TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, "algo": "metasgd"})
    train.train(config, str(tmp_path), stream=io.StringIO())
    results = evaluate.evaluate_run(str(tmp_path), num_tasks=20, write=True)
    assert results["algo"] == "metasgd" and results["maml"]["10"]["inner_lr"] == "learned"
    assert "| metasgd | 10 | learned |" in evaluate.format_table(results)


@pytest.mark.parametrize("change, match", [
    ({"algo": "protonet"}, "algo must be one of maml, fomaml, reptile"),
    ({"algo": "reptile", "first_order": True}, "first_order applies to algo 'maml' only"),
    ({"imaml_lambda": 2.0}, "imaml_lambda = 2.0 applies to algo 'imaml' only"),
    ({"mamlpp_first_order_steps": 5}, "applies to algo 'mamlpp' only"),
    ({"algo": "imaml", "imaml_lambda": 0.0}, "imaml_lambda must be a finite number > 0"),
    ({"algo": "imaml", "imaml_lambda": -1.0}, "imaml_lambda must be a finite number > 0"),
    ({"algo": "imaml", "imaml_cg_iters": 0}, "imaml_cg_iters must be"),
    ({"algo": "mamlpp", "mamlpp_msl_anneal_steps": 0}, "mamlpp_msl_anneal_steps must be"),
    ({"algo": "mamlpp", "num_inner_steps": 0}, "needs num_inner_steps >= 1"),
    ({"algo": "imaml", "remat": True}, "remat is not available"),
    ({"rate_meta_lr": 1e-5},
     "rate_meta_lr = 1e-05 applies to algos 'metasgd', 'mamlpp' only; this run's algo is 'maml'"),
    ({"algo": "metasgd", "rate_meta_lr": -1e-5}, "rate_meta_lr"),
    ({"algo": "mamlpp", "rate_meta_lr": float("nan")}, "rate_meta_lr"),
])
def test_invalid_algorithm_settings_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{**TINY.to_dict(), "hidden": TINY.hidden, **change}).validate()


def test_make_algorithm_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="algo must be one of"):
        algorithms.make_algorithm("maml2", lambda p, b: 0.0, inner_lr=0.1, num_inner_steps=1)


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
    assert (config.algo, config.mamlpp_msl, config.mamlpp_first_order_steps) == ("mamlpp", False, 7)
    args = cli.build_parser().parse_args(["train", "--algo", "metasgd", "--rate-meta-lr", "1e-5"])
    assert cli._train_config(args).rate_meta_lr == 1e-5


def test_rate_optimiser_is_two_independent_optimisers():
    # oracle: optax.adam run separately on the parameters and on the rates
    params = {"w": jnp.array([0.5, -1.0]), "b": jnp.array(0.2)}
    meta = estimators.meta_sgd_init(params, 0.01)
    opt = algorithms.rate_optimiser(optax.adam(1e-3), optax.adam(1e-5))
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
    msgd = train.train(TrainConfig(**{**base, "algo": "metasgd", "rate_meta_lr": 0.0}), str(tmp_path / "s"),
                       stream=io.StringIO())["maml"]
    for r in jax.tree.leaves(msgd.params.inner_lr):
        np.testing.assert_array_equal(r, np.full(r.shape, TINY.inner_lr, np.float32))
    for a, b in zip(checkpoint.host_leaves(msgd.params.params), checkpoint.host_leaves(maml.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    with open(tmp_path / "s" / "config.json") as f:
        assert json.load(f)["algorithm"]["rate_meta_lr"] == 0.0
