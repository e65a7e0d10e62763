"""A RunSpec file with ``--set FIELD=VALUE`` overrides, read as YAML (torch-free).

Shared by ``batchlab train`` (which validates the result) and ``batchlab submit`` / the
notebook client (whose server does): ``--set milestones=[30,60]``, ``--set field=`` is null.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any


class SpecFileError(ValueError):
    """A spec file or override that cannot be read; the message names it."""


def read_spec(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> dict[str, Any]:
    """The fields in the YAML (or JSON) file ``path``, ``overrides`` applied; not validated.

    Raises ``FileNotFoundError`` for a missing file, else ``SpecFileError``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"spec file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise SpecFileError(f"cannot read spec file {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise SpecFileError(f"spec file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise SpecFileError(f"{path}: a spec file holds a mapping of RunSpec fields")
    data.update(parse_override(item) for item in overrides)
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """``"workers=32"`` -> ``("workers", 32)``: the value read as YAML."""
    import yaml

    field, sep, raw = text.partition("=")
    field = field.strip()
    if not sep or not field:
        raise SpecFileError(f"--set: expected FIELD=VALUE, got {text!r}")
    try:
        return field, yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise SpecFileError(f"--set {field}: {raw!r} is not valid YAML: {exc}") from exc
