"""The main jobs behind ``metalearn-fast``, each built only from the package's public API.

- ``sine``: MAML on the sinusoid family against pretraining and random init (the main job);
- ``runs``: what the jobs share: training loops that checkpoint and resume, files written whole,
  progress bars.

They need the ``[jobs]`` extra (matplotlib for the figures, tqdm for the progress bars); the library
itself does not.
"""
