"""Dataset preparation for spade-dist: ``spade-data shard / verify / stats / synth / merge-manifest``.

Library entry points (see docs/DATA_TOOLS.md): :func:`data_tools.shard.shard_dataset`,
:func:`data_tools.manifest.merge_manifest`, :func:`data_tools.verify.verify_shards`,
:func:`data_tools.stats.compute_stats`, :func:`data_tools.synth.generate_synthetic`.
"""
