"""Workflow: what the Snakefile plans with, on top of every other layer.

The inference files and their shards, outputs lost since a shard ran, files the demo rule will
write (:mod:`~d2retrain.workflow.planning`), and a shard job's run with its declared status file
(:mod:`~d2retrain.workflow.shard`). The Snakefile's rule files import these; nothing below imports
them. Planning imports no heavy library: Snakemake parses the workflow on every call.
"""
