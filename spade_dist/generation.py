"""Generation from label maps: the one generator loader (every checkpoint format), input readers,
seeding and the ``spade-generate`` run (images + ``index.html`` gallery; inputs, preprocessing and
outputs are described in ``spade_dist.cli.generate``, which only parses arguments). ``spade-serve``,
``spade-export`` and the FID evaluator use the same loader.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from spade_dist.config import Config, load_config
from spade_dist.distributed import resolve_device
from spade_dist.files import UnsafeNameError, check_path_component
from spade_dist.labels import LabelError, check_label_ids, encode_semantics
from spade_dist.progress import progress_bar, progress_wanted
from spade_dist.resources import preset_names, preset_path
from spade_dist.visualize import GalleryRow, colorize_labels, save_image, to_uint8_image, write_gallery
from spade_dist.weights_file import WeightsFileError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# PIL modes that hold one integer per pixel (P: palette indices are the ids).
_INTEGER_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "1")


class GenerateError(ValueError):
    """A user-facing problem with the inputs of spade-generate."""


@dataclass
class LabelSample:
    key: str
    label_path: Path
    instance_path: Optional[Path]
    image_path: Optional[Path]


@dataclass
class LoadedModel:
    generator: torch.nn.Module
    encoder: Optional[torch.nn.Module]
    cfg: Config
    source: str


def resolve_config(preset: Optional[str], config_path: Optional[Path], overrides: Sequence[str]) -> Config:
    if preset and config_path:
        raise GenerateError("give either --preset or --config, not both")
    if preset:
        config_path = preset_path(preset)
    if config_path is None:
        raise GenerateError(
            f"an official checkpoint carries no model options: pass --preset {'|'.join(preset_names())} "
            "or --config FILE (plus overrides such as model.ngf=16 when the checkpoint differs from the preset)"
        )
    return load_config(config_path, list(overrides))


# ------------------------------------------------------------------------------------------------
# Model loading
# ------------------------------------------------------------------------------------------------


def _read_checkpoint(path: Path) -> object:
    from spade_dist.models.compat import read_weights_file

    if not path.is_file():
        raise GenerateError(f"checkpoint not found: {path}")
    try:
        # mmap: for an official checkpoint this read only sniffs the format; compat reads it again.
        return read_weights_file(path, mmap=True)
    except WeightsFileError as exc:
        raise GenerateError(f"{exc} (expected an official latest_net_G.pth, a spade-export generator file, or a "
                            "checkpoint step directory)") from exc


def _load_encoder(state: object, cfg: Config, source: str) -> torch.nn.Module:
    """ConvEncoder with the official layout, loaded strictly from an official ``net_E`` state dict."""
    from spade_dist.models import build_encoder
    from spade_dist.models.compat import load_encoder_state

    encoder = build_encoder(cfg, init=False)
    try:
        load_encoder_state(encoder, state, source, cfg)
    except ValueError as exc:
        raise GenerateError(str(exc)) from exc
    return encoder.eval()


def load_model(checkpoint: Path, encoder: Optional[Path] = None, preset: Optional[str] = None,
               config: Optional[Path] = None, overrides: Sequence[str] = (), use_ema: bool = True) -> LoadedModel:
    """The one generator loader, for every checkpoint format: a training run / checkpoint step
    directory (its EMA generator, or the raw one with ``use_ema=False``, and its config), a project
    generator file (carries its own config and maybe an encoder), or an official ``latest_net_G.pth``
    (model options from ``preset`` / ``config`` + ``overrides``). ``encoder``: an official
    ``latest_net_E.pth``. The generator (and encoder) come back in eval mode on the CPU."""
    checkpoint = Path(checkpoint)
    from spade_dist.models.compat import PROJECT_FORMAT, load_generator_file, load_official_generator

    if checkpoint.is_dir():  # a training run dir (newest committed) or a step dir: its EMA generator
        from spade_dist.checkpoint import load_generator_from_checkpoint

        try:
            generator, cfg = load_generator_from_checkpoint(checkpoint, use_ema=use_ema)
        except (FileNotFoundError, RuntimeError, KeyError, ValueError) as exc:
            raise GenerateError(f"{checkpoint}: cannot load a generator from this checkpoint: {exc}") from exc
        loaded_encoder = _load_encoder(_read_checkpoint(encoder), cfg, str(encoder)) if encoder else None
        return LoadedModel(generator.eval(), loaded_encoder, cfg, str(checkpoint))
    payload = _read_checkpoint(checkpoint)
    source = str(checkpoint)
    encoder_state: object = None
    encoder_source = ""
    if isinstance(payload, dict) and payload.get("format") == PROJECT_FORMAT:
        if preset or config or overrides:
            print(f"spade-generate: note: {source} carries its own config; --preset/--config/overrides are ignored",
                  file=sys.stderr)
        generator, cfg = load_generator_file(checkpoint)
        if payload.get("encoder") is not None:
            encoder_state, encoder_source = payload["encoder"], f"{source}:encoder"
    else:
        cfg = resolve_config(preset, config, overrides)
        if cfg.model.netG != "spade":
            raise GenerateError(f"official checkpoints are SPADE generators; the config says model.netG={cfg.model.netG}")
        d, m = cfg.data, cfg.model
        generator = load_official_generator(
            checkpoint, label_nc=d.label_nc, contain_dontcare_label=d.contain_dontcare_label,
            no_instance=d.no_instance, ngf=m.ngf, crop_size=d.crop_size, aspect_ratio=d.aspect_ratio,
            num_upsampling_layers=m.num_upsampling_layers, use_vae=m.use_vae, z_dim=m.z_dim, norm_G=m.norm_G,
            speed=cfg.speed,
        )
    if encoder is not None:
        encoder_state, encoder_source = _read_checkpoint(encoder), str(encoder)
    loaded_encoder = _load_encoder(encoder_state, cfg, encoder_source) if encoder_state is not None else None
    return LoadedModel(generator.eval(), loaded_encoder, cfg, source)


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def sample_key(stem: str) -> str:
    """Same rule as the shards (docs/FORMATS.md): the stem with '.' replaced by '_'."""
    return stem.replace(".", "_")


def _find_by_stem(folder: Path, stem: str, suffixes: Sequence[str]) -> Optional[Path]:
    for suffix in suffixes:
        for candidate in (folder / f"{stem}{suffix}", folder / f"{stem}{suffix.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def discover_samples(labels: Path, instances: Optional[Path], images: Optional[Path], needs_instance: bool,
                     limit: int = 0) -> list[LabelSample]:
    for flag, folder in (("--instances", instances), ("--images", images)):
        if folder is not None and not folder.is_dir():
            raise GenerateError(f"{flag}: folder not found: {folder}")
    if labels.is_file():
        label_files = [labels]
    elif labels.is_dir():
        label_files = sorted(p for p in labels.iterdir() if p.is_file() and p.suffix.lower() == ".png")
        if not label_files:
            raise GenerateError(f"--labels: no .png label maps in {labels}")
    else:
        raise GenerateError(f"--labels: path not found: {labels}")
    if limit > 0:
        label_files = label_files[:limit]
    if needs_instance and instances is None:
        raise GenerateError(
            "this model uses the instance-edge channel (data.no_instance=false): pass --instances DIR with instance "
            "PNGs named like the labels"
        )
    samples: list[LabelSample] = []
    seen: dict[str, Path] = {}
    for label_path in label_files:
        key = sample_key(label_path.stem)
        if key in seen:
            raise GenerateError(f"labels {seen[key]} and {label_path} map to the same key '{key}'")
        seen[key] = label_path
        instance_path = None
        if needs_instance and instances is not None:
            instance_path = _find_by_stem(instances, label_path.stem, (".png",))
            if instance_path is None:
                raise GenerateError(f"--instances: no instance map {instances / (label_path.stem + '.png')} "
                                    f"for label {label_path}")
        image_path = _find_by_stem(images, label_path.stem, IMAGE_SUFFIXES) if images is not None else None
        if images is not None and image_path is None:
            print(f"spade-generate: note: no real image for {label_path.name} in {images}", file=sys.stderr)
        samples.append(LabelSample(key, label_path, instance_path, image_path))
    return samples


def generation_size(cfg: Config) -> tuple[int, int]:
    """(height, width) the label maps are resized to: crop_size wide, crop_size / aspect_ratio high."""
    width = cfg.data.crop_size
    return int(round(width / cfg.data.aspect_ratio)), width


def read_integer_map(path: Union[Path, BinaryIO], size_hw: tuple[int, int], what: str,
                     check_ids: Optional[tuple[int, bool]] = None, name: Optional[str] = None) -> torch.Tensor:
    """Single-channel PNG -> int64 1 x 1 x H x W, resized with nearest neighbour (ids never blended).

    ``path`` may be an open binary file (an upload); ``name`` is then what error messages call it.
    ``check_ids=(label_nc, contain_dontcare_label)`` validates the ids at full resolution, before the
    resize could drop a small region holding a bad id."""
    if name is None:
        name = str(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in _INTEGER_MODES:
                raise GenerateError(
                    f"{name}: {what} must be a single-channel integer PNG (mode L, P, I or I;16), got mode {img.mode}"
                )
            if img.mode == "1":
                img = img.convert("L")
            if img.mode.startswith("I;16"):
                img = img.convert("I")  # PIL resizes 32-bit integer images; values kept
            if check_ids is not None:
                full = torch.from_numpy(np.array(img, dtype=np.int64))
                try:
                    check_label_ids(full.view(1, 1, *full.shape), *check_ids)
                except LabelError as exc:
                    raise GenerateError(f"{name}: {exc}") from exc
            resized = img.resize((size_hw[1], size_hw[0]), Image.NEAREST)
            array = np.array(resized, dtype=np.int64)
    except (UnidentifiedImageError, OSError) as exc:
        raise GenerateError(f"{name}: cannot read {what} PNG: {exc}") from exc
    return torch.from_numpy(array).view(1, 1, *array.shape)


def read_photo(path: Union[Path, BinaryIO], size_hw: tuple[int, int], name: Optional[str] = None) -> torch.Tensor:
    """RGB photo (a path or an open binary file called ``name``) -> uint8 3 x H x W resized bicubically
    (the official image interpolation)."""
    try:
        with Image.open(path) as img:
            rgb = img.convert("RGB").resize((size_hw[1], size_hw[0]), Image.BICUBIC)
            array = np.array(rgb, dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as exc:
        raise GenerateError(f"{name or path}: cannot read image: {exc}") from exc
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def photo_to_model_input(photo_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 3 x H x W -> float 1 x 3 x H x W in [-1, 1] (official Normalize(0.5, 0.5))."""
    return (photo_uint8.float() / 255.0 - 0.5) / 0.5


