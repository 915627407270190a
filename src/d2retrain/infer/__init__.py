"""Infer: a trained model on folders of images and videos.

Input discovery (:mod:`~d2retrain.infer.inputs`), the options and labels
(:mod:`~d2retrain.infer.options`), video decoding and H.264 encoding (:mod:`~d2retrain.infer.videoio`),
drawing (:mod:`~d2retrain.infer.draw`), the image pipeline (:mod:`~d2retrain.infer.pipeline`) and the
video one (:mod:`~d2retrain.infer.video`), the records that let a rerun keep unchanged files' outputs
(:mod:`~d2retrain.infer.reuse`) and the run summary (:mod:`~d2retrain.infer.summary`). Imports core,
data and model; never train.
"""
