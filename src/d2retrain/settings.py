"""The configuration: schema defaults (the one source of them), validation, and specs built from it."""

import copy
import functools
import importlib.resources
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from d2retrain.errors import D2RetrainError
from d2retrain.trainspec import LAUNCH_KEYS, DistributedSpec, ModelSpec, SolverSpec

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_FILE",
    "load_schema",
    "section_defaults",
    "model_spec",
    "solver_spec",
    "distributed_spec",
    "load_config",
]

# Package data: found the same way in a source checkout, an editable install and a wheel. The
# Snakefile validates against this very file (src/d2retrain/config.schema.yaml).
SCHEMA_FILE = importlib.resources.files("d2retrain") / "config.schema.yaml"


def load_schema() -> dict[str, Any]:
    """The configuration's JSON Schema (a copy the caller may change)."""
    return copy.deepcopy(_schema())


@functools.cache
def _schema() -> dict[str, Any]:
    # parsed once per process: every model load reads section defaults from it
    return yaml.load(SCHEMA_FILE.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def section_defaults(section: str) -> dict[str, Any]:
    """Defaults of one top-level section (``model``, ``train``, ...), from the schema."""
    properties = _schema()["properties"][section]["properties"]
    return {key: copy.deepcopy(value["default"]) for key, value in properties.items() if "default" in value}


def model_spec(model: dict[str, Any], engine: str) -> ModelSpec:
    """A :class:`ModelSpec` from the ``model`` section (defaults filled in) and a resolved engine."""
    values = section_defaults("model") | model
    values.pop("engine")
    return ModelSpec(engine=engine, **values)


def solver_spec(train: dict[str, Any]) -> SolverSpec:
    """A :class:`SolverSpec` from the ``train`` section (defaults filled in)."""
    values = section_defaults("train") | train
    for key in ("device", *LAUNCH_KEYS):
        values.pop(key)
    return SolverSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def distributed_spec(train: dict[str, Any]) -> DistributedSpec:
    """A :class:`DistributedSpec` from the launch keys of the ``train`` section."""
    values = section_defaults("train") | train
    spec = {key: values[key] for key in LAUNCH_KEYS}
    if spec["machine_rank"] == -1:
        try:
            spec["machine_rank"] = int(os.environ["SLURM_NODEID"])
        except (KeyError, ValueError):
            raise D2RetrainError(
                "train.machine_rank is -1 (from SLURM_NODEID) but SLURM_NODEID is not set; "
                "run inside a SLURM job or give the machine's rank"
            ) from None
    return DistributedSpec(**spec)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a config file, check it against the schema and fill the section defaults.

    Raises:
        D2RetrainError: The file is missing, not YAML, or breaks the schema.
    """
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise D2RetrainError(f"{path}: cannot be read as YAML ({error})") from None
    import jsonschema  # 40 ms: only commands that read a config pay it

    schema = _schema()
    partial = {**schema, "required": []}
    try:
        jsonschema.validate(config, partial)
    except jsonschema.ValidationError as error:
        where = "/".join(str(part) for part in error.absolute_path) or "top level"
        raise D2RetrainError(f"{path}: {where}: {error.message}") from None
    for section in ("model", "train", "inference"):
        config[section] = section_defaults(section) | config.get(section, {})
    return config
