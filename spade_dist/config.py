"""Typed configuration: dataclasses, YAML loading with inheritance, dotted CLI overrides.

This module is the only place that knows config keys and their defaults. Defaults follow the
official NVlabs/SPADE options (base_options.py / train_options.py); per-dataset presets live in
``configs/*.yaml`` and inherit from ``configs/base.yaml``.

A YAML file may name a parent with ``inherit: other.yaml`` (relative to the file; a bare name that is
no file there names a shipped preset, e.g. ``inherit: coco_stuff``). Parents are merged first,
children override. :func:`load_config` takes a file path or, when no such file exists, a preset name. Any unknown key or badly typed value raises :class:`ConfigError` naming the
dotted key and the file (or ``<override>``) it came from.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import reprlib
import signal
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml

from spade_dist.exit_codes import EXIT_REQUEUE, requeue_code_problem
from spade_dist.label_layout import LabelLayout
from spade_dist.norm_strings import parse_nonspade_norm, parse_spade_norm


class ConfigError(ValueError):
    """A configuration key or value is wrong. The message names the key and the source file."""


log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


# A speed path switch: force it on or off, or let the run time both on its device (auto).
SpeedSwitch = Literal["auto", "on", "off"]
# How a SPADE layer computes gamma/beta, from the least to the most specialised (models/fast/).
SpadePath = Literal["dense", "gather", "region"]
SPADE_PATHS: tuple[str, ...] = get_args(SpadePath)


@dataclass
class DataConfig:
    # Names the label set: its colours (spade_dist/palettes.py) and the FID statistics' cache key.
    # synthetic = spade-data synth's landscapes; custom = any other.
    dataset: Literal["coco-stuff", "ade20k", "cityscapes", "synthetic", "custom"] = "custom"
    # Training shards: a brace pattern ("d/x-train-{000000..000003}.tar"), a glob, a manifest.json
    # path (its split named by `split`), or "pipe:..." commands separated by "::".
    shards: str = ""
    split: str = "train"
    val_shards: str = ""
    val_split: str = "val"
    # manifest.json of the shards; needed for pipe: URLs, optional override for patterns/globs
    # (default: manifest.json beside the shards). See docs/DATA.md.
    manifest: str = ""
    label_nc: int = 182
    contain_dontcare_label: bool = False
    no_instance: bool = False
    # Official preprocessing (data/base_dataset.py).
    preprocess_mode: Literal[
        "resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "scale_shortside",
        "scale_shortside_and_crop", "fixed", "none",
    ] = "scale_width_and_crop"
    load_size: int = 1024
    crop_size: int = 512
    aspect_ratio: float = 1.0
    no_flip: bool = False
    # Image resampling: "exact" = the official full JPEG decode + PIL BICUBIC, bit-exact; "fast" =
    # JPEG DCT-domain downscale (PIL draft) while it stays >= the resize target, then torch's
    # uint8 antialiased bicubic: not bit-exact (docs/DATA.md). Labels/instances exact either way.
    image_resample: Literal["exact", "fast"] = "exact"
    batch_size: int = 1  # per rank
    num_workers: int = 2
    shuffle_buffer: int = 64  # samples held in each worker's shuffle buffer (see docs/DATA.md)
    seed: int = 0
    # Corrupt samples met while training are skipped and counted; above this fraction of the
    # samples read so far (after `corrupt_min_samples`) the run fails loudly.
    max_corrupt_fraction: float = 0.01
    corrupt_min_samples: int = 100
    pin_memory: bool = True

    @property
    def label_layout(self) -> LabelLayout:
        """The generator input's channel layout (semantic_nc, the one-hot group): the one place it is derived."""
        return LabelLayout(self.label_nc, self.contain_dontcare_label, self.no_instance)


@dataclass
class ModelConfig:
    netG: Literal["spade", "pix2pixhd"] = "spade"
    ngf: int = 64
    ndf: int = 64
    norm_G: str = "spectralspadesyncbatch3x3"
    norm_D: str = "spectralinstance"
    norm_E: str = "spectralinstance"
    num_upsampling_layers: Literal["normal", "more", "most"] = "normal"
    use_vae: bool = False
    z_dim: int = 256
    num_D: int = 2
    n_layers_D: int = 4
    init_type: Literal["xavier", "normal", "kaiming", "orthogonal", "xavier_uniform", "none"] = "xavier"
    init_variance: float = 0.02
    # pix2pixHD baseline generator options.
    resnet_n_downsample: int = 4
    resnet_n_blocks: int = 9
    resnet_kernel_size: int = 3
    resnet_initial_kernel_size: int = 7
    # Non-SPADE norm of the pix2pixHD generator. The official option default is 'instance', but its
    # norm helper only works with the 'spectral' prefix, so official runs use 'spectralinstance'.
    pix2pixhd_norm_G: str = "spectralinstance"


