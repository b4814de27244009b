"""Semantic fidelity (mIoU, pixel accuracy): the confusion matrix and scores against independent
implementations, class maps, segmenters loaded from local files (TorchScript, Hugging Face folders),
an oracle segmenter end to end through the Evaluator, bad inputs, and the protocol record."""
from __future__ import annotations

import json
from pathlib import Path
from typing import get_args

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spade_dist.cli.eval import main as eval_main
from spade_dist.config import ConfigError, DataConfig, EvalMetric, SegmenterConfig, load_config
from spade_dist.eval.class_map import ClassMapError, identity_map, load_class_map, parse_class_map
from spade_dist.eval.compare import ScoreRow, format_table
from spade_dist.eval.evaluate import Evaluator
from spade_dist.eval.launch import check_eval_inputs
from spade_dist.eval.protocol import build_protocol, protocol_hashes
from spade_dist.eval.report import write_fid_page
from spade_dist.eval.scores import METRICS, best_record
from spade_dist.eval.segmentation import confusion_matrix, segmentation_scores, target_classes
from spade_dist.eval.segmenter import Segmenter, SegmenterError, load_segmenter
from tests.kit import TOY_LABELS, tiny_config, write_shards

STEP = 20  # the colour code below: class k is grey level 20 k + 10


class ColourGenerator(nn.Module):
    """A 'generator' whose image encodes the class: grey level 20 k + 10 for class k (so an oracle
    segmenter can read the label map back), 250 for the don't-care channel."""

    def __init__(self, label_nc: int) -> None:
        super().__init__()
        self.label_nc = label_nc

    def forward(self, semantics: torch.Tensor) -> torch.Tensor:
        k = semantics[:, : self.label_nc + 1].argmax(dim=1, keepdim=True).float()
        level = STEP * k + 10.5  # + 0.5: to_uint8_image truncates
        return (2 * level / 255 - 1).expand(-1, 3, -1, -1)


