"""Composing the config a command line asks for, with every mistake named.

Hydra's struct mode refuses a misspelt key written `key=value`, but `+key=value` adds a key
anywhere, and Hydra's own errors advise exactly that, with exit code 1. Here a key the tree does
not have is refused (also with `+`), and Hydra's errors become a ConfigError that names the key
(or group) with the closest valid one and what is allowed.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_loader import ConfigLoader
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException
from omegaconf.errors import ValidationError as OmegaConfValidationError

from bench.config import SCENARIOS_DIR, BenchConfig, ConfigError, from_hydra
from bench.schema import expected_type

# The config groups (a value selects a file): the folders of scenarios/ that hold YAML files
# (scenarios/data holds the sample dataset and trace, hydra/ Hydra's own settings).
GROUPS = tuple(
    sorted(
        p.name
        for p in SCENARIOS_DIR.iterdir()
        if p.is_dir() and p.name != "hydra" and any(p.glob("*.yaml"))
    )
)


def compose(*overrides: str) -> BenchConfig:
    """The config `python -m bench OVERRIDES...` would run; a bad key, file or value raises
    ConfigError naming it."""
    with _hydra() as loader:
        return _compose(overrides, loader)


def compose_sweep(overrides: Sequence[str]) -> list[BenchConfig]:
    """Every config `python -m bench -m OVERRIDES...` would run, in order: each sweep (`k=a,b`,
    `k=range(1,4)`, `k=glob(*)`) expanded as Hydra's basic sweeper expands it."""
    with _hydra() as loader:
        axes: dict[str, list[str]] = {}  # a later override of a key replaces an earlier one
        for override in _parse(overrides, loader):
            key = override.get_key_element()
            if not override.is_sweep_override():
                axes[key] = [f"{key}={override.get_value_element_as_str()}"]
            elif override.is_discrete_sweep():
                axes[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
            else:
                raise ConfigError(
                    f"{override.input_line}: the basic sweeper sweeps lists, ranges and globs "
                    "(k=a,b  k=range(1,9)  k=glob(*)), not intervals"
                )
        return [_compose(job, loader) for job in itertools.product(*axes.values())]


@contextmanager
def _hydra() -> Iterator[ConfigLoader]:
    with initialize_config_dir(config_dir=str(SCENARIOS_DIR), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def _parse(overrides: Sequence[str], loader: ConfigLoader) -> list[Override]:
    try:
        return OverridesParser.create(config_loader=loader).parse_overrides(list(overrides))
    except OverrideParseException as exc:
        raise ConfigError(f"cannot parse {exc.override!r}: {exc.message}") from exc


def _compose(lines: Sequence[str], loader: ConfigLoader) -> BenchConfig:
    overrides = _parse(lines, loader)
    choices = [line for line, o in zip(lines, overrides, strict=True) if _selects_file(o)]
    tree = _hydra_compose(choices)  # the keys that these choices of files give
    for override in overrides:
        if not _selects_file(override) and not override.is_hydra_override():
            _check_key(tree, override)
    return from_hydra(_hydra_compose(list(lines)))


def _selects_file(override: Override) -> bool:
    """`scenario=NAME`, `target=NAME`: chooses a file of a group rather than setting a key."""
    return override.key_or_group in GROUPS


def _hydra_compose(overrides: list[str]) -> DictConfig:
    try:
        return hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        raise ConfigError(_explain(exc)) from exc


def _check_key(tree: DictConfig, override: Override) -> None:
    """Refuse an override of a key the tree does not have. Hydra's struct mode refuses one
    written `key=value`, but `+key=value` adds a key anywhere; new keys belong only in the
    free-form mappings (target.extra_body, target.server_args)."""
    key = override.key_or_group
    parts = key.split(".")
    node: Any = tree
    for depth, part in enumerate(parts):
        parent = ".".join(parts[:depth])
        if isinstance(node, ListConfig):
            return  # an index into a list; Hydra checks it
        if not isinstance(node, DictConfig):
            raise ConfigError(_not_a_mapping(tree, key, parent, node))
        if OmegaConf.get_type(node) is dict:  # a free-form mapping: any key, added with +
            if part in node:
                return
            if override.is_delete():
                raise ConfigError(f"~{key}: {parent} has no key {part!r}")
            if not _adds(override):
                raise ConfigError(
                    f"{key}: a new key in the mapping {parent}; add it with +{override.input_line}"
                )
            return
        if part not in node:
            raise ConfigError(_no_such_key(key, depth, [str(k) for k in node]))
        node = node[part]
    if override.is_delete():
        raise ConfigError(f"~{key}: the schema needs every key; set it instead ({key}=VALUE)")
    value = override.value()
    if isinstance(node, DictConfig) and OmegaConf.get_type(node) is dict:
        new = sorted(str(k) for k in value if k not in node) if isinstance(value, dict) else []
        if new and not _adds(override):
            raise ConfigError(
                f"{key}: new keys ({', '.join(new)}) in a mapping; add them with "
                f"+{override.input_line}"
            )


def _adds(override: Override) -> bool:
    """`+key=value` or `++key=value`: may create keys."""
    return override.is_add() or override.is_force_add()


def _no_such_key(key: str, depth: int, valid: Sequence[str]) -> str:
    """`key` has no part number `depth` among `valid`: the closest valid key, else them all."""
    parts = key.split(".")
    close = difflib.get_close_matches(parts[depth], valid, n=1)
    if close:
        suggestion = ".".join([*parts[:depth], close[0], *parts[depth + 1 :]])
        return f"{key}: no such key; did you mean {suggestion}?"
    where = f"under {'.'.join(parts[:depth])}" if depth else "at the top"
    return f"{key}: no such key; the keys {where} are {', '.join(valid)}"


def _not_a_mapping(tree: DictConfig, key: str, parent: str, value: object) -> str:
    if parent == "runtime":
        return (
            f"{key}: no such key with target={tree.target.kind}; the runtime.* knobs are the "
            "bundled engine's: add target=bundled"
        )
    return f"{key}: no such key; {parent} is {value!r}, not a mapping"


def _explain(exc: BaseException) -> str:
    """Hydra's composition error as one line naming the key (or group) and what is allowed."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, MissingConfigException) and cause.options and cause.missing_cfg_file:
            group, _, name = cause.missing_cfg_file.rpartition("/")
            close = difflib.get_close_matches(name, cause.options, n=1)
            hint = f"did you mean {group}={close[0]}? " if close else ""
            where = f"files in scenarios/{group}/" if group in GROUPS else "options"
            return (
                f"{group}={name}: no such {group}; {hint}the {group} {where} are "
                f"{', '.join(cause.options)}"
            )
        if isinstance(cause, OmegaConfValidationError) and cause.full_key:
            expected = expected_type(cause.full_key)
            if expected is None:  # not a key of the schema (hydra.*): OmegaConf's own words
                return f"{cause.full_key}: {str(cause).splitlines()[0]}"
            return f"{cause.full_key}: expected {expected}, got {cause.value!r}"
        if isinstance(cause, ConfigKeyError | ConfigAttributeError) and cause.full_key:
            parent = cause.parent_node
            if isinstance(parent, DictConfig):
                depth = cause.full_key.count(".")
                return _no_such_key(cause.full_key, depth, [str(k) for k in parent])
        cause = cause.__cause__ or cause.__context__
    return str(exc)
