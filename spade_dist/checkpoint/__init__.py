"""Elastic checkpointing: DCP step directories with a commit marker, async saves, preemption,
retention, resume on any world size, and single-process generator loading for export / eval.

Public API (see docs/CHECKPOINTING.md):
    CheckpointManager, GatheredState, RestoreResult        -- used by the training loop
    find_latest, validate_step_dir, InvalidCheckpoint      -- locate / check checkpoints
    load_generator_from_checkpoint, read_generator_state    -- step dirs, for spade_dist.generation.load_model
"""
from spade_dist.checkpoint.generator import (
    load_generator_from_checkpoint,
    read_checkpoint_config,
    read_generator_state,
    resolve_step_dir,
)
from spade_dist.checkpoint.layout import (
    CheckpointIncompatibleError,
    ExistingCheckpointsError,
    InvalidCheckpoint,
    checkpoints_dir,
    find_latest,
    list_step_dirs,
    read_marker,
    step_dir_name,
    step_of,
    validate_step_dir,
)
from spade_dist.checkpoint.manager import CheckpointManager, CheckpointWriteError, GatheredState, RestoreResult
from spade_dist.checkpoint.store import CheckpointReadError, StepReader

__all__ = [
    "CheckpointIncompatibleError", "ExistingCheckpointsError", "CheckpointManager", "GatheredState", "RestoreResult", "InvalidCheckpoint", "CheckpointReadError",
    "CheckpointWriteError",
    "StepReader", "checkpoints_dir", "find_latest", "list_step_dirs", "read_marker", "step_dir_name",
    "step_of", "validate_step_dir", "load_generator_from_checkpoint", "read_generator_state",
    "read_checkpoint_config", "resolve_step_dir",
]