class Oracle(nn.Module):
    """Reads the class from the grey level; ``perm`` relabels its answer (identity: the true map)."""

    def __init__(self, classes: int, perm: torch.Tensor) -> None:
        super().__init__()
        self.classes = classes
        self.register_buffer("perm", perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = ((x[:, 0] - 10) / 20).round().clamp(0, self.classes - 1).long()
        return F.one_hot(self.perm[k], self.classes).permute(0, 3, 1, 2).float()


def save_oracle(path: Path, classes: int = 8, perm: list[int] | None = None) -> Path:
    order = torch.tensor(perm if perm is not None else list(range(classes)))
    torch.jit.script(Oracle(classes, order)).save(str(path))
    return path


def toy_config(tmp_path: Path, segmenter: Path, *overrides: str):
    """Toy shards (8 classes + 255 rows, 8 x 8 evaluation crops) scored by ``segmenter`` on raw pixels."""
    manifest = tmp_path / "shards" / "manifest.json"
    if not manifest.is_file():
        write_shards(tmp_path / "shards", [4], split="val")
    return tiny_config(*TOY_LABELS, f"data.val_shards={manifest}", "data.load_size=12", "data.crop_size=8",
                       "data.pin_memory=false", "eval.metrics=[miou,pixel_accuracy]", "eval.best_metric=miou",
                       f"eval.segmenter.path={segmenter}", "eval.segmenter.mean=[0,0,0]", "eval.segmenter.std=[1,1,1]",
                       f"eval.reference_cache_dir={tmp_path / 'cache'}", *overrides)


# ------------------------------------------------------------------------------ the scores


def _numpy_scores(pred: np.ndarray, target: np.ndarray, n: int) -> tuple[np.ndarray, float, float]:
    """DRN's / FCN's fast_hist + per_class_iu + nanmean, written out in numpy."""
    keep = (target >= 0) & (target < n)
    hist = np.bincount(n * target[keep] + pred[keep], minlength=n * n).reshape(n, n)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.diag(hist) / (hist.sum(1) + hist.sum(0) - np.diag(hist))
    return hist, float(np.nanmean(iou)), float(np.diag(hist).sum() / hist.sum())


def test_confusion_and_scores_equal_independent_implementations() -> None:
    from torchmetrics.classification import MulticlassConfusionMatrix

    gen = torch.Generator().manual_seed(0)
    classes = 7
    labels = torch.randint(0, 9, (4, 1, 16, 12), generator=gen)  # label ids 0..8
    labels[:, :, :2] = 255  # don't care
    # Output k is label id k + 1 (ids 0 and 8 are in no entry: ignored); output 6 is not scored.
    class_map = parse_class_map({"classes": [1, 2, 3, 4, 5, 6, None]}, "test")
    target = target_classes(labels, class_map.target_lookup(9, torch.device("cpu")))
    pred = torch.randint(0, classes, target.shape, generator=gen)
    ours = confusion_matrix(pred, target, classes)
    assert ours.dtype == torch.int64

    hist, _, _ = _numpy_scores(pred.numpy().ravel(), target.numpy().ravel(), classes)
    np.testing.assert_array_equal(ours.numpy(), hist)
    reference = MulticlassConfusionMatrix(num_classes=classes, ignore_index=-1)(pred, target)
    assert torch.equal(ours, reference.to(torch.int64))
    # Counted pixels: exactly those whose label id has an entry.
    assert int(ours.sum()) == int(((labels >= 1) & (labels <= 6)).sum())

    scores = segmentation_scores(ours, class_map)
    scored = class_map.scored
    counts = hist[np.ix_(scored + [6], scored + [6])]  # an unscored prediction still counts as a wrong pixel
    iou = np.diag(hist)[scored] / (hist.sum(1)[scored] + hist.sum(0)[scored] - np.diag(hist)[scored])
    assert scores.miou == pytest.approx(float(np.nanmean(iou)), rel=1e-12)
    assert scores.pixel_accuracy == pytest.approx(np.diag(counts).sum() / counts.sum(), rel=1e-12)
    assert list(scores.class_iou) == ["1", "2", "3", "4", "5", "6"]

    # The whole-map case equals the plain numpy implementation of the benchmarks' code exactly.
    full = identity_map(classes)
    flat_target = torch.randint(-1, classes, (5000,), generator=gen)
    flat_pred = torch.randint(0, classes, (5000,), generator=gen)
    _, miou, accuracy = _numpy_scores(flat_pred.numpy(), flat_target.numpy(), classes)
    got = segmentation_scores(confusion_matrix(flat_pred, flat_target, classes), full)
    assert got.miou == pytest.approx(miou, rel=1e-12) and got.pixel_accuracy == pytest.approx(accuracy, rel=1e-12)


def test_a_class_absent_from_the_ground_truth_counts_only_when_predicted() -> None:
    full = identity_map(3)
    target = torch.tensor([0, 0, 1, 1])
    perfect = segmentation_scores(confusion_matrix(target.clone(), target, 3), full)
    assert perfect.miou == 1.0 and perfect.class_iou["2"] is None  # never present, never predicted: left out
    wrong = segmentation_scores(confusion_matrix(torch.tensor([0, 2, 1, 1]), target, 3), full)
    assert wrong.class_iou == {"0": 0.5, "1": 1.0, "2": 0.0} and wrong.miou == pytest.approx(0.5)
    assert wrong.pixel_accuracy == 0.75


# ------------------------------------------------------------------------------ class maps


def test_shipped_class_maps_fit_their_presets_and_map_cityscapes_train_ids(repo_root: Path) -> None:
    sizes = {"ade20k-150": ("ade20k", 150), "coco-stuff-182": ("coco_stuff", 182), "cityscapes-19": ("cityscapes", 19)}
    for name, (preset, outputs) in sizes.items():
        cfg = load_config(repo_root / "configs" / f"{preset}.yaml")
        class_map = load_class_map(name, cfg.data)
        assert class_map.num_outputs == outputs and len(set(class_map.names)) == outputs
        assert cfg.eval.segmenter.class_map == name  # the preset names its paper segmenter's map
    city = load_class_map("cityscapes-19", load_config(repo_root / "configs" / "cityscapes.yaml").data)
    lookup = city.target_lookup(35, torch.device("cpu"))
    assert lookup[7] == 0 and lookup[33] == 18 and lookup[24] == 11  # road, bicycle, person
    assert all(lookup[i] == -1 for i in (0, 1, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34, 255))  # ignoreInEval ids
    ade = load_class_map("ade20k-150", load_config(repo_root / "configs" / "ade20k.yaml").data)
    assert ade.names[0] == "wall" and ade.label_ids[149] == 149 and ade.target_lookup(150, torch.device("cpu"))[255] == -1
    with pytest.raises(ClassMapError, match="is for dataset 'cityscapes', but data.dataset is 'ade20k'"):
        load_class_map("cityscapes-19", load_config(repo_root / "configs" / "ade20k.yaml").data)


def test_class_map_files_name_their_problem(tmp_path: Path) -> None:
    data = DataConfig(label_nc=8)
    path = tmp_path / "map.yaml"
    for content, message in [
        ("classes: [0, 1, 40]", r"output class 2 \(40\) is label id 40, which is not a class of data.label_nc=8"),
        ("classes: [0, 1, 1]", r"label ids \[1\] are named by several output classes"),
        ("classes: [0, {id: 2, colour: red}]", r"classes\[1\] must be"),
        ("label_nc: 9\nclasses: [0]", "is for label_nc 9, but data.label_nc is 8"),
        ("classes: [null]", "no output class is scored"),
        ("classes: [0, 1]\nextra: 1", r"unknown keys \['extra'\]"),
    ]:
        path.write_text(content)
        with pytest.raises(ClassMapError, match=message) as info:
            load_class_map(str(path), data)
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "map.json").write_text(json.dumps({"classes": [{"id": 3, "name": "sky"}, 5]}))
    class_map = load_class_map(str(tmp_path / "map.json"), data)
    assert class_map.label_ids == (3, 5) and class_map.names == ("sky", "5")
    with pytest.raises(ClassMapError, match="neither a file nor a shipped map"):
        load_class_map(str(tmp_path / "absent.yaml"), data)


