"""eval.fid_protocol: the pytorch-fid resize checked against the pytorch-fid package itself on the
COCO-Stuff sample, the extractor that uses it, and the reference-statistics cache key."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
from torchvision.transforms import functional as TF

from spade_dist.config import DataConfig
from spade_dist.eval.evaluate import Evaluator
from spade_dist.eval.inception import build_inception, extract_features, make_test_inception_weights, pytorch_fid_input
from spade_dist.eval.reference_stats import dataset_fingerprint, preprocessing_key, reference_cache_name
from tests.kit import tiny_config


class _Captured(Exception):
    """Stops pytorch-fid's forward once its first block's input is seen (the weights do not matter)."""


@pytest.fixture(scope="module")
def pytorch_fid_model():
    """pytorch-fid's InceptionV3 without its weights download (offline): the loader returns the
    freshly built network's own state dict, so everything else is the package's code."""
    import pytorch_fid.inception as pfid

    built = []
    original = pfid._inception_v3
    mp = pytest.MonkeyPatch()
    mp.setattr(pfid, "_inception_v3", lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    mp.setattr(pfid, "load_state_dict_from_url", lambda *a, **k: built[-1].state_dict())
    try:
        model = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
    finally:
        mp.undo()
    return model


def _pytorch_fid_block_input(model, image: Image.Image) -> torch.Tensor:
    """The tensor pytorch-fid's first block receives for ``image`` loaded as its ImagePathDataset does."""
    seen = []

    def capture(_module, args):
        seen.append(args[0])
        raise _Captured

    handle = model.blocks[0].register_forward_pre_hook(capture)
    try:
        with pytest.raises(_Captured), torch.no_grad():
            model(TF.to_tensor(image).unsqueeze(0))  # pytorch-fid: ToTensor() of the PIL image
    finally:
        handle.remove()
    return seen[0]


def _coco_images(coco_sample: Path) -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted((coco_sample / "val_img").glob("*.jpg"))]


def _uint8(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).unsqueeze(0)


def test_pytorch_fid_input_equals_the_package_on_coco_sample(coco_sample: Path, pytorch_fid_model) -> None:
    images = _coco_images(coco_sample)
    assert len(images) == 8
    largest_gap = 0.0
    for image in images:
        for variant in (image, image.resize((256, 256), Image.BICUBIC)):  # native size and the 256 px eval size
            ours = pytorch_fid_input(_uint8(variant))
            theirs = _pytorch_fid_block_input(pytorch_fid_model, variant)
            assert ours.shape == theirs.shape == (1, 3, 299, 299)
            assert torch.equal(ours, theirs)
            # torch-fidelity's TF1-style resize of the same pixels: another protocol, visibly different
            tf1 = interpolate_bilinear_2d_like_tensorflow1x(_uint8(variant).float(), size=(299, 299), align_corners=False)
            largest_gap = max(largest_gap, float(((ours + 1) / 2 * 255 - tf1).abs().max()))
    assert largest_gap > 5.0  # grey levels


@pytest.fixture(scope="module")
def weights(tmp_path_factory, coco_sample: Path) -> Path:
    photos = torch.cat([_uint8(im.resize((32, 32))) for im in _coco_images(coco_sample)[:4]])
    return make_test_inception_weights(tmp_path_factory.mktemp("w") / "w.pth", photos, seed=0)


def test_pytorch_fid_protocol_feeds_the_network_pytorch_fids_input(weights: Path, coco_sample: Path) -> None:
    photos = torch.cat([_uint8(im.resize((48, 32))) for im in _coco_images(coco_sample)[:2]])
    net = build_inception(weights, protocol="pytorch-fid")
    first_conv_inputs = []
    net.extractor.Conv2d_1a_3x3.register_forward_hook(lambda _m, args, _out: first_conv_inputs.append(args[0]))
    features = extract_features(net, photos)
    torch.testing.assert_close(first_conv_inputs[0], pytorch_fid_input(photos), rtol=0, atol=0)
    assert torch.equal(extract_features(net, photos), features)  # deterministic
    other = extract_features(build_inception(weights, protocol="torch-fidelity"), photos)
    assert features.shape == other.shape == (2, 2048) and not torch.allclose(features, other)
    with pytest.raises(ValueError, match="unknown FID protocol 'tf'"):
        build_inception(weights, protocol="tf")


