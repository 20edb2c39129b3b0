"""Config files and ``--set`` overrides as nested dicts, before they are validated against the keys
(config.py): YAML read safely, ``extends:`` followed (relative to the file naming it), and every reading
problem one line naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fedhubert.errors import ConfigError

# libyaml's loader when PyYAML has it: the same documents, ten times faster than the pure-Python one (a
# script loads the 120-line config in 0.03 s instead of 0.3 s), and a nesting limit instead of recursion.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_LOADER)  # noqa: S506 - a safe loader


def read_layers(path: Path, seen: tuple[Path, ...] = ()) -> list[tuple[dict, str]]:
    """The mappings of ``path`` and of the files it extends, base first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"config file {path} extends itself")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        doc = _yaml(path.read_bytes().decode("utf-8")) or {}
    except UnicodeDecodeError as exc:
        line = exc.object[:exc.start].count(b"\n") + 1
        raise ConfigError(f"config file {path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is nested deeper than the YAML parser can follow") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read ({exc.strerror})") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections")
    base = doc.pop("extends", None)
    if base is not None and not isinstance(base, str):
        raise ConfigError(f"config key 'extends' in {path} must be a file name, got {base!r}")
    layers = read_layers(path.parent / base, seen + (path,)) if base else []
    return layers + [(doc, str(path))]


def parse_override(text: str) -> dict:
    """``section.key=value`` (value read as YAML) → nested dict."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    dotted, raw = text.split("=", 1)
    try:
        value = _yaml(raw) if raw.strip() else ""
    except (yaml.YAMLError, RecursionError):
        value = raw
    nested: dict = value
    for part in reversed(dotted.strip().split(".")):
        if not part:
            raise ConfigError(f"--set {text!r}: empty key name")
        nested = {part: nested}
    return nested
