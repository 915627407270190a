"""Train: turning data and a model spec into a model folder.

The shared loop pieces (checkpoints, metrics, loss checks: :mod:`~d2retrain.train.loop`), processes
over GPUs and machines (:mod:`~d2retrain.train.distributed`), training samples
(:mod:`~d2retrain.train.samples`), the engines' training halves (:mod:`~d2retrain.train.tv`,
:mod:`~d2retrain.train.d2`) behind their contract (:mod:`~d2retrain.train.engines`), and the job
that writes the folder (:mod:`~d2retrain.train.run`). Imports core, data and model; never infer.
"""