# ------------------------------------------------------------------------------ segmenters


def test_preprocessing_is_channel_order_resize_then_normalise(tmp_path: Path) -> None:
    cfg = SegmenterConfig(path=str(save_oracle(tmp_path / "o.pt")), input_size=[6, 4], interpolation="bilinear",
                          mean=[1.0, 2.0, 3.0], std=[2.0, 4.0, 8.0], channel_order="bgr")
    segmenter = Segmenter(cfg, identity_map(8), "cpu")
    images = torch.randint(0, 256, (2, 3, 10, 12), dtype=torch.uint8)
    expected = F.interpolate(images.float().flip(1), size=(4, 6), mode="bilinear", align_corners=False, antialias=True)
    expected = (expected - torch.tensor([1.0, 2.0, 3.0]).view(1, 3, 1, 1)) / torch.tensor([2.0, 4.0, 8.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(segmenter.preprocess(images), expected, rtol=0, atol=0)
    # Scores come back at the images' own size whatever the segmenter's input size.
    assert segmenter.scores(images).shape == (2, 8, 10, 12)


def _tiny_segformer(path: Path, num_labels: int) -> Path:
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                          patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 1], mlp_ratios=[2, 2],
                          decoder_hidden_size=16, num_labels=num_labels)
    SegformerForSemanticSegmentation(cfg).save_pretrained(path)
    return path


