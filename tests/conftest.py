"""Strict JAX settings for the whole suite, and a float64 fixture that always restores."""

import os

import jax
import pytest

from jmaml.core._util import enable_x64

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


# The fast tier (pytest -m "not slow", about two minutes on 2 cores): every test that took 3.6 s or more in a
# fast-tier run on 2 cores (pytest -m "not slow" --durations=120, 2026-12-07; then 4.5 s or more in a second
# run), besides those marked @pytest.mark.slow in their files, and the six slowest doctests. CI runs all; every
# module of jmaml keeps tests in the fast tier.
SLOW_TESTS = frozenset({
    "jmaml/core/models.py::jmaml.core.models.resnet12",
    "jmaml/core/fused.py::jmaml.core.fused.maml_value_and_grad",
    "jmaml/engine/loop.py::jmaml.engine.loop.fit",
    "jmaml/rl/__init__.py::jmaml.rl",
    "jmaml/engine/blocking.py::jmaml.engine.blocking.blocked",
    "jmaml/core/models.py::jmaml.core.models.conv4",
    "adapters_test.py::test_adapters_give_the_plain_mlps_meta_gradient[equinox]",
    "adapters_test.py::test_rate_trees_and_masks_walk_library_params[equinox]",
    "adapters_test.py::test_rate_trees_and_masks_walk_library_params[linen]",
    "algorithms_test.py::test_every_algorithm_trains_and_records_its_settings[cavia]",
    "algorithms_test.py::test_every_algorithm_trains_and_records_its_settings[imaml]",
    "algorithms_test.py::test_metasgd_run_resumes_bitwise",
    "algorithms_test.py::test_test_time_rule_of_metasgd_anil_and_mamlpp_is_their_training_inner_loop",
    "batchnorm_test.py::test_a_linen_batch_norm_model_takes_batch_stats",
    "batchnorm_test.py::test_an_nnx_batch_norm_model_through_fit_resume_and_evaluate",
    "batchnorm_test.py::test_batch_norm_test_time_modes_are_chosen_at_evaluation_and_recorded",
    "batchnorm_test.py::test_per_step_batch_norm_weights_as_maml_plus_plus",
    "batchnorm_test.py::test_per_step_statistics_as_maml_plus_plus",
    "blocking_test.py::test_a_blocked_run_resumes_bitwise_and_its_block_is_part_of_the_fingerprint",
    "blocking_test.py::test_a_model_with_state_and_traced_k_through_blocks",
    "blocking_test.py::test_a_population_of_a_blocked_learner_equals_the_whole_batchs",
    "blocking_test.py::test_a_sum_reduction_sums_its_blocks",
    "blocking_test.py::test_auto_keeps_its_choice_on_resume_whatever_the_load",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[anil]",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[cavia]",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[fomaml]",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[imaml]",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[maml]",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[mamlpp]",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[metasgd]",
    "blocking_test.py::test_the_blocked_gradient_equals_the_whole_batchs_in_float64[reptile]",
    "blocking_test.py::test_the_un_adapted_loss_is_measured_on_a_subsample_of_the_batch[mean-imaml]",
    "blocking_test.py::test_the_un_adapted_loss_is_measured_on_a_subsample_of_the_batch[mean-maml]",
    "blocking_test.py::test_the_un_adapted_loss_is_measured_on_a_subsample_of_the_batch[mean-mamlpp]",
    "cli_test.py::test_the_command_caches_compiled_programs_and_a_warm_start_is_bitwise",
    "cli_test.py::test_train_eval_plot_end_to_end",
    "distributed_test.py::test_a_process_that_dies_makes_the_other_fail_instead_of_hanging",
    "distributed_test.py::test_a_process_whose_peers_never_joined_says_so",
    "distributed_test.py::test_blocks_are_taken_within_each_devices_shard",
    "distributed_test.py::test_inconsistent_process_counts_fail_on_both_processes",
    "distributed_test.py::test_sharded_over_four_devices_equals_one_device",
    "distributed_test.py::test_sigterm_to_a_distributed_process_group_checkpoints_once_and_exits",
    "distributed_test.py::test_two_processes_over_gloo_equal_one_process",
    "distributed_test.py::test_unreachable_coordinator_is_a_clear_error_within_the_timeout",
    "docs_test.py::test_the_api_reference_builds",
    "engine_test.py::test_a_batch_norm_model_with_running_statistics_trains_and_resumes",
    "engine_test.py::test_a_users_tasks_and_model_through_a_sweep_equal_single_runs",
    "engine_test.py::test_a_users_tasks_and_model_train_resume_bitwise_and_evaluate",
    "engine_test.py::test_a_users_tasks_on_four_devices_equal_one_device",
    "engine_test.py::test_cavia_meta_gradient_equals_finite_differences_of_an_independent_oracle[1]",
    "engine_test.py::test_cavia_trains_through_train_config",
    "engine_test.py::test_every_learners_metrics_reach_metrics_jsonl",
    "engine_test.py::test_model_state_gets_no_gradient_and_matches_a_hand_threaded_state",
    "engine_test.py::test_sweep_learner_resume_continues_the_recorded_sweep_or_fails_naming_why",
    "estimators_test.py::test_anil_freezes_the_body_and_matches_finite_differences",
    "estimators_test.py::test_imaml_memory_does_not_grow_with_the_inner_steps",
    "estimators_test.py::test_mamlpp_gradient_with_lslr_and_multi_step_loss_against_finite_differences",
    "estimators_test.py::test_mamlpp_with_one_step_fixed_rates_and_no_multi_step_loss_equals_maml",
    "estimators_test.py::test_meta_sgd_gradient_including_the_rates_against_finite_differences",
    "estimators_test.py::test_meta_sgd_with_equal_rates_gives_mamls_gradient_exactly",
    "eval_kind_test.py::test_a_pretrained_baseline_for_any_task_distribution[halfplanes]",
    "eval_kind_test.py::test_a_pretrained_baseline_for_any_task_distribution[sinusoid]",
    "evaluate_test.py::test_adaptation_curve_equals_adapt_then_query_loss",
    "fused_test.py::test_a_sweep_vmaps_the_kernel_over_inner_rates",
    "fused_test.py::test_fused_backend_trains_like_autodiff",
    "fused_test.py::test_fused_kernel_equals_autodiff_float32_relu[1]",
    "fused_test.py::test_fused_kernel_equals_autodiff_float64_tanh[1]",
    "fused_test.py::test_fused_kernel_equals_autodiff_float64_tanh[5]",
    "fused_test.py::test_fused_kernel_float32_tanh_width_and_k0",
    "fused_test.py::test_fused_kernel_float64_relu_sum_of_squares_and_sum_reduction",
    "fused_test.py::test_sweeps_take_the_fused_learner_and_run_sweep_says_why_not",
    "fused_test.py::test_the_gpu_kernel_body_task_by_task_equals_autodiff[tanh-3]",
    "fused_test.py::test_train_config_backend_fused_runs_a_chunk",
    "gradcheck_test.py::test_gradient_check_fails_a_wrong_gradient[1.01]",
    "gradcheck_test.py::test_gradient_check_passes_every_exact_learner_at_init_and_after_training[equinox]",
    "gradcheck_test.py::test_gradient_check_passes_every_exact_learner_at_init_and_after_training[linen]",
    "gradcheck_test.py::test_gradient_check_passes_every_exact_learner_at_init_and_after_training[nnx]",
    "gradcheck_test.py::test_gradient_check_passes_every_exact_learner_at_init_and_after_training[plain]",
    "gradcheck_test.py::test_the_relative_only_rule_failed_a_right_meta_sgd_gradient",
    "images_test.py::test_cifarfs_cli_run_with_preset_beats_chance_and_backbone_flag",
    "images_test.py::test_conv4_shapes_and_transductive_batch_norm",
    "images_test.py::test_episodes_shapes_balanced_labels_determinism_and_classes",
    "images_test.py::test_resnet12_shapes_parameter_count_and_residual_blocks",
    "images_test.py::test_resuming_on_changed_data_is_refused_unless_asked",
    "images_test.py::test_short_meta_training_beats_chance",
    "images_test.py::test_short_resnet12_meta_training_on_synthetic_cifar_beats_chance",
    "inner_optimisers_test.py::test_a_sweep_varies_the_inner_optimisers_settings_and_equals_single_runs",
    "inner_optimisers_test.py::test_meta_gradient_through_k3_stateful_inner_steps_equals_finite_differences[adam]",
    "inner_optimisers_test.py::test_meta_gradient_through_k3_stateful_inner_steps_equals_finite_differences[momentum]",
    "inner_optimisers_test.py::test_meta_sgd_and_mamlpp_rates_are_instances_of_learned_hyperparameters",
    "inner_optimisers_test.py::test_per_parameter_learned_hyperparameters_of_every_kind[adam-b1,b2]",
    "inner_optimisers_test.py::test_per_parameter_learned_hyperparameters_of_every_kind[momentum-momentum]",
    "inner_optimisers_test.py::test_per_parameter_learned_hyperparameters_of_every_kind[nesterov-momentum,learning_rate]",
    "inner_optimisers_test.py::test_per_parameter_learned_hyperparameters_of_every_kind[rmsprop-decay]",
    "inner_optimisers_test.py::test_second_order_through_adam_is_finite_where_plain_optax_gives_nan",
    "inner_optimisers_test.py::test_sgd_inner_optimiser_equals_the_built_in_sgd_path",
    "inner_test.py::test_remat_changes_no_value",
    "killresume_test.py::test_a_signal_during_start_up_is_honoured_not_lost",
    "killresume_test.py::test_sigkill_at_random_points_then_resume_is_bitwise",
    "meta_test.py::test_jit_equals_no_jit",
    "ownership_test.py::test_the_fingerprint_is_the_same_in_a_new_process",
    "population_test.py::test_a_diverging_point_is_frozen_reported_and_leaves_the_others_alone",
    "population_test.py::test_a_population_on_four_devices_equals_one_device",
    "population_test.py::test_a_population_resumes_bitwise_and_owns_its_run_dir",
    "population_test.py::test_a_run_and_the_same_run_as_a_population_point_stop_at_the_same_step_with_the_same_state",
    "population_test.py::test_each_point_equals_the_single_run_fit_trains",
    "population_test.py::test_every_learner_runs_as_a_population",
    "population_test.py::test_traced_k_points_equal_single_runs_at_their_k",
    "precision_test.py::test_a_bf16_run_trains_with_float32_state_and_the_default_fingerprint_is_unchanged",
    "precision_test.py::test_bf16_computes_the_matmuls_in_bfloat16_and_keeps_float32_around_them",
    "precision_test.py::test_cli_precision_flag",
    "refusals_test.py::test_eval_says_which_checkpoint_it_scored",
    "rl_test.py::test_a_non_finite_reward_stops_the_run_naming_it",
    "rl_test.py::test_a_sweep_over_the_inner_rate_and_seed_of_an_rl_learner_is_one_program",
    "rl_test.py::test_an_rl_run_killed_by_sigkill_resumes_bitwise",
    "rl_test.py::test_gae_against_its_definition",
    "rl_test.py::test_jmaml_evaluate_scores_an_rl_learner_as_the_paper_reports",
    "rl_test.py::test_navigation_trains_through_fit_and_resumes_bitwise",
    "rl_test.py::test_ppo_first_epoch_is_adams_first_step_on_the_meta_gradient",
    "rl_test.py::test_ppo_trains_through_fit_and_names_bad_settings",
    "rl_test.py::test_rollouts_follow_the_environment",
    "rl_test.py::test_the_baselines_rate_is_the_best_on_validation",
    "rl_test.py::test_the_best_policy_on_validation_is_the_run_at_that_step",
    "rl_test.py::test_the_dice_estimator_matches_the_exact_meta_gradient_and_the_naive_one_is_biased",
    "rl_test.py::test_the_evaluation_schedule_reaches_adapt",
    "rl_test.py::test_the_linear_baseline_is_least_squares_even_with_collinear_features",
    "rl_test.py::test_the_lvc_estimator_has_the_expectation_promp_gives_it",
    "rl_test.py::test_the_rl_command_leaves_another_kind_of_run_alone",
    "rl_test.py::test_trpo_is_the_references_step_with_the_analytic_kl",
    "rl_test.py::test_trpo_steps_where_the_sample_kl_stood_still",
    "rl_test.py::test_trpo_takes_a_step_inside_its_trust_region",
    "rundir_test.py::test_a_checkpoint_of_another_run_or_phase_is_refused",
    "rundir_test.py::test_a_divergence_stopped_run_continues_with_changed_settings_only_on_purpose",
    "rundir_test.py::test_a_run_too_large_for_the_device_fails_before_it_starts_and_leaves_nothing",
    "rundir_test.py::test_a_sweep_reports_its_finished_points_as_chunks_end",
    "rundir_test.py::test_a_truncated_eval_json_is_recomputed_by_train_and_named_by_plot",
    "rundir_test.py::test_eval_inner_steps_applies_to_sinusoid",
    "rundir_test.py::test_overwrite_replaces_a_finished_run_with_its_plots_and_keeps_the_users_files",
    "rundir_test.py::test_stale_temporaries_are_cleaned_and_results_written_atomically",
    "rundir_test.py::test_sweep_evaluation_in_memory_sized_chunks_equals_one_call",
    "sweep_run_test.py::test_an_unfinished_sweep_is_refused_without_resume_or_overwrite",
    "sweep_run_test.py::test_every_learner_sweeps_from_the_cli[cavia]",
    "sweep_run_test.py::test_every_learner_sweeps_from_the_cli[metasgd]",
    "sweep_run_test.py::test_every_learner_sweeps_from_the_cli[reptile]",
    "sweep_run_test.py::test_resume_continues_the_recorded_sweep_and_refuses_a_contradicting_flag",
    "sweep_run_test.py::test_sigint_stops_a_sweep_with_a_checkpoint_and_says_how_to_resume",
    "sweep_run_test.py::test_sigkill_at_random_moments_then_resume_is_bitwise",
    "sweep_test.py::test_chunking_is_transparent",
    "sweep_test.py::test_divergence_is_flagged_per_point",
    "sweep_test.py::test_every_grid_point_equals_the_single_run_with_the_same_settings",
    "train_test.py::test_divergence_stops_with_the_step_and_keeps_the_last_good_checkpoint",
    "train_test.py::test_exploding_inner_loop_stops_the_run",
    "train_test.py::test_interrupted_then_resumed_run_equals_uninterrupted_run_bitwise",
    "train_test.py::test_output_dir_holding_a_different_run_is_refused_and_left_alone",
    "train_test.py::test_resume_can_extend_a_finished_run",
    "train_test.py::test_sigterm_writes_a_checkpoint_and_exits",
    "writers_test.py::test_each_start_says_it_is_compiling_and_records_its_time_to_the_first_chunk",
    "writers_test.py::test_jsonl_and_callback_writers_get_every_chunk_with_speed_and_wall_time",
    "adapters_test.py::test_rate_trees_and_masks_walk_library_params[nnx]",
    "algorithms_test.py::test_test_time_rule_of_imaml_is_its_proximal_inner_solve",
    "sweep_test.py::test_all_points_see_the_same_tasks_so_seed_only_changes_the_start",
    "sweep_test.py::test_results_table_files",
    "sweep_test.py::test_seed_aggregates_are_the_mean_and_95_percent_interval_over_seeds",
    "inner_optimisers_test.py::test_traced_k_equals_plain_k_with_a_stateful_optimiser",
    "population_test.py::test_evaluate_population_scores_every_point_as_evaluate_does_in_one_program",
    "meta_test.py::test_inner_lr_override_is_traced_in_the_step",
    "fused_test.py::test_the_gpu_kernel_body_task_by_task_equals_autodiff[relu-2]",
    "fused_test.py::test_fused_kernel_equals_autodiff_float32_relu[3]",
    "inner_optimisers_test.py::test_meta_gradient_with_respect_to_learned_hyperparameters_equals_finite_differences",
    "gradcheck_test.py::test_gradient_check_fails_a_wrong_gradient[1.0001]",
    "adapters_test.py::test_adapters_give_the_plain_mlps_meta_gradient[linen]",
})


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.removeprefix("tests/") in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)
