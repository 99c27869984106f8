"""Fault-injection suite (issue 7, parts 3 and 4): small enough for CI, every test with a bound.

Faults are injected with RECAP_FAULT (train/runtime/failpoints.py: ``sigkill|sigterm|sigusr1|nan``
at ``step=N``, ``from_step=N``, ``save=N``, ... on a ``rank``, several separated by ``;``). The
reference runs are session fixtures (conftest.py); tiny overrides and comparisons in runs.py.
Each fault of the issue, and the tests that cover it (here, or where they already lived):

Multi-node on one machine (part 3)
  two nodes == one node with two processes, bit for bit
      tests/faults/test_multinode.py::test_two_nodes_train_exactly_like_one_node_with_two_processes
  a node that never joins: one clear line (endpoint, timeout), exit 1, no hang
      tests/faults/test_multinode.py::test_a_node_that_never_joins_ends_with_a_clear_timeout
      tests/train/test_supervise.py (the message, with a stand-in torchrun)
      tests/train/test_torchrun_command.py::test_multi_node_uses_c10d_rendezvous_with_join_timeout

SIGKILL, rerun: bit-identical final state and loss sequence
  at a random step, 3 seeds (1 process, train-vae)
      tests/faults/test_sigkill_random_step.py::test_sigkill_at_a_random_step_then_rerun_is_bit_identical
  at a fixed step, 2 processes under torchrun, ZeRO-2 (train-vae)
      tests/faults/test_sigkill_resume.py::test_sigkill_and_rerun_is_bit_identical
  rank 1 only, DDP, across a resolution-stage boundary (train-t2i)
      tests/train/test_train_t2i.py::test_sigkill_and_rerun_is_bit_identical_across_a_stage_boundary
  other stages: tests/train/test_captioner_pipeline.py::test_pretrain_resumes_bit_identically,
      tests/train/test_recaption.py::test_sigkill_anywhere_then_rerun_is_byte_identical_and_a_third_run_does_nothing,
      tests/train/test_cache.py::test_a_killed_cache_job_reruns_to_the_same_bytes,
      tests/train/test_pipeline_stage.py::test_a_killed_stage_stops_the_pipeline_and_a_rerun_continues_from_it
  unit level: tests/train/test_checkpointing.py::test_resume_continues_bit_identically

Negative controls: resuming without the reader position, or without the RNG state, differs
      tests/faults/test_sigkill_resume.py::test_resuming_without_the_reader_position_or_the_rng_state_differs

Crash in the middle of a checkpoint save: resume from the previous one, the partial one removed
      tests/faults/test_sigkill_random_step.py::test_sigkill_in_the_middle_of_a_checkpoint_save_resumes_from_the_previous_one
      tests/train/test_checkpointing.py::test_crash_during_save_resumes_from_previous_and_cleans_up
      tests/train/test_checkpoint_files.py::test_only_committed_directories_count_and_debris_is_removed

A flipped byte in a checkpoint: an error naming the file; fallback to the previous one only when configured
      tests/faults/test_checkpoint_corruption.py::test_a_flipped_byte_names_the_file_and_falls_back_only_when_configured
      tests/train/test_checkpointing.py::test_corrupt_newest_fails_naming_the_file_or_falls_back
      tests/train/test_checkpoint_files.py::test_flipped_byte_is_reported_with_the_file_name

NaN on one rank: the same decision on both ranks, K skips in a row abort, no hang
      tests/faults/test_nan_ranks.py::test_skips_on_both_ranks_then_aborts_after_k_in_a_row
      tests/faults/test_nan_ranks.py::test_fail_policy_stops_both_ranks_at_that_step
      tests/train/test_train_t2i.py::test_a_nan_loss_fails_or_skips_the_step (1 process)

SIGTERM / SIGUSR1 to one rank (preemption: every rank checkpoints the same step, exit 75)
      tests/faults/test_preemption.py

World size changed on resume (2 -> 1): refused, both sizes named
      tests/faults/test_resume_refusals.py::test_world_size_changed_from_2_to_1_is_refused
      tests/train/test_checkpointing.py::test_world_size_change_is_refused

Config drift on resume: refused with the list of changed keys
      tests/faults/test_resume_refusals.py::test_config_drift_on_resume_is_refused_with_the_changed_keys
      tests/train/test_checkpointing.py::test_config_drift_is_refused_with_the_differences

Security
  a malicious pickle checkpoint is not executed
      tests/faults/test_security.py::test_a_malicious_pickle_in_a_checkpoint_is_refused_and_never_runs
      tests/train/test_checkpoint_files.py::test_malicious_pickle_is_refused_and_not_executed
  a `_target_` naming os.system or an alias is rejected before any work (recap never instantiates)
      tests/faults/test_security.py::test_a_target_on_the_command_line_is_rejected_before_any_work
      tests/faults/test_security.py::test_a_target_is_rejected_by_the_recap_process_too
      tests/faults/test_security.py::test_a_target_in_a_config_group_yaml_is_rejected
      tests/faults/test_security.py::test_recap_never_instantiates_a_target
      tests/faults/test_security.py::test_a_target_in_hydras_own_config_never_runs (strict xfail: Hydra,
          not recap, refuses hydra.callbacks / hydra.launcher targets)
      tests/train/test_typed_config.py::test_unknown_key_suggests_close_match_and_lists_sorted_valid_keys
  secrets never written
      tests/faults/test_security.py::test_secrets_in_the_environment_and_in_urls_are_never_written
      tests/train/test_run_outputs.py::test_one_run_writes_metrics_logs_summary_and_no_secrets
      tests/train/test_cli.py::test_multirun_yaml_and_errors_are_redacted
      tests/train/test_sample.py::test_sample_stage_rewrites_prompts_and_keeps_the_key_out_of_files
      tests/train/test_redaction.py

The failpoints themselves: tests/faults/test_fault_specs.py.
"""