def _tiny_mask2former(path: Path, num_labels: int) -> Path:
    from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, SwinConfig

    torch.manual_seed(0)
    backbone = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                          window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    cfg = Mask2FormerConfig(backbone_config=backbone, num_labels=num_labels, hidden_dim=32, mask_feature_size=32,
                            feature_size=32, num_queries=4, encoder_layers=1, decoder_layers=2,
                            encoder_feedforward_dim=32, dim_feedforward=32, num_attention_heads=2, common_stride=4,
                            use_pretrained_backbone=False)
    Mask2FormerForUniversalSegmentation(cfg).save_pretrained(path)
    return path


def test_huggingface_folders_load_through_the_real_path(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    segformer = _tiny_segformer(tmp_path / "segformer", num_labels=8)
    segmenter = load_segmenter(SegmenterConfig(path=str(segformer)), identity_map(8), "cpu", (32, 32))
    assert segmenter.format == "huggingface" and type(segmenter.model).__name__ == "SegformerForSemanticSegmentation"
    assert segmenter.predict(images).shape == (2, 32, 32)
    assert segmenter.protocol()["model_class"] == "AutoModelForSemanticSegmentation"
    # Mask classification (class + mask queries), named by eval.segmenter.model_class.
    m2f = _tiny_mask2former(tmp_path / "m2f", num_labels=5)
    cfg = SegmenterConfig(path=str(m2f), model_class="Mask2FormerForUniversalSegmentation")
    mask_segmenter = load_segmenter(cfg, identity_map(5), "cpu", (64, 64))  # its 4th stage needs > 1 x 1
    scores = mask_segmenter.scores(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8))
    assert scores.shape == (2, 5, 64, 64) and torch.isfinite(scores).all()
    # The identity: config + safetensors contents.
    before = segmenter.sha256
    (segformer / "README.md").write_text("not part of the model")
    assert Segmenter(SegmenterConfig(path=str(segformer)), identity_map(8), "cpu").sha256 == before
    with pytest.raises(SegmenterError, match="predicts 8 classes but its class map identity .* lists 5"):
        load_segmenter(SegmenterConfig(path=str(segformer)), identity_map(5), "cpu", (32, 32))
    with pytest.raises(SegmenterError, match="model_class 'NoSuchModel' is not a transformers model class"):
        Segmenter(SegmenterConfig(path=str(segformer), model_class="NoSuchModel"), identity_map(8), "cpu")
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(SegmenterError, match="has no config.json"):
        Segmenter(SegmenterConfig(path=str(tmp_path / "not-a-model")), identity_map(8), "cpu")


# ------------------------------------------------------------------------------ end to end


def test_oracle_segmenter_scores_one_and_a_relabelled_one_the_expected_value(tmp_path: Path) -> None:
    oracle = toy_config(tmp_path, save_oracle(tmp_path / "oracle.pt"))
    evaluator = Evaluator(oracle, log=lambda _: None)
    result = evaluator.evaluate(ColourGenerator(8))
    assert result.segmentation.miou == 1.0 and result.segmentation.pixel_accuracy == 1.0
    assert result.num_images == 4 and evaluator.segmentation_cache_path.is_file()
    record = result.to_record()
    assert set(record) >= {"miou", "pixel_accuracy", "class_iou", "real", "protocol", "protocol_hash"}
    assert "fid" not in record and "kid_mean" not in record  # only eval.metrics are recorded
    assert set(record["real"]) == {"miou", "pixel_accuracy", "class_iou"}  # the real images (noise here)

    # Swapping classes 0 and 1: every pixel of those two is wrong, the others right.
    swapped = toy_config(tmp_path, save_oracle(tmp_path / "swapped.pt", perm=[1, 0, 2, 3, 4, 5, 6, 7]))
    got = Evaluator(swapped, log=lambda _: None).evaluate(ColourGenerator(8)).segmentation
    from spade_dist.data import build_eval_loader

    labels = torch.cat([b["label"] for b in build_eval_loader(swapped.data, split="val")])
    counted = labels[labels != 255]
    present = sorted(int(c) for c in counted.unique())
    assert {0, 1} <= set(present)
    assert got.pixel_accuracy == pytest.approx(1 - float(((counted == 0) | (counted == 1)).float().mean()), rel=1e-12)
    assert got.miou == pytest.approx((len(present) - 2) / len(present), rel=1e-12)
    assert got.class_iou["0"] == 0.0 and got.class_iou["1"] == 0.0