# ------------------------------------------------------------------------------------------------
# Generation
# ------------------------------------------------------------------------------------------------


def label_seed(seed: int, key: str) -> int:
    """Seed of one label map's z draws. Per label (its key mixed in), so a label's images do not depend
    on which other labels are generated with it; ``spade-serve`` uses the same rule."""
    return seed * 1_000_003 + zlib.crc32(key.encode())


def latent_codes(model: LoadedModel, count: int, style: Optional[torch.Tensor], rng: torch.Generator,
                 device: torch.device) -> Optional[torch.Tensor]:
    """``count`` z vectors for a VAE generator: from the style image's posterior, else N(0, 1)."""
    if not getattr(model.generator, "use_vae", False):
        return None
    z_dim = model.cfg.model.z_dim
    if style is None:
        return torch.randn(count, z_dim, generator=rng, device=device)
    from spade_dist.models.encoder import reparameterize

    assert model.encoder is not None
    mu, logvar = model.encoder(style.to(device))
    return reparameterize(mu.expand(count, -1), logvar.expand(count, -1), generator=rng)


@dataclass
class GenerationInput:
    """One label map ready for the generator, with what the gallery shows beside it."""

    key: str
    label: torch.Tensor  # int64 1 x 1 x H x W
    instance: Optional[torch.Tensor]  # int64 1 x 1 x H x W, or None
    real: Optional[torch.Tensor]  # uint8 3 x H x W, or None
    source: str  # for error messages


