"""The configuration: its schema (package data), the defaults it holds (their one source), validation."""

import copy
import difflib
import functools
import importlib.resources
import logging
from collections.abc import Mapping
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
    "schema_node",
    "check_key_value",
    "MOVED_KEYS",
    "check_moved_keys",
    "with_defaults",
    "load_config",
    "check_config",
    "ConfigError",
    "dotted_keys",
]


class ConfigError(D2RetrainError):
    """A configuration breaks the schema (one line: where, what, what is allowed)."""


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
    node = schema_node(key)
    return tuple(node["items"]["enum"] if node.get("type") == "array" else node["enum"])


def schema_node(key: str) -> dict[str, Any]:
    """The schema of one key, named by its dotted path (``train.augment.crop``; ``*`` for any
    subset: ``subsets.*.balance``).

    Raises:
        ConfigError: The path names no key; the nearest known one is suggested.
    """
    node = _schema()
    walked: list[str] = []
    for part in key.split("."):
        known = node.get("properties", {})
        if part == "*" and isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        elif part in known:
            node = known[part]
        else:
            close = difflib.get_close_matches(part, list(known), n=1, cutoff=0.5)
            hint = (
                f"did you mean {'.'.join([*walked, close[0]])}?"
                if close
                else f"known: {', '.join(known) or 'none'}"
            )
            raise ConfigError(f"{key} is not a key; {hint}")
        walked.append(part)
    return node


def check_key_value(key: str, value: Any, source: str = "config", label: str | None = None) -> None:
    """Check one value against the schema of its key (:func:`schema_node`), in one line naming the
    key as ``label`` (the key itself by default).

    Raises:
        ConfigError: The key is unknown or the value breaks its schema.
    """
    import jsonschema

    try:
        node = schema_node(key)
    except ConfigError as unknown:
        raise ConfigError(f"{source}: {unknown}") from None
    validator = jsonschema.Draft202012Validator({**node, "$defs": _schema()["$defs"]})
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    if error is not None:
        raise ConfigError(f"{source}: {_explained(error, label or key)}")


# Keys that moved: old dotted path -> new one. A config with an old key fails naming the new one.
MOVED_KEYS = {
    "train.min_size_test": "model.min_size_test",
    "train.max_size_test": "model.max_size_test",
}


def check_moved_keys(config: dict[str, Any], source: str = "config") -> None:
    """Refuse a key that moved (:data:`MOVED_KEYS`), naming its new place.

    Raises:
        ConfigError: The first moved key found.
    """
    for old, new in MOVED_KEYS.items():
        section, key = old.split(".")
        if isinstance(config.get(section), dict) and key in config[section]:
            raise ConfigError(f"{source}: {old} moved to {new}; rename the key (same meaning and value)")


def with_defaults(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a configuration with the schema's defaults filled in, at every depth (sections,
    their nested objects, each subset and dataset): the one place defaults are filled, for the CLI
    (:func:`load_config`), the Snakefile, the Python API and model folders written by older versions.
    The configuration is not checked here (:func:`check_config` does that)."""
    return _filled(_schema(), copy.deepcopy(config))


def _filled(node: dict[str, Any], value: Any) -> Any:
    if "$ref" in node:  # local references only: #/$defs/<name>
        node = _schema()["$defs"][node["$ref"].rsplit("/", 1)[1]]
    if not isinstance(value, dict) or node.get("type") != "object":
        return value
    properties = node.get("properties", {})
    for key, sub in properties.items():
        if key not in value and "default" in sub:
            value[key] = copy.deepcopy(sub["default"])
        if key in value:
            value[key] = _filled(sub, value[key])
    extra = node.get("additionalProperties")
    if isinstance(extra, dict):
        for key in value.keys() - properties.keys():
            value[key] = _filled(extra, value[key])
    return value


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a config file, check it against the schema and fill the defaults (:func:`with_defaults`).

    Raises:
        D2RetrainError: The file is missing, not YAML, or breaks the schema.
    """
    try:
        config = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise D2RetrainError(f"{path}: cannot be read as YAML ({error})") from None
    check_config(config, str(path), required=False)
    return with_defaults(config)


def check_config(config: dict[str, Any], source: str = "config", required: bool = True) -> None:
    """Check a configuration against the schema; the first problem as one line.

    An unknown key names the nearest known one (``config: train.iteration is not a key; did you
    mean train.iterations?``); a wrong value names the key, the value and what is allowed. No
    schema dump.

    Args:
        config: The configuration (not changed).
        source: What to call it in the message (a file name, or ``config``).
        required: Whether keys the schema requires must be there (a partial config: no).

    Raises:
        ConfigError: The first problem found; a key that moved names its new place.
    """
    import jsonschema  # 40 ms: only commands that read a config pay it

    check_moved_keys(config, source)
    schema = _schema() if required else {**_schema(), "required": []}
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(schema).iter_errors(config))
    if error is not None:
        raise ConfigError(f"{source}: {_explained(error)}")


def _explained(error: Any, prefix: str = "") -> str:
    """One line for a jsonschema error: the key path (below ``prefix``), the value, what is allowed."""
    where = ".".join([prefix] * bool(prefix) + [str(part) for part in error.absolute_path])
    if error.validator == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        unknown = [key for key in error.instance if key not in known]
        if known and unknown:
            key = f"{where}.{unknown[0]}" if where else str(unknown[0])
            close = difflib.get_close_matches(str(unknown[0]), known, n=1, cutoff=0.5)
            hint = (
                f"did you mean {where + '.' if where else ''}{close[0]}?"
                if close
                else f"known: {', '.join(known)}"
            )
            return f"{key} is not a key; {hint}"
    if error.validator in ("oneOf", "anyOf") and isinstance(error.instance, dict):
        forms = [" + ".join(sub["required"]) for sub in error.validator_value if sub.get("required")]
        has = ", ".join(map(str, error.instance)) or "nothing"
        if forms:
            return f"{where} needs {' or '.join(forms)}; it has {has}"
    if error.validator == "required":
        return f"{where or 'the top level'} lacks {error.message.split(' is a required')[0]}"
    value = _short(error.instance)
    allowed = {
        "enum": lambda v: f"one of {', '.join(map(str, v))}",
        "type": lambda v: f"of type {v if isinstance(v, str) else ' or '.join(v)}",
        "minimum": lambda v: f">= {v}",
        "maximum": lambda v: f"<= {v}",
        "exclusiveMinimum": lambda v: f"> {v}",
        "exclusiveMaximum": lambda v: f"< {v}",
        "minItems": lambda v: f"a list of at least {v} item(s)",
        "pattern": lambda v: f"matching {v}",
    }.get(str(error.validator))
    if allowed is not None:
        return f"{where or 'the top level'} is {value}; expected {allowed(error.validator_value)}"
    return f"{where or 'the top level'}: {_short(error.message, 160)}"


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) and limit > 60 else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def dotted_keys(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as one level of dotted keys (``{"solver": {"base_lr": 0.01}}`` ->
    ``{"solver.base_lr": 0.01}``), down to the values that are not mappings."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            flat |= dotted_keys(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
