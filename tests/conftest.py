"""Strict JAX settings for the whole suite, and a float64 fixture that always restores."""

import os

import jax
import pytest

from jmaml._util import enable_x64

jax.config.update("jax_numpy_rank_promotion", "raise")
# The jmaml command turns JAX's persistent compilation cache on for its process; tests call cli.main in the
# pytest worker, which must not start writing a user's ~/.cache. tests/cli_test.py tests the cache itself.
os.environ.setdefault("JMAML_COMPILE_CACHE", "off")


@pytest.fixture
def x64():
    """Runs a test with float64 enabled, restoring the previous setting afterwards."""
    with enable_x64():
        yield


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_code():
    """Frees every compiled executable after each test file. Each executable holds its own memory mappings,
    and one worker process running hundreds of files' programs passed the kernel's limit of 65,530 mappings
    (vm.max_map_count): XLA's compiler then crashed with a segmentation fault (seen twice, in CI and here)."""
    yield
    jax.clear_caches()


# The fast tier (pytest -m "not slow"): the tests that took 18 s or more in a whole-suite run on 2 cores
# (pytest --durations=40, 2026-12-06), besides those marked @pytest.mark.slow in their files. CI runs all.
SLOW_TESTS = frozenset({
    "rl_test.py::test_an_rl_run_killed_by_sigkill_resumes_bitwise",
    "rl_test.py::test_trpo_is_the_references_step_with_the_analytic_kl",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[imaml]",
    "images_test.py::test_short_resnet12_meta_training_on_synthetic_cifar_beats_chance",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[mamlpp]",
    "gradcheck_test.py::test_gradient_check_passes_every_exact_learner_at_init_and_after_training[linen]",
    "gradcheck_test.py::test_gradient_check_passes_every_exact_learner_at_init_and_after_training[plain]",
    "engine_test.py::test_a_users_tasks_and_model_through_a_sweep_equal_single_runs",
    "gradcheck_test.py::test_gradient_check_passes_every_exact_learner_at_init_and_after_training[equinox]",
    "sweep_run_test.py::test_sigkill_at_random_moments_then_resume_is_bitwise",
    "images_test.py::test_cifarfs_cli_run_with_preset_beats_chance_and_backbone_flag",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[maml]",
    "gradcheck_test.py::test_gradient_check_passes_every_exact_learner_at_init_and_after_training[nnx]",
    "sweep_run_test.py::test_every_learner_sweeps_from_the_cli[metasgd]",
    "population_test.py::test_every_learner_runs_as_a_population",
    "rl_test.py::test_the_best_policy_on_validation_is_the_run_at_that_step",
    "distributed_test.py::test_sharded_over_four_devices_equals_one_device",
    "distributed_test.py::test_inconsistent_process_counts_fail_on_both_processes",
    "rl_test.py::test_ppo_first_epoch_is_adams_first_step_on_the_meta_gradient",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[cavia]",
    "images_test.py::test_short_meta_training_beats_chance",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[anil]",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[metasgd]",
    "killresume_test.py::test_sigkill_at_random_points_then_resume_is_bitwise",
    "rl_test.py::test_trpo_takes_a_step_inside_its_trust_region",
    "distributed_test.py::test_blocks_are_taken_within_each_devices_shard",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[fomaml]",
    "rl_test.py::test_navigation_trains_through_fit_and_resumes_bitwise",
    "cli_test.py::test_train_eval_plot_end_to_end",
    "sweep_run_test.py::test_every_learner_sweeps_from_the_cli[cavia]",
    "batchnorm_test.py::test_an_nnx_batch_norm_model_through_fit_resume_and_evaluate",
    "sweep_test.py::test_chunking_is_transparent",
    "images_test.py::test_resuming_on_changed_data_is_refused_unless_asked",
    "rl_test.py::test_a_sweep_over_the_inner_rate_and_seed_of_an_rl_learner_is_one_program",
    "blocking_test.py::test_a_population_of_a_blocked_learner_equals_the_whole_batchs",
    "rundir_test.py::test_sweep_evaluation_in_memory_sized_chunks_equals_one_call",
    "batchnorm_test.py::test_per_step_batch_norm_weights_as_maml_plus_plus",
    "rl_test.py::test_jmaml_evaluate_scores_an_rl_learner_as_the_paper_reports",
    "engine_test.py::test_a_batch_norm_model_with_running_statistics_trains_and_resumes",
    "inner_optimisers_test.py::test_per_parameter_learned_hyperparameters_of_every_kind[rmsprop-decay]",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.removeprefix("tests/") in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