@dataclass
class SpeedConfig:
    """How the networks run, not what they compute: every switch keeps the parameters, the
    checkpoints and the results (up to float rounding; docs/MODELS.md, "Speed paths"). The rules
    between the switches are :func:`speed_checks` and the two properties below, nowhere else."""

    # SPADE's gamma and beta from one convolution, the label map resized once per resolution
    # (strided where it shrinks by whole factors), the generator's leaky ReLUs and residual sums in
    # place. false: the official code's order of operations (the reference layout).
    fused_modulation: bool = True
    # Networks and batches in channels-last memory format.
    channels_last: bool = False
    # SPADE's first convolution of the one-hot label map as a gather of weight columns. on / off
    # force it; auto times dense vs gather per SPADE layer shape on the first training batch, on
    # the training device, and keeps the faster. YAML's true / false read as on / off.
    onehot_gather: SpeedSwitch = "auto"
    # With the gather, each SPADE layer's gamma/beta once per uniform label region, convolved only
    # near region borders. on / off / auto as onehot_gather.
    region_modulation: SpeedSwitch = "auto"
    # Spectral-normed layers differentiate W / sigma in closed form (same forward, same state dict).
    fast_spectral_norm: bool = True
    # How the label map reaches the discriminator. dense: every semantic channel (the official
    # input); present: only the channels non-zero somewhere in the batch; gather: as present, and
    # the one-hot channels' part of D's full-resolution first conv as a gather.
    discriminator_labels: Literal["dense", "present", "gather"] = "gather"
    # The G step's discriminator pass (train/step.py): "joint" = the official single pass over
    # cat(fake, real); "separate" = the fake images with a graph, then the real ones without one
    # (exact: D is frozen there and the real features enter the losses detached). A D with batch
    # statistics, and a compiled one, always take the joint pass.
    g_step_real_pass: Literal["joint", "separate"] = "separate"
    # torch.compile the generator side and the discriminator (forward and, through AOTAutograd,
    # backward) in place: state-dict keys and checkpoints stay as in eager mode. The EMA copy runs eager.
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    # Memory for compute: generator = each SPADE residual block of G at >= 1/8 of the output width
    # keeps only its input and is recomputed in the backward (exact: BN statistics updated once, no
    # second spectral-norm power iteration; models/fast/checkpointing.py); generator_spade = also
    # each SPADE layer inside the full-resolution block (a third forward of those layers, less
    # memory); all = every block, the full-resolution block's SPADE layers nested, and, in the G
    # step, VGG19's slices and D on the fake recomputed too (train/step.py). off = autograd keeps
    # every activation. With compile the checkpointed parts run eagerly between compiled graphs (the
    # exact recomputation is eager; docs/TRAINING.md, speed.compile).
    activation_checkpointing: Literal["off", "generator", "generator_spade", "all"] = "off"

    @property
    def spade_paths(self) -> tuple[str, ...]:
        """The SPADE paths the switches allow, least to most specialised (``auto`` picks among them;
        outside training, and with ``train.deterministic``, the last one runs). The region path is
        built on the gather, and both read the label map the fused layout resizes once."""
        if not self.fused_modulation or self.onehot_gather == "off":
            return ("dense",)
        if self.region_modulation == "on":
            return ("region",)
        allowed = ("dense", "gather") if self.onehot_gather == "auto" else ("gather",)
        return allowed + (("region",) if self.region_modulation == "auto" else ())

    @property
    def separate_real_pass(self) -> bool:
        """Whether the G step may judge the real images in a pass of their own (the caller also
        checks that D judges images independently). A compiled D keeps the joint pass: a second
        batch size and mode made inductor recompile its graph with dynamic shapes, which failed in
        the D step's 2N batch."""
        return self.g_step_real_pass == "separate" and not self.compile


def speed_checks(speed: SpeedConfig) -> list[tuple[bool, str]]:
    """The switches that contradict each other (a forced path that could not run)."""
    return [
        (not (speed.onehot_gather == "off" and speed.region_modulation == "on"),
         "speed.region_modulation=on needs speed.onehot_gather on or auto (the region path is built on the gather)"),
        (speed.fused_modulation or "on" not in (speed.onehot_gather, speed.region_modulation),
         "speed.onehot_gather=on / speed.region_modulation=on need speed.fused_modulation=true (the gather and "
         "region paths read the label map the fused layout resizes once per resolution)"),
    ]


GanMode = Literal["hinge", "ls", "original", "w"]
GAN_MODES: tuple[str, ...] = get_args(GanMode)  # losses.GANLoss implements each


@dataclass
class LossConfig:
    gan_mode: GanMode = "hinge"
    lambda_feat: float = 10.0
    lambda_vgg: float = 10.0
    lambda_kld: float = 0.05
    no_ganFeat_loss: bool = False
    no_vgg_loss: bool = False
    # Local VGG19 weights (torchvision layout); env SPADE_VGG19_WEIGHTS is used when empty.
    vgg_weights: str = ""


@dataclass
class OptimConfig:
    lr: float = 0.0002
    beta1: float = 0.0
    beta2: float = 0.9
    no_TTUR: bool = False
    # Official schedule, in epochs: constant for `niter`, then linear decay to 0 over `niter_decay`.
    niter: int = 50
    niter_decay: int = 0
    D_steps_per_G: int = 1


