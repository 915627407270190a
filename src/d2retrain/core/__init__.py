"""Core: what every layer uses and nothing of the domain.

Errors a user can cause (:mod:`~d2retrain.core.errors`), atomic file writes
(:mod:`~d2retrain.core.fileio`), logging for entry points (:mod:`~d2retrain.core.logutil`), the
configuration's schema and defaults (:mod:`~d2retrain.core.config`, the schema is package data),
work split over two processes (:mod:`~d2retrain.core.forked`) and the code
hashes of the workflow's rules (:mod:`~d2retrain.core.codehash`). Imports nothing else of d2retrain.
"""
