"""ditvla's benchmarks: the code behind the figures in docs/benchmarks.md.

Each module with a ``main`` is one bench: it measures one thing, prints its figures and
ends with a one-line summary. Run one from the repository root as a module::

    python -m bench.<name> [options]      # e.g. python -m bench.dataloader --workers 2
    python -m bench.<name> --help         # what it measures, its options, its last line

The other modules are what several benches share, so that each bench module is one
runnable thing: LeRobot's policies as peers (``smolvla_peer`` builds and runs SmolVLA
offline at our sizes, ``lerobot_batches`` converts our data to LeRobot's batches,
``lerobot_training`` trains a LeRobot policy for a budget, ``lerobot_adapter`` puts one
behind our evaluator), ``loopback`` (ports for server processes) and ``compilation``
(the one ``torch.compile`` setting compiled timings use). tests/test_benches.py imports
every module and asks every bench for its ``--help``, so a refactor of ditvla cannot
silently break a bench.
"""
