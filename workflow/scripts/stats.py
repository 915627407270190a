"""Snakemake job: per-category counts at each data step."""

from d2retrain.core.logutil import run_job
from d2retrain.data.stats import write_stats

snakemake = globals()["snakemake"]
steps: dict[str, dict[str, str]] = {}
for name, path in snakemake.input.items():
    split, _, step = name.partition("__")
    steps.setdefault(split, {})[step] = path
run_job(
    snakemake.log[0],
    write_stats,
    steps,
    snakemake.params.categories,
    snakemake.output.csv,
    snakemake.output.png,
    title=f"{snakemake.wildcards.subset}: {', '.join(snakemake.params.categories)}",
    aliases={name: dict(aliases) for name, aliases in snakemake.params.aliases.items()},
)