def test_cache_key_has_protocol_image_resample_and_shard_identity(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "x-val-000000.tar").write_bytes(b"a" * 1024)
    (shards / "manifest.json").write_text(json.dumps(
        {"dataset": "x", "label_nc": 3, "splits": {"val": {"shards": [{"file": "x-val-000000.tar"}]}}}))
    data = DataConfig(dataset="custom", val_shards=str(shards / "manifest.json"))
    fingerprint = dataset_fingerprint(data, "val")
    # the same manifest, the shard replaced by other bytes
    (shards / "x-val-000000.tar").write_bytes(b"b" * 2048)
    assert dataset_fingerprint(data, "val") != fingerprint
    exact, fast = DataConfig(image_resample="exact"), DataConfig(image_resample="fast")
    assert preprocessing_key(exact) != preprocessing_key(fast)
    names = {reference_cache_name("custom", "val", fingerprint, (64, 64), "p", 0, "w" * 64, protocol)
             for protocol in ("torch-fidelity", "pytorch-fid")}
    assert len(names) == 2 and any(n.endswith("-pytorch-fid.pt") for n in names)


def test_evaluator_reads_fid_protocol(tmp_path: Path, weights: Path, coco_sample: Path) -> None:
    photos = torch.cat([_uint8(im.resize((32, 32))) for im in _coco_images(coco_sample)[:3]])
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text(json.dumps({"dataset": "x", "label_nc": 3, "splits": {"val": {"shards": []}}}))
    cfg = tiny_config(f"data.val_shards={shards / 'manifest.json'}", f"eval.inception_weights={weights}",
                      "eval.fid_protocol=pytorch-fid")
    batch = {"image": photos, "key": [f"p{i}" for i in range(len(photos))]}
    ev = Evaluator(cfg, batches_factory=lambda: [batch], cache_dir=tmp_path / "cache", log=lambda _: None)
    assert ev.reference_cache_path.name.endswith("-pytorch-fid.pt") and ev.reference_cache_path.is_file()
    assert ev.reference.meta["fid_protocol"] == "pytorch-fid" and ev.reference.meta["image_resample"] == "exact"
    torch.testing.assert_close(ev.reference.features, extract_features(build_inception(weights, protocol="pytorch-fid"), photos))


class _LookupGenerator(torch.nn.Module):
    """Returns stored uint8 images: the label map of image i is filled with class i."""

    def __init__(self, images: torch.Tensor) -> None:
        super().__init__()
        self.images = images

    def forward(self, semantics: torch.Tensor) -> torch.Tensor:
        index = semantics[:, :, 0, 0].argmax(dim=1)
        return 2 * (self.images[index].float() + 0.5) / 255 - 1  # + 0.5: to_uint8_image truncates


def test_fid_and_kid_equal_torch_fidelity_on_folders_of_the_same_images(tmp_path: Path, weights: Path,
                                                                       coco_sample: Path) -> None:
    import torch_fidelity

    real = torch.cat([_uint8(im.resize((32, 32))) for im in _coco_images(coco_sample)])
    fake = torch.roll(torch.flip(real, dims=[3]), shifts=3, dims=0)
    keys = ["m4", "b1", "z9", "a0", "k3", "c2", "y8", "d5"]  # loader order is not file-name order
    labels = torch.arange(8).view(8, 1, 1, 1).expand(8, 1, 32, 32)
    batches = [{"image": real[i:i + 4], "label": labels[i:i + 4], "key": keys[i:i + 4]} for i in (0, 4)]
    (tmp_path / "manifest.json").write_text(json.dumps({"dataset": "x", "label_nc": 10, "splits": {"val": {"shards": []}}}))
    cfg = tiny_config(f"data.val_shards={tmp_path / 'manifest.json'}", f"eval.inception_weights={weights}",
                      "eval.kid_subset_size=4")  # random subsets of 4 of the 8: the feature order matters
    ours = Evaluator(cfg, batches_factory=lambda: batches, cache_dir=tmp_path / "cache",
                     log=lambda _: None).evaluate(_LookupGenerator(fake))

    for folder, images in (("fake", fake), ("real", real)):
        (tmp_path / folder).mkdir()
        for key, image in zip(keys, images):
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / folder / f"{key}.png")
    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "fake"), input2=str(tmp_path / "real"), fid=True, kid=True, kid_subset_size=4,
        feature_extractor_weights_path=str(weights), cuda=False, cache=False, verbose=False,
        save_cpu_ram=True)  # no loader worker processes (2-core CI)
    assert ours.fid == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6)
    assert ours.kid_mean == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-6)
    assert ours.kid_std == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-6)