HealthPolicy = Literal["warn", "rewind", "stop"]


@dataclass
class HealthConfig:
    """``train.health``: run-health signals and what each does when it fires (docs/HEALTH.md)."""

    enabled: bool = True
    # Non-finite streak: this many consecutive steps whose G or D update was skipped.
    nonfinite_streak: int = 20
    on_nonfinite: HealthPolicy = "stop"
    # Loss spike: a term's median over one logging interval above the running median of its last
    # spike_window per-step values by more than spike_mads robust deviations (1.4826 x MAD).
    spike_window: int = 200
    spike_mads: float = 20.0
    on_spike: HealthPolicy = "warn"
    # Gradient-norm explosion: the total gradient norm of G or D on a logging step above
    # grad_norm_ratio x the median of its last spike_window logging steps.
    grad_norm_ratio: float = 100.0
    on_grad_norm: HealthPolicy = "warn"
    # The D loss (D_Fake + D_real, mean over ranks) outside [saturation_d_loss, divergence_d_loss] for
    # d_loss_steps consecutive steps: below, D wins (saturation); above, training diverged (a healthy
    # hinge D loss starts near 2 and stays near it). Not judged with loss.gan_mode=w (unbounded).
    saturation_d_loss: float = 0.05
    divergence_d_loss: float = 20.0
    d_loss_steps: int = 20
    on_saturation: HealthPolicy = "warn"
    on_divergence: HealthPolicy = "stop"
    # Generator collapse: the EMA generator's output diversity on a fixed label batch below
    # collapse_ratio x the highest diversity of the run, checked every collapse_every steps
    # (0 = at train.sample_every).
    collapse_every: int = 0
    collapse_ratio: float = 0.1
    on_collapse: HealthPolicy = "warn"
    # Cross-rank drift: a checksum of parameters (and replicated buffers) compared across ranks every
    # consistency_every steps (0 = never).
    consistency_every: int = 100
    on_drift: HealthPolicy = "stop"
    # Policy rewind: restore the last healthy checkpoint in the running job and go on, with the
    # learning rates x these factors from then on; after max_rewinds rewinds within rewind_window
    # steps the next one stops instead.
    max_rewinds: int = 2
    rewind_window: int = 1000
    rewind_lr_factor_G: float = 1.0
    rewind_lr_factor_D: float = 1.0
    # Test-only fault injection (spade_dist/train/faults.py), from step debug_fault_step on: never set
    # in a real run.
    debug_fault: Literal["none", "nan", "lr_jump", "grad_scale", "d_saturate", "g_constant", "perturb_rank1"] = "none"
    debug_fault_step: int = 0


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    backend: Literal["ddp", "deepspeed"] = "ddp"
    zero_stage: int = 0
    # backend deepspeed: a JSON file merged into the generated DeepSpeed config (ZeRO buckets,
    # offload, communication, logging); keys spade-dist sets itself may not differ (docs/TRAINING.md).
    deepspeed_config: str = ""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_accum: int = 1
    # When > 0, the run stops after this many optimizer steps (overrides the epoch count).
    max_steps: int = 0
    # Global batch (per-rank batch x world size x accumulation); 0 = whatever the launch gives
    # (the per-rank batch is kept and the global batch follows the world size, also after an
    # elastic resize). When set, it must be divisible, otherwise the run fails at start.
    global_batch_size: int = 0
    # Which factor absorbs the world size when global_batch_size > 0 (read at every (re)start, so
    # an elastic resize keeps the global batch): "per_rank_batch" derives data.batch_size,
    # "grad_accum" keeps data.batch_size and derives the accumulation (train.grad_accum must stay 1).
    elastic_batch: Literal["per_rank_batch", "grad_accum"] = "per_rank_batch"
    # Timeout of every collective (world group, checkpoint control / writer groups, rendezvous
    # store): how long survivors wait for a lost peer before failing so that the launcher can
    # re-form the group. Must exceed the longest wait of a healthy rank on the slowest one
    # (checkpoint write, resume validation, sample writing, first compiled step).
    collective_timeout_s: float = 120.0
    seed: int = 0
    deterministic: bool = False
    ema_decay: float = 0.999
    ema_start_step: int = 0
    # SyncBN statistics group: "world" or "node" (ranks sharing LOCAL_WORLD_SIZE).
    syncbn_group: Literal["world", "node"] = "world"
    log_every: int = 10
    sample_every: int = 200
    num_sample_images: int = 8
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Audit trail: each rank appends every step's sample keys to <run_dir>/logs/keys-rank{R}.jsonl
    # ({"step", "epoch", "keys", "resumed_from", "world_size"} + "retired" / "repeats" when there are
    # any), e.g. to prove exactly-once data delivery across preemptions and elastic resizes (docs/ELASTIC.md).
    log_keys: bool = False
    cpu_threads: int = 0  # 0 = torch default
    # Fine-tuning: start G (and E when the file has one) from an official latest_net_G.pth (read with
    # this config's model options; latest_net_E.pth beside it is the encoder) or a spade-dist generator
    # file (spade-export / spade-convert). D and the optimizers start fresh. Only used when the run
    # starts without a checkpoint; a resumed run continues from its checkpoint. Empty = from scratch.
    init_generator: str = ""
    # Optional sha256 the init_generator file must have (a download that changed is refused).
    init_generator_sha256: str = ""
    # Experiment trackers through Accelerate's tracker API (rank 0): scalars every log_every steps and
    # the sample grids; "tensorboard" writes <run_dir>/tensorboard (spade_dist/train/trackers.py).
    trackers: list[Literal["tensorboard"]] = field(default_factory=list)
    health: HealthConfig = field(default_factory=HealthConfig)


