"""The planner's table (``spade_dist/memory_plan.py``): peak bytes of one training iteration =
fixed + per_sample * per-GPU batch, per architecture, for each measured value of
``speed.activation_checkpointing``.

Each row is ``bench/memory.py``'s ``table_row`` (reference computation, fp32, fake-tensor
accounting: exact bytes, no device), fitted from batch 1 and 2 (tiny: 2 and 4, its 1x1 latent map has no BN statistics at batch 1); regenerate with, per preset,

    python bench/memory.py --config configs/PRESET.yaml --batch 1 2 --modes reference reference+savings --accounting fake --savings generator
    python bench/memory.py --config configs/PRESET.yaml --batch 1 2 --modes reference+savings --accounting fake --savings generator_spade
    python bench/memory.py --config configs/PRESET.yaml --batch 1 2 --modes reference+savings --accounting fake --savings all

Key: (crop_size, aspect_ratio, num_upsampling_layers, semantic_nc, ngf, ndf, n_layers_D, num_D,
use_vae, netG, no_vgg_loss), as ``memory_plan.architecture_key``.
"""
from __future__ import annotations

TABLE_SOURCE = "bench/memory.py --accounting fake, 2026-12-07"

MEASURED: dict[tuple, dict[str, tuple[int, int]]] = {
    # tiny
    (32, 1.0, 'normal', 10, 8, 8, 2, 2, False, 'spade', True): {"off": (92601813, 697200), "generator": (93877337, 56912), "generator_spade": (93876313, 55336), "all": (93876313, 55336)},
    # coco_stuff
    (256, 1.0, 'normal', 184, 64, 64, 4, 2, False, 'spade', False): {"off": (1972661569, 1331574272), "generator": (1972952849, 600881152), "generator_spade": (2060033441, 486126252), "all": (2212738465, 333421228)},
    # ade20k
    (256, 1.0, 'normal', 151, 64, 64, 4, 2, False, 'spade', False): {"off": (1956035905, 1292620544), "generator": (1956327185, 592221952), "generator_spade": (2081491361, 436798380), "all": (2294751649, 223538092)},
    # cityscapes
    (512, 2.0, 'more', 36, 64, 64, 4, 2, False, 'spade', False): {"off": (1898097985, 2290963456), "generator": (1898389265, 1122112000), "generator_spade": (1897641721, 783966208), "all": (1898387217, 719458816)},
    # coco_stuff_512
    (512, 1.0, 'more', 184, 64, 64, 4, 2, False, 'spade', False): {"off": (1972661569, 5274695168), "generator": (1972952849, 2399451136), "generator_spade": (1972205305, 2106344960), "all": (1972205305, 1810414080)},
    # ade20k_512
    (512, 1.0, 'more', 151, 64, 64, 4, 2, False, 'spade', False): {"off": (1956035905, 5119159040), "generator": (1956327185, 2364839680), "generator_spade": (1955579641, 1985225984), "all": (1955579641, 1568184576)},
    # cityscapes_1024x512
    (1024, 2.0, 'most', 36, 64, 64, 4, 2, False, 'spade', False): {"off": (1906595545, 6379738112), "generator": (1906470813, 3096056320), "generator_spade": (1906133893, 2735742976), "all": (1906469789, 2022314496)},
}
