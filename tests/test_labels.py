"""Label encoding: one-hot + don't care + instance edges in the official channel order."""
from __future__ import annotations

import pytest
import torch

from spade_dist.label_layout import LabelLayout
from spade_dist.labels import LabelError, check_label_ids, encode_semantics, instance_edges

# A hand-made 4x4 scene with 3 classes, a don't-care block and three instances.
LABEL_4x4 = [
    [0, 0, 1, 1],
    [0, 0, 1, 1],
    [2, 2, 255, 255],
    [2, 2, 255, 255],
]
INSTANCE_4x4 = [
    [0, 0, 0, 0],
    [0, 0, 0, 0],
    [0, 0, 5, 5],
    [7, 7, 5, 5],
]
# Written out by hand: an edge wherever a left/right/up/down neighbour has another instance id.
EXPECTED_EDGES = [
    [0, 0, 0, 0],
    [0, 0, 1, 1],
    [1, 1, 1, 1],
    [1, 1, 1, 0],
]
EXPECTED_CHANNELS = [
    # class 0
    [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
    # class 1
    [[0, 0, 1, 1], [0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]],
    # class 2
    [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]],
    # don't care (255 -> channel label_nc)
    [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]],
    # instance edges, last
    EXPECTED_EDGES,
]


def _map(rows: list[list[int]], dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.tensor(rows, dtype=dtype).view(1, 1, 4, 4)


def test_semantic_nc_counts_dontcare_and_edge_channels() -> None:
    assert LabelLayout(182, True, False).semantic_nc == 184
    assert LabelLayout(182, True, False).onehot_channels == 183
    assert LabelLayout(150, False, True).semantic_nc == 150
    assert LabelLayout(35, False, False).semantic_nc == 36
    with pytest.raises(ValueError, match="label_nc"):
        LabelLayout(0, False, True)


def test_hand_made_4x4_one_hot_dontcare_and_edges() -> None:
    out = encode_semantics(_map(LABEL_4x4), _map(INSTANCE_4x4), LabelLayout(3, True, False))
    assert out.dtype == torch.float32
    assert out.shape == (1, 5, 4, 4)
    assert torch.equal(out, torch.tensor([EXPECTED_CHANNELS], dtype=torch.float32))


def test_instance_edges_matches_hand_written_map() -> None:
    assert torch.equal(instance_edges(_map(INSTANCE_4x4)), _map(EXPECTED_EDGES, torch.float32))


def test_instance_edges_matches_pixelwise_definition_on_random_maps() -> None:
    gen = torch.Generator().manual_seed(0)
    inst = torch.randint(0, 3, (2, 1, 7, 9), generator=gen)
    edges = instance_edges(inst)
    for b in range(2):
        for y in range(7):
            for x in range(9):
                neighbours = [(y + dy, x + dx) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))
                              if 0 <= y + dy < 7 and 0 <= x + dx < 9]
                expected = any(inst[b, 0, ny, nx] != inst[b, 0, y, x] for ny, nx in neighbours)
                assert edges[b, 0, y, x].item() == float(expected), (b, y, x)


def test_no_instance_drops_edge_channel_and_ignores_instance() -> None:
    out = encode_semantics(_map(LABEL_4x4), None, LabelLayout(3, True, True))
    assert torch.equal(out, torch.tensor([EXPECTED_CHANNELS[:4]], dtype=torch.float32))


def test_other_integer_dtypes_and_output_dtype() -> None:
    label = _map(LABEL_4x4, torch.uint8)
    inst = _map(INSTANCE_4x4, torch.int32)
    out = encode_semantics(label, inst, LabelLayout(3, True, False), dtype=torch.float64)
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.tensor([EXPECTED_CHANNELS], dtype=torch.float64))
    # float maps holding whole numbers (ToTensor()*255 style) are accepted
    out_f = encode_semantics(_map(LABEL_4x4, torch.float32), _map(INSTANCE_4x4, torch.float32), LabelLayout(3, True, False))
    assert torch.equal(out_f, out.float())


def test_every_pixel_has_exactly_one_class_channel() -> None:
    label = torch.randint(0, 182, (2, 1, 16, 16))
    label[0, 0, :4, :4] = 255
    out = encode_semantics(label, torch.zeros_like(label), LabelLayout(182, True, False))
    assert out.shape == (2, 184, 16, 16)
    assert torch.equal(out[:, :183].sum(1), torch.ones(2, 16, 16))
    assert torch.equal(out[:, :183].argmax(1), torch.where(label == 255, 182, label)[:, 0])
    assert out[:, 183].sum() == 0  # a constant instance map has no edges


def test_dontcare_without_dontcare_channel_is_an_error() -> None:
    with pytest.raises(LabelError, match=r"255.*contain_dontcare_label"):
        encode_semantics(_map(LABEL_4x4), _map(INSTANCE_4x4), LabelLayout(3, False, False))


def test_out_of_range_ids_are_named() -> None:
    label = _map(LABEL_4x4)
    label[0, 0, 0, 0] = 3
    label[0, 0, 0, 1] = 17
    label[0, 0, 1, 1] = -1
    with pytest.raises(LabelError) as info:
        encode_semantics(label, _map(INSTANCE_4x4), LabelLayout(3, True, False))
    message = str(info.value)
    assert "-1, 3, 17" in message and "label_nc=3" in message
    assert "255" not in message.split(":")[-1]  # 255 is allowed here and must not be reported
    with pytest.raises(LabelError, match="3"):
        check_label_ids(torch.full((1, 1, 2, 2), 3), label_nc=3, contain_dontcare_label=False)


def test_shape_dtype_and_missing_instance_errors() -> None:
    with pytest.raises(LabelError, match="N x 1 x H x W"):
        encode_semantics(torch.zeros(4, 4, dtype=torch.long), None, LabelLayout(3, False, True))
    with pytest.raises(LabelError, match="non-integer"):
        encode_semantics(torch.full((1, 1, 2, 2), 0.5), None, LabelLayout(3, False, True))
    with pytest.raises(LabelError, match="instance map is required"):
        encode_semantics(_map(LABEL_4x4), None, LabelLayout(3, True, False))
    with pytest.raises(LabelError, match="differs"):
        encode_semantics(_map(LABEL_4x4), torch.zeros(1, 1, 2, 2, dtype=torch.long), LabelLayout(3, True, False))
