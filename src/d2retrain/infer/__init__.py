"""Infer: a trained model on folders of images and videos.

Input discovery and sharding (:mod:`~d2retrain.infer.inputs`), video decoding and H.264 encoding
(:mod:`~d2retrain.infer.videoio`), drawing (:mod:`~d2retrain.infer.draw`), the pipeline
(:mod:`~d2retrain.infer.pipeline`) and the run summary (:mod:`~d2retrain.infer.summary`). Imports
core, data and model; never train.
"""
