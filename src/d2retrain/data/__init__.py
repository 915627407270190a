"""Data: COCO annotation files in, COCO annotation files and images out; no model.

Reading and writing COCO documents (:mod:`~d2retrain.data.coco`), the rule for degenerate geometry,
category filtering and balancing (:mod:`~d2retrain.data.filtering`, :mod:`~d2retrain.data.prepare`),
image copies and mask PNGs (:mod:`~d2retrain.data.masks`), detection records of a filtered file
(:mod:`~d2retrain.data.records`), counts and charts (:mod:`~d2retrain.data.stats`) and the synthetic
demo dataset. Imports only :mod:`d2retrain.core`.
"""
