"""Config presets and monitoring files, installed as the package ``spade_dist.configs``.

This directory stays at the top of the repository (scripts and docs refer to ``configs/...``);
``setup.py`` maps it into the package so that wheels and editable installs resolve presets through
``importlib.resources`` (``spade_dist.resources``). The ``__init__.py`` makes it a regular package,
which editable installs need to import a mapped subpackage.
"""
