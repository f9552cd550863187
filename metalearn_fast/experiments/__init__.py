"""The main jobs behind ``metalearn-fast``, each built only from the package's public API.

- ``sine``: MAML on the sinusoid family against pretraining and random init (the main job);
- ``fewshot`` (with ``fewshot_data``): N-way K-shot MAML on the user's classes (image folders or .npz)
  against pretrain-then-fine-tune and random init;
- ``options``: the jobs' command-line option types;
- ``runs``: what the jobs share: training loops that checkpoint and resume, files written whole,
  progress bars.

They need the ``[jobs]`` extra (matplotlib for the figures, tqdm for the progress bars, Pillow for
images); the library itself does not.
"""
