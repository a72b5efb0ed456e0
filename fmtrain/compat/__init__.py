"""Every place fmtrain reaches into a dependency's internals, one module per dependency.

Private names and unwritten behaviour change between releases without notice. Kept here, each
workaround is found in one place and ``tests/test_compat.py`` checks what it relies on, so an
upgrade that changes it fails there, naming the workaround, instead of deep inside a training run:

- :mod:`fmtrain.compat.deepspeed`: ZeRO's flat fp32 partitions, optimizer-state links, loss scaler.
- :mod:`fmtrain.compat.torch`: the sharded fp16 grad scaler's per-gradient unscale.
- :mod:`fmtrain.compat.submitit`: the sbatch script renderer and memory formatting.

Each module imports its dependency lazily, inside its functions.
"""
