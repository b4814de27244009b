"""Regenerate ``spade_dist/memory_table.py`` (the planner's tables) from ``bench/memory.py`` runs.

For each preset and precision: the reference computation with fake-tensor accounting (exact bytes,
no memory, no device), per-GPU batch 1 and 2 (``tiny``: 2 and 4, its 1x1 latent map has no BN
statistics at batch 1), ``speed.activation_checkpointing`` off and each savings level of
``bench/memory.py`` (``SAVINGS``); each run's ``table_rows`` becomes that preset's row. The rows
of the precisions not named are kept as the table has them, so one precision can be regenerated
alone. The file is rewritten whole (it is generated: do not edit its numbers by hand).

    python bench/memory_table.py --precision fp32 bf16          # every preset of the table
    python bench/memory_table.py --precision bf16 --presets tiny coco_stuff
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.memory import PRECISIONS, SAVINGS  # noqa: E402
from bench.memory import main as memory_main  # noqa: E402
from spade_dist import memory_table  # noqa: E402
from spade_dist.losses import save_random_vgg19_weights  # noqa: E402
from spade_dist.resources import preset_path  # noqa: E402

PRESETS = ("tiny", "coco_stuff", "ade20k", "cityscapes", "coco_stuff_512", "ade20k_512", "cityscapes_1024x512")
BATCHES = {"tiny": (2, 4)}  # others: (1, 2)
TABLE_FILE = REPO_ROOT / "spade_dist" / "memory_table.py"
TABLE_NAMES = {"fp32": "MEASURED", "bf16": "MEASURED_BF16"}  # precision -> the table's name in the module



def measure_preset(preset: str, precision: str, vgg_path: str) -> dict[str, Any]:
    """The preset's row in ``precision``: off and every savings level, by ``bench/memory.py``."""
    batches = [str(b) for b in BATCHES.get(preset, (1, 2))]
    row: dict[str, Any] = {}
    for i, savings in enumerate(SAVINGS):
        modes = ["reference", "reference+savings"] if i == 0 else ["reference+savings"]
        result = memory_main(["--config", str(preset_path(preset)), "--batch", *batches, "--modes", *modes,
                              "--accounting", "fake", "--savings", savings, "--precision", precision,
                              "--vgg-weights", vgg_path])
        row.update(result["table_rows"][precision])
    return row


def render(tables: dict[str, dict[tuple, dict[str, tuple[int, int]]]], names: dict[tuple, str], source: str) -> str:
    # The module's docstring is kept as the package has it (it says what the tables are).
    lines = [f'"""{memory_table.__doc__}"""', "from __future__ import annotations", "", f"TABLE_SOURCE = {source!r}", ""]
    for precision, table_name in TABLE_NAMES.items():
        lines.append(f"{table_name}: dict[tuple, dict[str, tuple[int, int]]] = {{")
        for key, row in tables[precision].items():
            lines.append(f"    # {names.get(key, 'unnamed')}")
            settings = ", ".join(f'"{s}": ({int(f)}, {int(p)})' for s, (f, p) in row.items())
            lines.append(f"    {key!r}: {{{settings}}},")
        lines.append("}")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--precision", nargs="+", choices=list(PRECISIONS), required=True)
    p.add_argument("--presets", nargs="+", choices=PRESETS, default=list(PRESETS))
    p.add_argument("--out", default=str(TABLE_FILE), help="the module to write (default: the package's table)")
    args = p.parse_args(argv)
    from spade_dist.config import load_config
    from spade_dist.memory_plan import architecture_key

    names = {architecture_key(load_config(preset_path(name))): name for name in PRESETS}
    tables = {precision: dict(getattr(memory_table, table_name, {})) for precision, table_name in TABLE_NAMES.items()}
    with tempfile.TemporaryDirectory() as tmp:
        vgg_path = str(save_random_vgg19_weights(Path(tmp) / "vgg19.pth", seed=0))
        for precision in args.precision:
            for preset in args.presets:
                row = measure_preset(preset, precision, vgg_path)
                key = tuple(row.pop("key"))
                tables[precision][key] = {setting: tuple(model) for setting, model in row.items()}
    # Rows in the order of PRESETS, whatever order they were measured in.
    order = {key: i for i, key in enumerate(names)}
    tables = {precision: dict(sorted(table.items(), key=lambda kv: order.get(kv[0], len(order))))
              for precision, table in tables.items()}
    source = f"bench/memory_table.py (bench/memory.py --accounting fake), {datetime.date.today().isoformat()}"
    Path(args.out).write_text(render(tables, names, source))
    summary = {"written": args.out, "precisions": args.precision, "presets": args.presets}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
