"""Analyses of what fine-tuning did, from run folders and checkpoints only (never the trainers).

- ``weights``: norms, relative norms, sparsity, per-layer / per-module breakdown and |delta| histogram
  of an update; ``randomwalk``: ES's random-walk null model and norm growth across checkpoints;
- ``cosine``: similarity of two updates of one base (e.g. ES vs GRPO);
- ``kl``: KL drift from the base on a prompt set (k1 / k3 estimators);
- ``interpolate``: reward and KL along the line between two checkpoints, and the loss barrier;
- ``forgetting``: task x checkpoint and task x stage matrices (sequential training);
- ``passk``: unbiased pass@k and the diversity of correct answers;
- ``cli``: the ``esft analyze`` command. See ``docs/analysis.md``.
"""
