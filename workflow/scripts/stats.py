"""Snakemake job: per-category counts at each data step, and the data checks' warnings."""

from d2retrain.core.logutil import run_job
from d2retrain.data.stats import write_data_checks, write_stats

snakemake = globals()["snakemake"]
steps: dict[str, dict[str, str]] = {}
for name, path in snakemake.input.items():
    split, _, step = name.partition("__")
    steps.setdefault(split, {})[step] = path
title = f"{snakemake.wildcards.subset}: {', '.join(snakemake.params.categories)}"


def stats() -> None:
    aliases = {name: dict(aliases) for name, aliases in snakemake.params.aliases.items()}
    categories, output, params = snakemake.params.categories, snakemake.output, snakemake.params
    write_stats(steps, categories, output.csv, output.png, title, aliases)
    write_data_checks(steps, dict(params.image_dirs), output.checks, title, params.repeat_threshold)


run_job(snakemake.log[0], stats)