@dataclass
class CheckpointConfig:
    every_steps: int = 1000
    every_minutes: float = 0.0
    keep_last: int = 3
    keep_every: int = 0  # milestone every K steps; 0 = none
    async_save: bool = True
    resume: str = "auto"  # auto | none | PATH
    signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGTERM"])
    requeue_exit_code: int = EXIT_REQUEUE  # 75, EX_TEMPFAIL (sysexits.h): "temporary failure, retry" = requeue me
    # A fresh start (resume none, or auto finding nothing usable) into a run directory that holds an
    # earlier run: refuse (exit 2) when it has checkpoints, or move the whole earlier run (checkpoints,
    # logs, samples, TensorBoard, FID results, report, markers) to <run_dir>/archive/<time>-previous-run/,
    # or delete it. An earlier run without checkpoints (nothing to resume) is archived under refuse.
    # Two runs in one directory would mix their logs, samples and report, and let retention and
    # spade-export pick the wrong run's checkpoints.
    existing: Literal["refuse", "archive", "delete"] = "refuse"
    # How many folders <run_dir>/archive/ keeps (earlier runs, invalid or superseded checkpoints); the
    # oldest go when a new one is added, and the log says what was deleted and how large it was.
    keep_archives: int = 2
    # A file whose appearance asks all ranks to checkpoint and stop, like a preemption signal. Batch
    # scripts create it (shared filesystem) because launchers do not forward every signal to workers.
    # Empty = <run_dir>/STOP.
    stop_file: str = ""


# Scores an evaluation job can compute (docs/EVALUATION.md): fid and kid from Inception features, miou
# and pixel_accuracy from a segmenter run on the generated images against their label maps.
EvalMetric = Literal["fid", "kid", "miou", "pixel_accuracy"]


@dataclass
class SegmenterConfig:
    """The segmentation network behind ``miou`` / ``pixel_accuracy`` (docs/EVALUATION.md, "Segmenters")."""

    # A local Hugging Face folder (save_pretrained: config.json + *.safetensors) or a TorchScript file
    # (torch.jit.save). Nothing is downloaded. Empty = no segmentation metrics.
    path: str = ""
    # Hugging Face only: the transformers class that loads the folder; empty = AutoModelForSemanticSegmentation.
    model_class: str = ""
    # Segmenter output class -> dataset label id: a shipped map (ade20k-150, cityscapes-19,
    # coco-stuff-182) or a YAML / JSON file; empty = output class k is label id k (data.label_nc classes).
    class_map: str = ""
    # [width, height] the images are resized to before the segmenter; empty = the evaluation resolution.
    input_size: list[int] = field(default_factory=list)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    # Input = (pixel - mean) / std per channel, pixels in 0..255, channels in channel_order.
    # Defaults: ImageNet statistics in RGB (the Hugging Face segmenters' preprocessing).
    mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    channel_order: Literal["rgb", "bgr"] = "rgb"


@dataclass
class EvalConfig:
    mode: Literal["none", "subprocess", "slurm"] = "none"
    policy: Literal["every", "newest", "every_k"] = "every"
    every_k: int = 1
    # What one evaluation job computes; miou / pixel_accuracy need eval.segmenter.path.
    metrics: list[EvalMetric] = field(default_factory=lambda: ["fid", "kid"])
    # The metric that picks eval/best.json (lower is better for fid / kid, higher for miou / pixel_accuracy).
    best_metric: EvalMetric = "fid"
    num_images: int = 0  # 0 = the whole validation split; else its first N samples
    batch_size: int = 8
    inception_weights: str = ""  # env SPADE_INCEPTION_WEIGHTS when empty
    # auto: the GPU when the evaluating machine has one (cuda:LOCAL_RANK), else cpu; or cpu / cuda / cuda:N.
    device: str = "auto"
    cpu_threads: int = 1
    kid_subset_size: int = 1000
    poll_seconds: float = 5.0
    # Opt-in: let torch-fidelity download its Inception weights when no local file is configured.
    allow_download: bool = False
    # Where real-image reference statistics are cached; empty = $SPADE_FID_CACHE or ~/.cache/spade-dist/fid-reference.
    reference_cache_dir: str = ""
    # How images reach the Inception network (docs/EVALUATION.md): "torch-fidelity" = TF1-style resize to
    # 299 (torch-fidelity's default); "pytorch-fid" = PyTorch bilinear resize and 2x/255-1 scaling, as
    # the pytorch-fid package does (the SPADE paper's FIDs). Part of the reference-statistics cache key.
    fid_protocol: Literal["torch-fidelity", "pytorch-fid"] = "torch-fidelity"
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)


