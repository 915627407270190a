"""The configuration: its schema (package data), the defaults it holds (their one source), validation."""

import copy
import functools
import importlib.resources
import logging
from pathlib import Path
from typing import Any

import yaml

from d2retrain.core.errors import D2RetrainError

logger = logging.getLogger(__name__)

__all__ = [
    "SCHEMA_FILE",
    "load_schema",
    "section_defaults",
    "subset_defaults",
    "val_split_defaults",
    "allowed_values",
    "load_config",
]

# Package data: found the same way in a source checkout, an editable install and a wheel. The
# Snakefile validates against this very file (src/d2retrain/core/config.schema.yaml).
SCHEMA_FILE = importlib.resources.files("d2retrain.core") / "config.schema.yaml"


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


def subset_defaults() -> dict[str, Any]:
    """Defaults of the keys of each subset (``subsets.<name>.*``), from the schema."""
    properties = _schema()["properties"]["subsets"]["additionalProperties"]["properties"]
    return {key: copy.deepcopy(value["default"]) for key, value in properties.items() if "default" in value}


def val_split_defaults() -> dict[str, Any]:
    """Defaults of a dataset's ``val_split`` (``fraction``, ``seed``), from the schema."""
    properties = _schema()["$defs"]["val_split"]["properties"]
    return {key: copy.deepcopy(value["default"]) for key, value in properties.items() if "default" in value}


def allowed_values(key: str) -> tuple[str, ...]:
    """The schema's enum of a key, named by its dotted path (``model.engine``; ``*`` for any subset:
    ``subsets.*.balance``; of its items for a list: ``export.formats``): the one list of balance
    modes, engines and export formats."""
    node = _schema()
    for part in key.split("."):
        node = node["additionalProperties"] if part == "*" else node["properties"][part]
    return tuple(node["items"]["enum"] if node.get("type") == "array" else node["enum"])


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
