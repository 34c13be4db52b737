"""Parameter overrides of a flow run, written into params.yaml the way `dvc exp run -S` does.

The stages read params.yaml and DVC tracks it, so an override written there is what the stages use, what
dvc.lock and the MLflow run record, and what makes DVC re-run the stages that depend on it. Comments and
order are kept (ruamel.yaml's round trip, as DVC does). Only existing keys can be set; a value that makes
params.yaml invalid is refused and the file is left as it was.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from catdog.config import PARAMS_FILE, load_params
from catdog.errors import ConfigError


def parse(pairs: Sequence[str]) -> dict[str, Any]:
    """`key.path=value` strings (values in YAML: 3, 0.5, true, [1, 2], text) to a mapping."""
    overrides: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"params override {pair!r}: expected key.path=value, e.g. train.epochs_frozen=2"
            )
        try:
            overrides[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"params override {pair!r}: the value is not valid YAML ({exc})") from exc
    return overrides


def apply(root: Path, overrides: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Write `overrides` into root/params.yaml; returns {key: (old, new)} of the values that changed."""
    path = root / PARAMS_FILE
    if not overrides:
        return {}
    original = path.read_text()
    data = _round_trip().load(original)
    changed: dict[str, tuple[Any, Any]] = {}
    for key, value in overrides.items():
        parent, leaf = _locate(data, key, path)
        if parent[leaf] != value:
            changed[key] = (parent[leaf], value)
            parent[leaf] = value
    if not changed:
        return {}
    text = io.StringIO()
    _round_trip().dump(data, text)
    path.write_text(text.getvalue())
    try:
        load_params(path)
    except ConfigError as exc:
        path.write_text(original)
        raise ConfigError(f"params overrides refused, {path} left unchanged: {exc}") from exc
    return changed


def _round_trip() -> Any:
    """ruamel.yaml (DVC's YAML library) keeping comments, order, quotes, long lines and `null`."""
    from ruamel.yaml import YAML

    yaml_rt = YAML(typ="rt")
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096
    yaml_rt.representer.add_representer(
        type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return yaml_rt


def _locate(data: Any, key: str, path: Path) -> tuple[Any, str]:
    """The mapping holding the last part of the dotted `key`, and that part; unknown keys are an error."""
    parts = key.split(".")
    node = data
    for depth, part in enumerate(parts):
        if not isinstance(node, Mapping) or part not in node:
            where = ".".join(parts[:depth]) or "the top level"
            raise ConfigError(f"params override {key!r}: {path} has no key {part!r} under {where}")
        if depth == len(parts) - 1:
            return node, part
        node = node[part]
    raise ConfigError(f"params override {key!r}: empty key")
