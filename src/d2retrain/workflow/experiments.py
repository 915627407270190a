"""A subset's experiments: named variants and a grid of overrides, resolved and checked at parse time.

A variant overrides keys of ``model.*`` and ``train.*`` and the subset's ``balance`` and
``repeat_threshold``; the data, categories and every other subset key stay the subset's. Grid
points are named as Snakemake's ``Paramspace`` names them, ``key~value`` joined by ``/``
(``base_lr~0.01/iterations~200``), the key's last part unless two grid keys share it.
"""

import copy
import dataclasses
import itertools
import logging
import re
from collections.abc import Mapping
from typing import Any

from d2retrain.core.config import ConfigError, check_key_value, schema_node

logger = logging.getLogger(__name__)

__all__ = ["Variant", "resolve_experiments", "flat_overrides", "SUBSET_KEYS"]

# The subset keys a variant may change (the rest set the subset's data and classes).
SUBSET_KEYS = ("balance", "repeat_threshold", "seeds")
_SECTIONS = ("model", "train")
_NAME_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.,+=~-]*$")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One experiment of a subset, resolved.

    Attributes:
        name: Its folder under ``results/<subset>/experiments/`` (grid names hold ``/``).
        overrides: Dotted key -> value, as the config gives them.
        model: The ``model`` section it trains with (the config's, overrides applied).
        train: The ``train`` section it trains with.
        balance: The training split's balancing.
        repeat_threshold: The repeat-factor threshold (``balance: repeat``).
        seeds: How many seeds the variant trains.
        variant: The variant it is a seed of (its own name for a variant of one seed).
    """

    name: str
    overrides: dict[str, Any]
    model: dict[str, Any]
    train: dict[str, Any]
    balance: str
    repeat_threshold: float
    seeds: int = 1
    variant: str = ""

    def seed_runs(self) -> list["Variant"]:
        """The runs it trains: itself for one seed, else ``<name>/seed~<k>`` for k in 0..seeds-1,
        with ``train.seed`` the variant's plus k."""
        if self.seeds == 1:
            return [dataclasses.replace(self, variant=self.name)]
        return [
            dataclasses.replace(
                self,
                name=f"{self.name}/seed~{k}",
                train={**self.train, "seed": self.train["seed"] + k},
                variant=self.name,
            )
            for k in range(self.seeds)
        ]

    def data_files(self, subset: Mapping[str, Any]) -> tuple[str, str | None]:
        """Its training annotations and repeat-factor file (None without ``balance: repeat``),
        relative to ``results/<subset>/data/``: the subset's own where the settings are its own,
        else under ``balance~<mode>/`` (variants with one setting share them)."""
        own_balance = self.balance == subset["balance"]
        train = "train.json" if own_balance else f"balance~{self.balance}/train.json"
        if self.balance != "repeat":
            return train, None
        if own_balance and self.repeat_threshold == subset["repeat_threshold"]:
            return train, "train_repeat_factors.json"
        return train, f"balance~repeat/repeat_threshold~{self.repeat_threshold}.json"


def flat_overrides(overrides: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """An experiment's nested overrides as dotted keys (``{train: {base_lr: 0.01}}`` ->
    ``{"train.base_lr": 0.01}``), down to the keys whose schema is not an object of keys.

    Raises:
        ConfigError: A key the schema does not know.
    """
    flat: dict[str, Any] = {}
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        node = schema_node(_schema_key(dotted))
        if isinstance(value, dict) and "properties" in node:
            flat |= flat_overrides(value, f"{dotted}.")
        else:
            flat[dotted] = value
    return flat


def resolve_experiments(
    subset_name: str, subset: Mapping[str, Any], model: Mapping[str, Any], train: Mapping[str, Any]
) -> dict[str, Variant]:
    """A subset's runs: its variants, named experiments then grid points, each once per seed
    (:meth:`Variant.seed_runs`); ``{}`` when it has neither.

    Args:
        subset_name: The subset's key (for messages).
        subset: The subset's config, defaults filled.
        model: The config's ``model`` section, defaults filled.
        train: The config's ``train`` section, defaults filled.

    Raises:
        ConfigError: One line, for an unsafe name, an unknown key, a key variants cannot change, a
            bad value, or two variants with one name.
    """
    where = f"subsets.{subset_name}"
    named = {
        name: _flat_experiment(f"{where}.experiments.{name}", overrides or {})
        for name, overrides in dict(subset.get("experiments") or {}).items()
    }
    for name in named:
        _check_name(f"{where}.experiments", name)
    variants: dict[str, dict[str, Any]] = dict(named)
    for name, overrides in _grid_points(f"{where}.grid", dict(subset.get("grid") or {})):
        if name in variants:
            raise ConfigError(f"{where}.grid: two variants are named {name}; give the values distinct names")
        variants[name] = overrides
    return {
        run.name: run
        for name, overrides in variants.items()
        for run in _applied(name, overrides, subset, model, train, f"{where}.experiments.{name}").seed_runs()
    }


def _schema_key(dotted: str) -> str:
    section = dotted.split(".", 1)[0]
    if section in _SECTIONS:
        return dotted
    if dotted in SUBSET_KEYS:
        return f"subsets.*.{dotted}"
    fixed = dotted in schema_node("subsets.*")["properties"]
    raise ConfigError(
        f"{dotted}: variants cannot change it (it sets the subset's data or classes): make another subset"
        if fixed
        else f"{dotted} is not a key variants change; they change model.*, train.*, {', '.join(SUBSET_KEYS)}"
    )


def _flat_experiment(where: str, overrides: Mapping[str, Any]) -> dict[str, Any]:
    try:
        flat = flat_overrides(overrides)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    for key, value in flat.items():
        check_key_value(_schema_key(key), value, where, label=key)
    return flat


def _check_name(where: str, name: str) -> None:
    for part in name.split("/"):
        if not _NAME_PART.match(part) or part in (".", ".."):
            raise ConfigError(
                f"{where}: {name!r} is not a safe folder name; use letters, digits and _ . - (no spaces)"
            )


def _grid_points(where: str, grid: Mapping[str, list[Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The grid's cartesian product, each point named ``key~value/...`` in the grid's key order."""
    if not grid:
        return []
    for key, values in grid.items():
        try:
            schema_key = _schema_key(key)
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
        for value in values:
            check_key_value(schema_key, value, where, label=key)
    last = [key.rsplit(".", 1)[-1] for key in grid]
    labels = [part if last.count(part) == 1 else key for key, part in zip(grid, last, strict=True)]
    points: list[tuple[str, dict[str, Any]]] = []
    for point in itertools.product(*grid.values()):
        name = "/".join(f"{label}~{_value_name(value)}" for label, value in zip(labels, point, strict=True))
        _check_name(where, name)
        if any(name == seen for seen, _ in points):
            raise ConfigError(f"{where}: two grid points are named {name}; a value is repeated")
        points.append((name, dict(zip(grid, point, strict=True))))
    return points


def _value_name(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(_value_name, value))
    return str(value)


def _applied(
    name: str,
    overrides: dict[str, Any],
    subset: Mapping[str, Any],
    model: Mapping[str, Any],
    train: Mapping[str, Any],
    where: str,
) -> Variant:
    sections = {"model": copy.deepcopy(dict(model)), "train": copy.deepcopy(dict(train))}
    values = {key: subset[key] for key in SUBSET_KEYS}
    for key, value in overrides.items():
        parts = key.split(".")
        if parts[0] not in sections:
            values[key] = value
            continue
        node = sections[parts[0]]
        for part in parts[1:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = copy.deepcopy(value)
    for section, resolved in sections.items():
        for key, value in resolved.items():
            check_key_value(f"{section}.{key}", value, where)
    return Variant(name, overrides, sections["model"], sections["train"], **values)
