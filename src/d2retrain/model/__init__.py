"""Model: what a trained model is and how it predicts, for both engines; no training loop.

Specs (:mod:`~d2retrain.model.specs`), the model folder (:mod:`~d2retrain.model.folder`),
weights, checkpoints and head surgery (:mod:`~d2retrain.model.headsurgery`), the predictor
contract (:mod:`~d2retrain.model.predictor`), COCO evaluation (:mod:`~d2retrain.model.evaluation`),
and the engines' model halves (:mod:`~d2retrain.model.tv`, :mod:`~d2retrain.model.d2`) behind one
contract and registry (:mod:`~d2retrain.model.engines`). Imports :mod:`d2retrain.core` and
:mod:`d2retrain.data`.
"""