def folder_inputs(samples: Sequence[LabelSample], cfg: Config) -> Iterator[GenerationInput]:
    """Label / instance / photo files -> inputs resized to the generation size (see module doc)."""
    size_hw = generation_size(cfg)
    for sample in samples:
        label = read_integer_map(sample.label_path, size_hw, "label map",
                                 check_ids=(cfg.data.label_nc, cfg.data.contain_dontcare_label))
        instance = (read_integer_map(sample.instance_path, size_hw, "instance map")
                    if sample.instance_path is not None else None)
        real = read_photo(sample.image_path, size_hw) if sample.image_path is not None else None
        yield GenerationInput(sample.key, label, instance, real, str(sample.label_path))


def shard_inputs(args: argparse.Namespace, cfg: Config) -> Iterator[GenerationInput]:
    """Samples of a shard split through the project's eval loader (official test-mode preprocessing:
    no flip, resize to crop size), one at a time, real photo included."""
    from spade_dist.data import build_eval_loader

    data_cfg = dataclasses.replace(cfg.data, val_shards=args.shards, batch_size=1, num_workers=0, pin_memory=False)
    if args.manifest is not None:
        data_cfg = dataclasses.replace(data_cfg, manifest=str(args.manifest))
    loader = build_eval_loader(data_cfg, split=args.split or cfg.data.val_split, batch_size=1)
    for count, batch in enumerate(loader):
        if args.limit and count >= args.limit:
            break
        key = batch["key"][0]
        yield GenerationInput(key, batch["label"], None if cfg.data.no_instance else batch["instance"],
                              batch["image"][0], f"{args.shards} sample '{key}'")


