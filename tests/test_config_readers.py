"""No config key without effect: every field of every config dataclass has a reader in the code.

A reader is an attribute access ``<x>.<field>`` in the package outside ``config.py`` (which only
declares and validates), where ``<x>`` is not an imported module, or a ``--get section.key`` in a Slurm script (they read settings through
``spade-config``). Access through ``getattr(section, name)`` with a literal name counts too, and so
does ``self.<field>`` in a property of a config section (a value derived from the switches there,
e.g. ``SpeedConfig.spade_paths``, which the code reads).
A field that nothing reads is accepted from YAML and silently ignored: remove it or wire it.
"""
from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

from spade_dist.config import Config

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "spade_dist"


def _fields(cls: type, prefix: str = "") -> list[tuple[str, str]]:
    """(dotted key, field name) of every leaf field."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += _fields(type(default), f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", f.name))
    return out


SECTION_OF_CLASS = {type(getattr(Config(), f.name)).__name__: f.name for f in dataclasses.fields(Config)}


def _annotation_name(annotation: ast.expr | None) -> str:
    if isinstance(annotation, ast.Name):
        return annotation.id
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        return annotation.value.strip('"')
    return ""


def _read_names() -> set[str]:
    """Attribute names read in the package, plain (``x.name``) and qualified (``section.name`` when
    the object is itself reached as ``....section`` or named ``section``)."""
    names: set[str] = set()
    for path in PACKAGE.rglob("*.py"):
        if path.name == "config.py" and path.parent == PACKAGE:
            names |= _property_reads(ast.parse(path.read_text(), str(path)))
            continue
        tree = ast.parse(path.read_text(), str(path))
        # `re.compile` or `torch.compile` is not a reader of speed.compile: skip module attributes.
        modules = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
                   if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
        # A parameter annotated with a section's class (`cfg: DataConfig`) names that section here.
        alias = {arg.arg: SECTION_OF_CLASS[_annotation_name(arg.annotation)] for arg in ast.walk(tree)
                 if isinstance(arg, ast.arg) and _annotation_name(arg.annotation) in SECTION_OF_CLASS}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                if not (isinstance(node.value, ast.Name) and node.value.id in modules):
                    names.add(node.attr)
                    owner = node.value.attr if isinstance(node.value, ast.Attribute) else getattr(node.value, "id", None)
                    if owner:
                        names.add(f"{alias.get(owner, owner)}.{node.attr}")
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
                  and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)):
                names.add(str(node.args[1].value))
    return names


def _property_reads(tree: ast.Module) -> set[str]:
    """``section.field`` for each ``self.field`` read in a property of a config section class."""
    names: set[str] = set()
    for cls in (node for node in tree.body if isinstance(node, ast.ClassDef) and node.name in SECTION_OF_CLASS):
        for fn in cls.body:
            if isinstance(fn, ast.FunctionDef) and any(getattr(d, "id", "") == "property" for d in fn.decorator_list):
                for node in ast.walk(fn):
                    if isinstance(node, ast.Attribute) and getattr(node.value, "id", "") == "self":
                        names |= {node.attr, f"{SECTION_OF_CLASS[cls.name]}.{node.attr}"}
    return names


def _script_keys() -> set[str]:
    keys: set[str] = set()
    for script in (REPO / "slurm").glob("*.sh"):
        for match in re.finditer(r"--get((?:\s+\\?\s*[a-z_]+\.[A-Za-z_]+)+)", script.read_text()):
            keys.update(match.group(1).replace("\\", " ").split())
    return keys


def unread_keys(fields: list[tuple[str, str]]) -> list[str]:
    """Keys without a reader. A field name used by several sections (``batch_size``, ``device``,
    ``seed``...) must be read qualified (``cfg.eval.batch_size``): reading ``data.batch_size``
    says nothing about ``eval.batch_size``."""
    names, script = _read_names(), _script_keys()
    sections_of: dict[str, int] = {}
    for _, name in fields:
        sections_of[name] = sections_of.get(name, 0) + 1
    unread = []
    for dotted, name in fields:
        # qualified by the innermost section: train.health.enabled is read as health.enabled
        wanted = ".".join(dotted.split(".")[-2:]) if sections_of[name] > 1 else name
        if wanted not in names and dotted not in script:
            unread.append(dotted)
    return unread


def test_every_config_field_has_a_reader():
    assert unread_keys(_fields(Config)) == []


def test_the_walk_finds_a_field_without_reader():
    # The check itself can fail: a field nobody reads is reported.
    assert unread_keys([("train.no_reader_anywhere", "no_reader_anywhere")]) == ["train.no_reader_anywhere"]
    assert len(_fields(Config)) > 100  # every section was walked
    # A name shared by sections needs its own section's reader: data.seed is read, eval.seed would not be.
    assert unread_keys([("data.seed", "seed"), ("eval.seed", "seed")]) == ["eval.seed"]


def test_retired_keys_of_earlier_checkpoints_still_load():
    from spade_dist.config import config_from_dict

    stored = Config().to_dict()
    stored["model"]["nef"] = 16  # written by versions that still had the no-op key
    assert config_from_dict(stored).model.ngf == Config().model.ngf