@dataclass
class MetricsConfig:
    enabled: bool = False
    port_base: int = 9400  # rank r listens on port_base + local_rank; 0 = a free port
    bind: str = "127.0.0.1"
    sd_dir: str = ""  # file_sd target directory; empty = <run_dir>/metrics
    pushgateway: str = ""  # host:port, for short jobs
    run_name: str = ""  # label `run`; empty = basename of run_dir
    job_id: str = ""  # label `job_id`; empty = $TORCHELASTIC_RUN_ID, else $SLURM_JOB_ID, else "local"


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

INHERIT_KEY = "inherit"
_OVERRIDE_SOURCE = "<override>"


def resolve_config_file(name: Union[str, Path], folder: Optional[Path] = None) -> Path:
    """The config file ``name`` names: a file (relative to ``folder`` when given), else a shipped preset
    of that bare name (``tiny``, ``coco_stuff.yaml``); a ConfigError naming both places otherwise."""
    from spade_dist.resources import preset_names, shipped_config  # resources imports this module

    path = (folder / name) if folder is not None else Path(name)
    if path.is_file():
        return path.resolve()
    shipped = shipped_config(str(name))
    if shipped is not None:
        return shipped.resolve()
    where = f"{path.resolve()}" + (f" (inherit: in {folder})" if folder is not None else "")
    raise ConfigError(f"config file not found: {where}, and '{name}' is not a shipped preset "
                      f"({', '.join(preset_names())})")


def _read_yaml(path: Path, chain: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """Return [(mapping, source_name)] from the root ancestor down to ``path`` (an existing file)."""
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{path}: inheritance cycle: {' -> '.join(str(p) for p in chain + (path,))}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
                          "a config is a UTF-8 YAML file") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    layers: list[tuple[dict, str]] = []
    parent = data.pop(INHERIT_KEY, None)
    if parent is not None:
        parents = [parent] if isinstance(parent, str) else parent
        for p in parents:
            if not isinstance(p, str):
                raise ConfigError(f"{path}: inherit: expected a file or preset name, got {p!r}")
            layers += _read_yaml(resolve_config_file(p, path.parent), chain + (path,))
    layers.append((data, str(path)))
    return layers