def _batches(items: Iterator[GenerationInput], size: int) -> Iterator[list[GenerationInput]]:
    batch: list[GenerationInput] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def run(args: argparse.Namespace, overrides: Sequence[str] = ()) -> list[GalleryRow]:
    """``spade-generate`` with its parsed arguments (``overrides``: the config overrides for an official checkpoint)."""
    if args.num_per_label < 1:
        raise GenerateError(f"--num-per-label must be >= 1, got {args.num_per_label}")
    if args.batch_size < 1:
        raise GenerateError(f"--batch-size must be >= 1, got {args.batch_size}")
    device = resolve_device(args.device, key="--device")
    model = load_model(args.checkpoint, args.encoder, args.preset, args.config, overrides)
    cfg = model.cfg
    is_vae = bool(getattr(model.generator, "use_vae", False))
    if args.num_per_label > 1 and not is_vae:
        raise GenerateError(
            f"--num-per-label {args.num_per_label}: this generator is deterministic (use_vae=false, no z); "
            "only a VAE generator gives different images per label"
        )
    if args.style_image is not None:
        if not is_vae:
            raise GenerateError("--style-image needs a VAE generator (use_vae=true); this one takes no z")
        if model.encoder is None:
            raise GenerateError(
                f"--style-image needs the VAE encoder, and {model.source} has none: pass --encoder latest_net_E.pth "
                "(official) or use a spade-dist generator file that includes an 'encoder' entry"
            )
        if not args.style_image.is_file():
            raise GenerateError(f"--style-image: file not found: {args.style_image}")

    size_hw = generation_size(cfg)
    style = photo_to_model_input(read_photo(args.style_image, size_hw)).unsqueeze(0) if args.style_image else None
    if args.shards:
        inputs, total = shard_inputs(args, cfg), (args.limit or None)
    else:
        samples = discover_samples(args.labels, args.instances, args.images, not cfg.data.no_instance, args.limit)
        inputs, total = folder_inputs(samples, cfg), len(samples)

    generator = model.generator.to(device)
    encoder = model.encoder.to(device) if model.encoder is not None else None
    model = LoadedModel(generator, encoder, cfg, model.source)
    out = args.out
    for sub in ("images", "labels", "real"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    rows: list[GalleryRow] = []
    bar = progress_bar(total=total, desc="spade-generate", unit="label", enabled=progress_wanted(not args.no_progress))
    with torch.inference_mode(), bar:
        for chunk in _batches(inputs, args.batch_size):
            semantics, codes = [], []
            for item in chunk:
                try:
                    semantics.append(encode_semantics(
                        item.label.to(device), item.instance.to(device) if item.instance is not None else None,
                        cfg.data.label_layout,
                    ).expand(args.num_per_label, -1, -1, -1))
                except LabelError as exc:
                    raise GenerateError(f"{item.source}: {exc}") from exc
                # Per-label seed: a label's images depend neither on the other labels nor on the batching.
                rng = torch.Generator(device=device).manual_seed(label_seed(args.seed, item.key))
                codes.append(latent_codes(model, args.num_per_label, style, rng, device))
            z = torch.cat(codes) if codes[0] is not None else None
            fakes = to_uint8_image(generator(torch.cat(semantics), z=z))
            for i, item in enumerate(chunk):
                rows.append(_write_outputs(out, item, fakes[i * args.num_per_label:(i + 1) * args.num_per_label], cfg))
            bar.update(len(chunk))
    if not rows:
        raise GenerateError(f"no samples to generate from ({args.shards or args.labels})")

    source = f"shards: {args.shards} (split {args.split or cfg.data.val_split})" if args.shards else f"labels: {args.labels}"
    notes = [
        f"checkpoint: {model.source}",
        f"{source}; size {size_hw[1]}x{size_hw[0]}; seed {args.seed}; "
        f"{args.num_per_label} image(s) per label" + (f"; style: {args.style_image}" if args.style_image else ""),
    ]
    write_gallery(out / "index.html", "spade-generate", rows, notes=notes)
    return rows


def _write_outputs(out: Path, item: GenerationInput, fakes: torch.Tensor, cfg: Config) -> GalleryRow:
    """One label's PNGs (colourised label, generated images, real photo) and its gallery row."""
    cells: list[tuple[str, Path]] = []
    # The key becomes file names below: a key from a crafted shard must not leave --out.
    try:
        check_path_component(item.key, item.source)
    except UnsafeNameError as exc:
        raise GenerateError(str(exc)) from None
    label_png = save_image(colorize_labels(item.label, cfg.data.label_nc, cfg.data.dataset)[0], out / "labels" / f"{item.key}.png")
    cells.append(("label", label_png.relative_to(out)))
    for k in range(fakes.shape[0]):
        path = save_image(fakes[k], out / "images" / f"{item.key}_{k}.png")
        cells.append((f"generated {k}", path.relative_to(out)))
    if item.real is not None:
        real_png = save_image(item.real, out / "real" / f"{item.key}.png")
        cells.append(("real", real_png.relative_to(out)))
    return GalleryRow(caption=item.key, images=cells)


