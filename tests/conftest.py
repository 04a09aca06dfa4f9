"""Tests run with 8 host CPU devices so that meshes can be tested on one machine.

The flag must be set before JAX initialises its backend, hence here, before any test imports jax.
Single-device runs use `config.mesh.num_devices = 1`.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import pytest  # noqa: E402 (after the environment is set)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """Where the tests' TFDS builders prepare their data, once per session (files may override)."""
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="session")
def tiny_finetune(data_dir):
    """`make(config_file, method, init_from)`: a fine-tuning config of `configs/` on a 2-layer,
    32-wide BERT (the MiniLM's vocabulary) for 3 steps of 8 rows: seconds, not minutes."""
    from jaxlm import config as config_lib

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def make(config_file="sst2.py", method="full", init_from=""):
        config = config_lib.from_file(os.path.join(repo, "configs", config_file), method)
        config.init_from = init_from
        config.data.update(dict(seq_len=32, data_dir=data_dir, pad_multiple=0, bucket_batches=0))  # one compiled length
        config.model.update(dict(name="bert", num_layers=2, emb_dim=32, num_heads=2, mlp_dim=64, max_len=32,
                                 use_bias=True, mlp="gelu_exact"))
        config.peft.update(dict(rank=2, adapter_dim=4, num_tokens=3))
        config.train.update(dict(steps=3, batch_size=8, log_every=1, eval_every=3, eval_batches=1,
                                 peak_flops=1e12))
        config.optim.update(dict(warmup_steps=1))
        config.checkpoint.update(dict(every=3, async_save=False))
        config.mesh.num_devices = 1
        return config

    return make


# The default suite's heaviest tests, measured over ~20 s each on the 2-core CI machine
# (`pytest --durations`, 2026-12-03): they run with the slow ones (`python -m pytest -m slow`) so
# that `python -m pytest` stays near 15 minutes. One of each kind stays in the default suite
# (a mesh against one device, a pipeline layout, a PEFT method, a stop-and-resume).
HEAVY = {
    "test_families.py": ["test_family_trains_and_a_pipelined_data_tensor_mesh_gives_the_single_device_losses"],
    "test_finetune.py": ["test_a_vit_transfers_to_another_data_set_with_a_fresh_head",
                         "test_classification_evaluates_a_split_and_a_file",
                         "test_tagging_scores_entities_over_words"],
    "test_peft.py": ["test_a_merged_lora_run_predicts_like_the_lora_run",
                     *[f"test_a_peft_run_trains_and_saves_only_its_parameters[{m}]"
                       for m in ("adapter", "prompt", "prefix", "bitfit", "head")]],
    "test_multihost.py": ["test_two_processes_log_the_losses_of_one_process_on_the_same_mesh",
                          "test_the_two_process_checkpoint_restores_in_one_process",
                          "test_one_process_resumes_the_two_process_run_where_it_stopped"],
    "test_faults.py": ["test_kill_9_in_training_then_resume_gives_the_uninterrupted_losses",
                       "test_a_signal_logs_the_pending_steps_saves_and_the_resumed_run_matches",
                       "test_non_finite_parameters_are_never_saved_under_either_policy",
                       "test_resuming_with_another_batch_size_is_an_error_and_the_configs_are_kept",
                       "test_an_export_into_a_folder_another_export_writes_is_an_error"],
    "test_pipeline.py": [f"test_a_parallel_layout_gives_the_single_device_losses_and_gradients[{layout}]"
                         for layout in ("circular_repeats2", "stage2_fsdp2_tensor2", "stage2_tensor2_seqpar_remat",
                                        "stage4_micro8", "tensor2_seqpar")]
                        + ["test_bf16_compute_through_the_pipeline_keeps_f32_master_weights"],
    "test_distill.py": ["test_loss_matches_numpy", "test_init_layers_copies_the_teacher",
                        "test_bad_settings_name_the_key"],
    "test_prune.py": ["test_pruned_weights_stay_zero_through_adam_and_resume",
                      "test_targets_that_match_nothing_or_only_frozen_parameters_are_errors",
                      "test_an_earlier_pruned_checkpoint_fails_naming_the_change",
                      "test_sparsity_follows_the_polynomial_schedule[3-global-True]"],
    "test_convert.py": ["test_tool_imports_and_checks_minilm"],
    "test_train.py": ["test_stop_and_resume_equals_an_uninterrupted_run[first_mesh1-second_mesh1]",
                      "test_stop_and_resume_equals_an_uninterrupted_run[first_mesh2-second_mesh2]",
                      "test_sigterm_saves_a_restorable_checkpoint_and_exits_0",
                      "test_generate_cli_prints_the_greedy_continuation_of_the_latest_checkpoint",
                      "test_profile_steps_trace_the_steps_after_the_first_call_and_the_report_reads_them"],
    "test_multitask.py": ["test_a_short_run_writes_per_task_metrics_and_predictions_name_their_task"],
    "test_data_images.py": ["test_split_sizes_shapes_and_features[jaxlm_fashion_mnist]"],
    "test_contrastive.py": ["test_a_tiny_run_writes_retrieval_top1_and_restores_for_prediction"],
    "test_memory.py": ["test_activations_follow_xla_across_remat_policies[bfloat16-model1]"],
    "test_seq2seq_decode.py": ["test_cached_greedy_equals_recompute[False]"],
    "test_image_text.py": ["test_a_dual_encoder_learns_class_descriptions_and_classifies_by_prompts[siglip]",
                           "test_the_image_tower_starts_from_a_vit_run_without_its_head"],
    "test_splash.py": ["test_a_decoder_with_splash_attention_computes_the_cpu_decoders_logits_and_gradients",
                       "test_splash_sharded_over_data_and_tensor_equals_one_device"],
}


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        file, _, name = item.nodeid.rpartition("::")
        heavy = HEAVY.get(os.path.basename(file), ())
        if name in heavy or name.split("[")[0] in heavy:
            item.add_marker(pytest.mark.slow)
