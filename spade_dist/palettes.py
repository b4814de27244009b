"""Label colours: one colour per class id, the one place that decides them (sample grids, generated
label PNGs, the spade-serve canvas and the colour-PNG uploads it decodes all use :func:`label_palette`).

Which palette a dataset gets (``data.dataset`` and ``data.label_nc``):

- ``cityscapes`` (35 label ids): the official Cityscapes label colours (``labels.py`` of
  cityscapesScripts, as the SPADE release's ``labelcolormap(35)``);
- ``coco-stuff`` (182 classes): the SPADE release's COCO-Stuff colour map, the one GauGAN's demo painted
  with: the bit-interleaving palette below with natural colours for sky, sea, grass, clouds and trees;
- ``ade20k`` (150 classes): the ADE20K scene-parsing benchmark's published 150-colour table (wall grey,
  sky cyan, grass green, ...), as distributed with the benchmark's toolkit;
- ``synthetic`` (``spade-data synth``'s 10 landscape classes): natural colours (sky blue, water blue,
  grass green, ...);
- anything else: the deterministic bit-interleaving palette of the SPADE release (``labelcolormap``):
  the bits of ``id + 1`` spread over R, G, B from the most significant bit down, so neighbouring ids
  get very different colours. A label count that does not match its dataset's falls back to it too.
"""
from __future__ import annotations

import torch

CITYSCAPES_LABEL_NC = 35
COCO_STUFF_LABEL_NC = 182
ADE20K_LABEL_NC = 150

# Official Cityscapes colours (util/util.py labelcolormap(35)), indexed by Cityscapes label id.
_CITYSCAPES_COLORS = (
    (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0), (111, 74, 0), (81, 0, 81),
    (128, 64, 128), (244, 35, 232), (250, 170, 160), (230, 150, 140), (70, 70, 70), (102, 102, 156),
    (190, 153, 153), (180, 165, 180), (150, 100, 100), (150, 120, 90), (153, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 0, 90), (0, 0, 110), (0, 80, 100),
    (0, 0, 230), (119, 11, 32), (0, 0, 142),
)
# The SPADE release's COCO-Stuff palette overrides five classes with natural colours (ids 0-based, as stored).
_COCO_STUFF_COLORS = {
    105: (170, 170, 170),  # clouds
    123: (29, 195, 49),  # grass
    154: (54, 62, 167),  # sea
    156: (95, 219, 255),  # sky-other
    168: (140, 104, 47),  # tree
}
# The ADE20K benchmark's colour table, indexed by class id 0..149 (wall, building, sky, floor, tree, ...;
# the raw "other" 0 is the don't-care id after the official loader's shift).
_ADE20K_COLORS = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3), (120, 120, 80), (140, 140, 140), (204, 5, 255),
    (230, 230, 230), (4, 250, 7), (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51), (255, 6, 82),
    (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3), (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255),
    (255, 7, 71), (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255), (8, 255, 214), (7, 255, 224),
    (255, 184, 6), (10, 255, 71), (255, 41, 10), (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255), (235, 12, 255), (160, 150, 20), (0, 163, 255),
    (140, 140, 140), (250, 10, 15), (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0), (0, 0, 255),
    (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255), (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255),
    (0, 255, 112), (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0), (0, 143, 255), (51, 255, 0),
    (0, 82, 255), (0, 255, 41), (0, 255, 173), (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184), (0, 31, 255), (0, 255, 61), (0, 71, 255),
    (255, 0, 204), (0, 255, 194), (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255), (0, 122, 255),
    (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0), (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0),
    (8, 184, 170), (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255), (0, 214, 255), (255, 0, 112),
    (92, 255, 0), (0, 224, 255), (112, 224, 255), (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235), (245, 0, 255), (255, 0, 122), (255, 245, 0),
    (10, 190, 212), (214, 255, 0), (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255), (0, 255, 204),
    (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255), (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255),
    (184, 255, 0), (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)
# spade-data synth's classes (data_tools/synth.py CLASS_NAMES, a test keeps them in step): natural colours.
SYNTHETIC_COLORS = {
    "sky": (95, 219, 255), "cloud": (200, 200, 200), "mountain": (120, 90, 130), "snow": (255, 255, 255),
    "water": (54, 62, 167), "sand": (230, 200, 130), "grass": (29, 195, 49), "tree": (20, 110, 40),
    "rock": (110, 110, 110), "dirt": (140, 100, 50),
}


def label_palette(label_nc: int, dataset: str = "custom") -> torch.Tensor:
    """uint8 ``label_nc x 3`` colour table for ``data.dataset`` / ``data.label_nc`` (module docstring)."""
    if label_nc <= 0:
        raise ValueError(f"label_nc must be > 0, got {label_nc}")
    if label_nc == CITYSCAPES_LABEL_NC:
        return torch.tensor(_CITYSCAPES_COLORS, dtype=torch.uint8)
    if dataset == "ade20k" and label_nc == ADE20K_LABEL_NC:
        return torch.tensor(_ADE20K_COLORS, dtype=torch.uint8)
    if dataset == "synthetic" and label_nc == len(SYNTHETIC_COLORS):
        return torch.tensor(list(SYNTHETIC_COLORS.values()), dtype=torch.uint8)
    ids = torch.arange(label_nc, dtype=torch.int64) + 1
    rgb = torch.zeros(label_nc, 3, dtype=torch.int64)
    for bit_round in range(7):  # 7 rounds x 3 bits cover ids up to 2^21
        for channel in range(3):
            rgb[:, channel] |= ((ids >> channel) & 1) << (7 - bit_round)
        ids = ids >> 3
    if label_nc == COCO_STUFF_LABEL_NC:
        for class_id, color in _COCO_STUFF_COLORS.items():
            rgb[class_id] = torch.tensor(color)
    return rgb.to(torch.uint8)
