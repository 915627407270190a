"""Model: what a trained model is and how it predicts, for both engines; no training loop.

Specs and the model folder's files (:mod:`~d2retrain.model.specs`), weights, checkpoints and head
surgery (:mod:`~d2retrain.model.headsurgery`), the predictor contract (:mod:`~d2retrain.model.predictor`),
COCO evaluation (:mod:`~d2retrain.model.evaluation`), and the engines' model halves
(:mod:`~d2retrain.model.tv`, :mod:`~d2retrain.model.d2`) behind one contract and registry
(:mod:`~d2retrain.model.engines`). Imports :mod:`d2retrain.core` and :mod:`d2retrain.data`.
"""