def test_bad_segmenter_inputs_fail_with_one_line_exit_2_before_any_image(tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    cfg = toy_config(tmp_path, tmp_path / "absent.pt")
    config = tmp_path / "eval.yaml"
    (tmp_path / "five.yaml").write_text("classes: [0, 1, 2, 3, 99]")
    save_oracle(tmp_path / "five.pt", classes=5)
    cases = [
        ([], ["absent.pt", "eval.segmenter.path", "does not exist"]),
        ([f"eval.segmenter.path={save_oracle(tmp_path / 'o.pt')}", f"eval.segmenter.class_map={tmp_path / 'five.yaml'}"],
         ["five.yaml", "eval.segmenter.class_map", "label id 99"]),
        ([f"eval.segmenter.path={tmp_path / 'five.pt'}"], ["five.pt", "predicts 5 classes", "class map identity"]),
    ]
    for overrides, words in cases:
        config.write_text(toy_config(tmp_path, tmp_path / "absent.pt", *overrides).to_yaml())
        code = eval_main(["once", "--checkpoint", str(tmp_path / "never-read.pt"), "--config", str(config)])
        err = capsys.readouterr().err.strip()
        assert code == 2, err
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err
        assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())  # no image scored
    # The trainer checks the same inputs before it would spawn the watcher (eval.mode=subprocess).
    with pytest.raises(SegmenterError, match="absent.pt"):
        check_eval_inputs(cfg)


# ------------------------------------------------------------------------------ protocol


def test_protocol_hash_changes_with_every_field_of_its_metric(tmp_path: Path) -> None:
    oracle = save_oracle(tmp_path / "o.pt")
    base = toy_config(tmp_path, oracle, "eval.metrics=[fid,kid,miou,pixel_accuracy]")
    segmenter = Segmenter(base.eval.segmenter, identity_map(8), "cpu")

    def hashes(cfg=base, **changes) -> dict[str, str]:
        fields = dict(num_images=4, resolution=(8, 8), data_sha256="d" * 64, inception_sha256="i" * 64,
                      kid_subset_size=4, segmentation=segmenter.protocol())
        fields.update(changes)
        return protocol_hashes(build_protocol(cfg, **fields), cfg.eval.metrics)

    ref = hashes()
    assert len(set(ref.values())) == 4  # the metric's name is part of its protocol

    def changed(**kw) -> set[str]:
        return {m for m, h in hashes(**kw).items() if h != ref[m]}

    everything = {"fid", "kid", "miou", "pixel_accuracy"}
    seg, inception = {"miou", "pixel_accuracy"}, {"fid", "kid"}
    assert changed(num_images=5) == everything
    assert changed(resolution=(8, 16)) == everything
    assert changed(data_sha256="e" * 64) == everything
    assert changed(cfg=toy_config(tmp_path, oracle, "eval.metrics=[fid,kid,miou,pixel_accuracy]",
                                  "data.image_resample=fast")) == everything
    assert changed(inception_sha256="j" * 64) == inception
    assert changed(cfg=toy_config(tmp_path, oracle, "eval.metrics=[fid,kid,miou,pixel_accuracy]",
                                  "eval.fid_protocol=pytorch-fid")) == inception
    assert changed(kid_subset_size=3) == {"kid"}
    for key, value in [("segmenter_sha256", "x"), ("class_map_sha256", "y"), ("input_size", [16, 16]),
                       ("interpolation", "nearest"), ("mean", [1, 1, 1]), ("std", [2, 2, 2]), ("channel_order", "bgr"),
                       ("format", "huggingface")]:
        assert changed(segmentation={**segmenter.protocol(), key: value}) == seg, key
    # Package versions: the protocol records them; another version is another protocol.
    protocol = build_protocol(base, num_images=4, resolution=(8, 8), data_sha256="d", inception_sha256="i",
                              kid_subset_size=4, segmentation=segmenter.protocol())
    assert set(protocol["versions"]) == {"torch", "torch-fidelity"}
    bumped = {**protocol, "versions": {**protocol["versions"], "torch": "0.0"}}
    assert protocol_hashes(bumped, ["fid", "miou"]) != protocol_hashes(protocol, ["fid", "miou"])


