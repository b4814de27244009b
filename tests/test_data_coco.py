"""The loader on real shards: the COCO-Stuff sample sharded by data_tools (the producer of the format)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data_tools.shard import shard_dataset
from spade_dist.config import DataConfig
from spade_dist.data import build_eval_loader, build_train_loader


def test_coco_sample_shards_stream_with_exact_labels(coco_sample: Path, tmp_path: Path) -> None:
    for split in ("train", "val"):
        shard_dataset("coco-stuff", coco_sample, tmp_path, split, max_count=5, progress=False)
    # "none" = official power-of-32 resize, no crop, no flip in eval: each label must equal the
    # source PNG resized with PIL NEAREST (the source itself for 640x480).
    cfg = DataConfig(shards=str(tmp_path), preprocess_mode="none", load_size=64, crop_size=64, batch_size=1,
                     num_workers=2, label_nc=182, contain_dontcare_label=True, pin_memory=False)
    loader = build_train_loader(cfg)
    keys = [k for b in loader for k in b["key"]]
    assert sorted(keys) == sorted(p.stem for p in (coco_sample / "train_label").glob("*.png"))
    assert loader.corrupt_samples == 0
    seen = 0
    for batch in build_eval_loader(cfg, split="val"):
        key = batch["key"][0]
        for field, folder in (("label", "val_label"), ("instance", "val_inst")):
            source = Image.open(coco_sample / folder / f"{key}.png")
            w, h = source.size
            expected = np.asarray(source.resize((round(w / 32) * 32, round(h / 32) * 32), Image.NEAREST))
            np.testing.assert_array_equal(batch[field][0, 0].numpy(), expected.astype(np.int64))
        assert batch["image"].dtype == torch.uint8 and batch["image"].shape[2:] == batch["label"].shape[2:]
        seen += 1
    assert seen == 8


def test_jpeg_and_png_fast_decoders_give_pil_pixels(coco_sample: Path) -> None:
    """decode_image / decode_id_map use libjpeg-turbo (simplejpeg) and libspng (pyspng); the
    pixels must be those of the official PIL decode, or the exact mode would not be exact."""
    from spade_dist.data.decode import decode_id_map, decode_image

    for path in sorted((coco_sample / "val_img").glob("*.jpg")):
        data = path.read_bytes()
        reference = Image.open(path).convert("RGB")
        ours = decode_image(data, path.stem, "image.jpg", reference.size)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(reference))
        label_path = coco_sample / "val_label" / f"{path.stem}.png"
        np.testing.assert_array_equal(decode_id_map(label_path.read_bytes(), path.stem, "label.png"),
                                      np.asarray(Image.open(label_path)))