# A value in a message is abbreviated: YAML aliases can make a small file a huge nested value (a
# "billion laughs" config), whose full repr would never finish.
def _shown(value: Any) -> str:
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 2, 4, 4, 80, 80
    return short.repr(value)


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if {"on", "off"} <= set(choices):
            # YAML 1.1 reads a bare on / off as a boolean; configs of earlier versions say true / false.
            if isinstance(value, bool):
                value = "on" if value else "off"
            elif value in ("true", "false"):
                value = "on" if value == "true" else "off"
        if value not in choices:
            raise ConfigError(f"{source}: {key}: invalid value {_shown(value)}; expected one of {list(choices)}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key, source)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{source}: {key}: invalid value {_shown(value)}")
    if origin is list:
        (inner,) = get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key}: expected a list, got {_shown(value)}")
        return [_coerce(v, inner, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{source}: {key}: expected true/false, got {_shown(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{source}: {key}: expected an integer, got {_shown(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: {key}: expected a number, got {_shown(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{source}: {key}: expected a string, got {_shown(value)}")
        return value
    raise ConfigError(f"{source}: {key}: unsupported annotation {tp!r}")


@dataclass(frozen=True)
class _OverrideValue:
    """A command-line value: its raw text and its YAML reading. String keys take the raw text, so
    ``train.mixed_precision=no`` stays "no" (YAML would read false) and ``metrics.job_id=1234`` a string."""

    raw: str
    parsed: Any


def _is_string_annotation(tp: Any) -> bool:
    if tp is str:
        return True
    if get_origin(tp) is Literal:
        return all(isinstance(c, str) for c in get_args(tp))
    return False


def _apply(obj: Any, mapping: dict, source: str, prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(
                f"{source}: unknown config key '{dotted}' (known in this section: {sorted(names)})"
            )
        current = getattr(obj, key)
        if isinstance(value, _OverrideValue):
            string_key = _is_string_annotation(hints[key]) and not isinstance(value.parsed, str)
            value = value.raw if string_key else value.parsed
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted}: expected a mapping (a config section), got {_shown(value)}")
            _apply(current, value, source, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, hints[key], dotted, source))


def parse_override(text: str) -> dict:
    """``"model.ngf=32"`` -> ``{"model": {"ngf": 32}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"{_OVERRIDE_SOURCE}: '{text}': expected dotted.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"{_OVERRIDE_SOURCE}: '{text}': bad key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{_OVERRIDE_SOURCE}: {key}: cannot parse value {raw!r}: {exc}") from exc
    nested: Any = _OverrideValue(raw.strip(), value) if not isinstance(value, (dict, list)) else value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    return move_deprecated_keys(nested, f"{_OVERRIDE_SOURCE} '{text}'", warn=True)


# Keys that moved to another section: the old spelling is still read, with a warning naming the new
# key, until the next release. Resolved configs stored by earlier versions carry the old spelling.
MOVED_KEYS: dict[tuple[str, str], tuple[str, str]] = {
    **{("model", k): ("speed", k) for k in ("fused_modulation", "channels_last", "onehot_gather", "region_modulation",
                                            "fast_spectral_norm", "discriminator_labels")},
    **{("train", k): ("speed", k) for k in ("g_step_real_pass", "compile", "compile_mode")},
}


def move_deprecated_keys(mapping: dict, source: str, warn: bool) -> dict:
    """``mapping`` (one YAML file, override or stored config) with the :data:`MOVED_KEYS` under their
    new names; ``warn``: log one line per moved key. The old and the new key with different values in
    the same mapping is a :class:`ConfigError`."""
    out = {section: dict(values) if isinstance(values, dict) else values for section, values in mapping.items()}
    for (old_section, key), (new_section, new_key) in MOVED_KEYS.items():
        values = out.get(old_section)
        if not isinstance(values, dict) or key not in values:
            continue
        value = values.pop(key)
        target = out.setdefault(new_section, {})
        if not isinstance(target, dict):
            continue  # `new_section: <not a mapping>` is reported by _apply, naming the section
        old, new = f"{old_section}.{key}", f"{new_section}.{new_key}"
        if new_key in target and target[new_key] != value:
            raise ConfigError(f"{source}: {old} (deprecated) and {new} are both set, to different values; keep {new}")
        target[new_key] = value
        if warn:
            log.warning(f"{source}: {old} is deprecated and read until the next release; use {new}")
    return out


def _range_checks(cfg: Config) -> list[tuple[bool, str]]:
    """Numeric ranges: a value outside them would crash later (a modulo by zero at the first logging
    step) or be silently meaningless (a negative step count, a requeue code of 0 = "success")."""
    t, c, o, d, m, e = cfg.train, cfg.checkpoint, cfg.optim, cfg.data, cfg.metrics, cfg.eval

    def at_least(key: str, value: float, low: float) -> tuple[bool, str]:
        return value >= low, f"{key} must be >= {low}, got {value}"

    return [
        at_least("train.log_every", t.log_every, 1),
        at_least("train.sample_every", t.sample_every, 1),
        at_least("train.health.nonfinite_streak", t.health.nonfinite_streak, 1),
        at_least("train.health.spike_window", t.health.spike_window, 8),
        (t.health.spike_mads > 0, f"train.health.spike_mads must be > 0, got {t.health.spike_mads}"),
        (t.health.grad_norm_ratio > 1, f"train.health.grad_norm_ratio must be > 1, got {t.health.grad_norm_ratio}"),
        at_least("train.health.d_loss_steps", t.health.d_loss_steps, 1),
        (0 <= t.health.saturation_d_loss < t.health.divergence_d_loss,
         "train.health.saturation_d_loss must be >= 0 and below train.health.divergence_d_loss, got "
         f"{t.health.saturation_d_loss} and {t.health.divergence_d_loss}"),
        at_least("train.health.collapse_every", t.health.collapse_every, 0),
        (0 <= t.health.collapse_ratio < 1, f"train.health.collapse_ratio must be in [0, 1), got {t.health.collapse_ratio}"),
        at_least("train.health.consistency_every", t.health.consistency_every, 0),
        at_least("train.health.debug_fault_step", t.health.debug_fault_step, 0),
        at_least("train.health.max_rewinds", t.health.max_rewinds, 0),
        at_least("train.health.rewind_window", t.health.rewind_window, 1),
        (0 < t.health.rewind_lr_factor_G <= 1 and 0 < t.health.rewind_lr_factor_D <= 1,
         "train.health.rewind_lr_factor_G / _D must be in (0, 1], got "
         f"{t.health.rewind_lr_factor_G}, {t.health.rewind_lr_factor_D}"),
        at_least("train.num_sample_images", t.num_sample_images, 1),
        at_least("train.max_steps", t.max_steps, 0),
        at_least("train.global_batch_size", t.global_batch_size, 0),
        at_least("train.ema_start_step", t.ema_start_step, 0),
        at_least("train.cpu_threads", t.cpu_threads, 0),
        at_least("checkpoint.every_steps", c.every_steps, 0),
        at_least("checkpoint.every_minutes", c.every_minutes, 0),
        at_least("checkpoint.keep_every", c.keep_every, 0),
        # 0 is success, 1 a generic failure, 2 a usage error, 74 an environment failure; above 125
        # the shell reserves codes (spade_dist/exit_codes.py).
        (not requeue_code_problem(c.requeue_exit_code),
         f"checkpoint.requeue_exit_code {requeue_code_problem(c.requeue_exit_code)}"),
        # 0 is allowed: it freezes the weights (a fine-tuning dry run keeps the initial generator).
        (o.lr >= 0 and math.isfinite(o.lr), f"optim.lr must be a finite number >= 0, got {o.lr}"),
        (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, f"optim.beta1 / optim.beta2 must be in [0, 1), got {o.beta1}, {o.beta2}"),
        at_least("optim.niter", o.niter, 0),
        at_least("optim.niter_decay", o.niter_decay, 0),
        (o.niter + o.niter_decay >= 1 or t.max_steps >= 1,
         "optim.niter + optim.niter_decay must be >= 1 unless train.max_steps is set"),
        at_least("data.shuffle_buffer", d.shuffle_buffer, 0),
        (0 <= d.max_corrupt_fraction <= 1, f"data.max_corrupt_fraction must be in [0, 1], got {d.max_corrupt_fraction}"),
        at_least("data.corrupt_min_samples", d.corrupt_min_samples, 0),
        (0 <= m.port_base <= 65535, f"metrics.port_base must be in 0..65535, got {m.port_base}"),
        (e.poll_seconds > 0, f"eval.poll_seconds must be > 0, got {e.poll_seconds}"),
        at_least("eval.num_images", e.num_images, 0),
        at_least("eval.batch_size", e.batch_size, 1),
    ]


SEGMENTATION_METRICS = ("miou", "pixel_accuracy")


def _eval_metric_checks(e: EvalConfig) -> list[tuple[bool, str]]:
    """eval.metrics / eval.best_metric / eval.segmenter: every key set must be one that is used."""
    seg = e.segmenter
    wants_segmenter = any(m in SEGMENTATION_METRICS for m in e.metrics)
    return [
        (bool(e.metrics), "eval.metrics must name at least one metric (fid, kid, miou, pixel_accuracy)"),
        (len(set(e.metrics)) == len(e.metrics), f"eval.metrics lists a metric twice: {e.metrics}"),
        (e.best_metric in e.metrics,
         f"eval.best_metric {e.best_metric!r} is not computed: set eval.best_metric to one of eval.metrics "
         f"{e.metrics}, or add it there"),
        (not wants_segmenter or bool(seg.path),
         f"eval.metrics {e.metrics} needs a segmenter: set eval.segmenter.path (a Hugging Face folder or a "
         "TorchScript file, docs/EVALUATION.md)"),
        (wants_segmenter or not seg.path,
         f"eval.segmenter.path is set ({seg.path}) but eval.metrics {e.metrics} has neither miou nor pixel_accuracy"),
        (len(seg.input_size) in (0, 2) and all(v >= 1 for v in seg.input_size),
         f"eval.segmenter.input_size must be [] or [width, height] >= 1, got {seg.input_size}"),
        (len(seg.mean) == 3, f"eval.segmenter.mean needs 3 values (one per channel), got {seg.mean}"),
        (len(seg.std) == 3 and all(v > 0 for v in seg.std),
         f"eval.segmenter.std needs 3 values > 0 (one per channel), got {seg.std}"),
    ]


def validate(cfg: Config, source: str = "<config>") -> None:
    """Cross-field checks that types cannot express."""
    checks: list[tuple[bool, str]] = [
        # An unset shell variable (train.run_dir=$RUN_DIR) would otherwise train into the current directory.
        (cfg.train.run_dir.strip() != "", "train.run_dir is empty (an unset shell variable?): name the run directory"),
        (cfg.checkpoint.resume.strip() != "", "checkpoint.resume is empty: auto, none or a checkpoint path"),
        (cfg.data.label_nc > 0, f"data.label_nc must be > 0, got {cfg.data.label_nc}"),
        (cfg.data.batch_size >= 1, f"data.batch_size must be >= 1, got {cfg.data.batch_size}"),
        (cfg.data.num_workers >= 0, f"data.num_workers must be >= 0, got {cfg.data.num_workers}"),
        (cfg.data.crop_size >= 8, f"data.crop_size must be >= 8, got {cfg.data.crop_size}"),
        (cfg.data.load_size >= cfg.data.crop_size or cfg.data.preprocess_mode in ("fixed", "none", "scale_width", "scale_shortside"),
         f"data.load_size ({cfg.data.load_size}) must be >= data.crop_size ({cfg.data.crop_size}) for {cfg.data.preprocess_mode}"),
        (cfg.data.aspect_ratio > 0, f"data.aspect_ratio must be > 0, got {cfg.data.aspect_ratio}"),
        (cfg.model.ngf >= 1 and cfg.model.ndf >= 1, "model.ngf and model.ndf must be >= 1"),
        (cfg.optim.D_steps_per_G >= 1, f"optim.D_steps_per_G must be >= 1, got {cfg.optim.D_steps_per_G}"),
        (cfg.train.grad_accum >= 1, f"train.grad_accum must be >= 1, got {cfg.train.grad_accum}"),
        (cfg.train.collective_timeout_s > 0,
         f"train.collective_timeout_s must be > 0, got {cfg.train.collective_timeout_s}"),
        (cfg.train.elastic_batch != "grad_accum" or cfg.train.global_batch_size > 0,
         "train.elastic_batch=grad_accum needs train.global_batch_size > 0 (the global batch to keep)"),
        (cfg.train.elastic_batch != "grad_accum" or cfg.train.grad_accum == 1,
         f"train.grad_accum={cfg.train.grad_accum}: with train.elastic_batch=grad_accum the accumulation is "
         "derived from train.global_batch_size; leave train.grad_accum at 1"),
        (cfg.train.elastic_batch != "grad_accum" or cfg.train.backend != "deepspeed",
         "train.elastic_batch=grad_accum is not supported with train.backend=deepspeed (no gradient accumulation)"),
        (0.0 <= cfg.train.ema_decay < 1.0, f"train.ema_decay must be in [0, 1), got {cfg.train.ema_decay}"),
        (cfg.train.zero_stage in (0, 1, 2), f"train.zero_stage must be 0, 1 or 2, got {cfg.train.zero_stage}"),
        (not cfg.train.deepspeed_config or cfg.train.backend == "deepspeed",
         f"train.deepspeed_config ({cfg.train.deepspeed_config}) needs train.backend=deepspeed, got {cfg.train.backend}"),
        (cfg.checkpoint.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {cfg.checkpoint.keep_last}"),
        (cfg.checkpoint.keep_archives >= 1,
         f"checkpoint.keep_archives must be >= 1, got {cfg.checkpoint.keep_archives} (checkpoint.existing=delete "
         "keeps no earlier run)"),
        (re.fullmatch(r"auto|cpu|cuda(:\d+)?", cfg.eval.device) is not None,
         f"eval.device must be auto, cpu, cuda or cuda:N, got {cfg.eval.device!r}"),
        (cfg.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}"),
        (cfg.eval.every_k >= 1, f"eval.every_k must be >= 1, got {cfg.eval.every_k}"),
        *_eval_metric_checks(cfg.eval),
        (not cfg.train.init_generator_sha256 or re.fullmatch(r"[0-9a-fA-F]{64}", cfg.train.init_generator_sha256),
         f"train.init_generator_sha256 must be 64 hex digits, got {cfg.train.init_generator_sha256!r}"),
        (not cfg.train.init_generator_sha256 or cfg.train.init_generator,
         "train.init_generator_sha256 is set but train.init_generator is empty"),
        (not cfg.train.init_generator or cfg.model.netG == "spade",
         f"train.init_generator needs model.netG=spade (official and exported generators), got {cfg.model.netG}"),
        (cfg.speed.activation_checkpointing == "off" or cfg.model.netG == "spade",
         f"speed.activation_checkpointing={cfg.speed.activation_checkpointing} needs model.netG=spade (the SPADE "
         f"residual blocks), got {cfg.model.netG}"),
        *_range_checks(cfg),
        *speed_checks(cfg.speed),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(f"{source}: {msg}")
    for name in cfg.checkpoint.signals:
        if not isinstance(getattr(signal, name, None), signal.Signals) or not name.startswith("SIG") or name.startswith("SIG_"):
            raise ConfigError(f"{source}: checkpoint.signals: unknown signal name {name!r} (e.g. SIGUSR1, SIGTERM)")
        if name in ("SIGKILL", "SIGSTOP"):
            raise ConfigError(f"{source}: checkpoint.signals: {name} cannot be caught")
    try:
        parse_spade_norm(cfg.model.norm_G)
    except ValueError as exc:
        raise ConfigError(f"{source}: model.norm_G: {exc}") from exc
    # D / E / pix2pixHD norms, checked up front so the error names the key.
    for key in ("norm_D", "norm_E", "pix2pixhd_norm_G"):
        try:
            parse_nonspade_norm(getattr(cfg.model, key))
        except ValueError as exc:
            raise ConfigError(f"{source}: model.{key}: {exc}") from exc


def load_config(path: Optional[Union[str, Path]] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load ``path`` (a file, or a shipped preset's name; with its ``inherit`` chain) into a
    :class:`Config`, then apply overrides."""
    cfg = Config()
    source = "<defaults>"
    if path is not None:
        for mapping, source in _read_yaml(resolve_config_file(path)):
            _apply(cfg, move_deprecated_keys(mapping, source, warn=True), source)
    for text in overrides or []:
        _apply(cfg, parse_override(text), f"{_OVERRIDE_SOURCE} '{text}'")
    validate(cfg, str(path) if path is not None else source)
    return cfg


# Keys that earlier versions accepted without any effect, then removed. Resolved configs stored in
# their checkpoints still carry them; config_from_dict drops them (a YAML file naming one is an error).
RETIRED_KEYS = {("model", "nef")}  # the official --nef is unused: the encoder's width is model.ngf


def config_from_dict(mapping: dict, source: str = "<dict>") -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. the resolved config in a checkpoint)."""
    cfg = Config()
    mapping = {section: ({k: v for k, v in values.items() if (section, k) not in RETIRED_KEYS}
                         if isinstance(values, dict) else values) for section, values in mapping.items()}
    _apply(cfg, move_deprecated_keys(mapping, source, warn=False), source)
    return cfg