def test_mixed_protocols_are_flagged_in_compare_and_on_the_page(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    def record(step: int, miou: float, num_images: int) -> dict:
        protocol = {"images": {"num_images": num_images}, "segmentation": {"class_map": "identity"}, "versions": {}}
        return {"step": step, "status": "ok", "miou": miou, "protocol": protocol,
                "protocol_hash": protocol_hashes(protocol, ["miou"]), "real": {"miou": 0.9}}

    same = [record(10, 0.30, 500), record(20, 0.40, 500)]
    lines = format_table([ScoreRow(f"run@{r['step']}", r) for r in same])
    assert lines[0].startswith("source") and f"mIoU ({same[0]['protocol_hash']['miou']})" in lines[0]
    assert not any("different protocols" in line for line in lines)

    mixed = [*same, record(30, 0.55, 2000)]
    text = "\n".join(format_table([ScoreRow(f"run@{r['step']}", r) for r in mixed]))
    assert "0.3000 [A]" in text and "0.5500 [B]" in text
    assert "mIoU: 2 different protocols" in text and "images.num_images: 500 vs 2000" in text
    # The command: a run directory and a result file, as a user passes them.
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in same))
    (tmp_path / "other.json").write_text(json.dumps(mixed[2]))
    assert eval_main(["compare", str(run), str(tmp_path / "other.json")]) == 0
    out = capsys.readouterr().out
    assert "run@10" in out and "other@30" in out and "images.num_images: 500 vs 2000" in out
    assert eval_main(["compare", str(tmp_path / "absent")]) == 2
    # The evaluation page: one series per protocol, the same note; best.json's metric.
    write_fid_page(tmp_path / "fid.html", mixed, {**mixed[2], "best_metric": "miou"}, "run")
    page = (tmp_path / "fid.html").read_text()
    assert "mIoU [A]" in page and "mIoU [B]" in page and "images.num_images: 500 vs 2000" in page
    assert "Best (mIoU): step 30" in page
    # Best tracking compares within one protocol only.
    assert best_record(mixed, "miou")["step"] == 30
    assert best_record(mixed, "miou", same[0]["protocol_hash"]["miou"])["step"] == 20


# ------------------------------------------------------------------------------ config


def test_eval_metric_keys_are_checked(tmp_path: Path) -> None:
    assert tuple(METRICS) == get_args(EvalMetric)
    default = load_config(None)
    assert default.eval.metrics == ["fid", "kid"] and default.eval.best_metric == "fid"
    for overrides, message in [
        (["eval.metrics=[]"], "at least one metric"),
        (["eval.metrics=[fid,fid]"], "lists a metric twice"),
        (["eval.metrics=[miou]", "eval.segmenter.path=x"], "eval.best_metric 'fid' is not computed"),
        (["eval.metrics=[fid,miou]"], "needs a segmenter: set eval.segmenter.path"),
        (["eval.segmenter.path=x"], "has neither miou nor pixel_accuracy"),
        (["eval.metrics=[fid,miou]", "eval.segmenter.path=x", "eval.segmenter.input_size=[3]"], "input_size"),
        (["eval.metrics=[fid,miou]", "eval.segmenter.path=x", "eval.segmenter.std=[1,0,1]"], "eval.segmenter.std"),
        (["eval.metrics=[fid,psnr]"], r"eval.metrics\[1\]: invalid value 'psnr'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, overrides)
