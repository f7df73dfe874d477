"""Reading YAML input files strictly: syntax errors and duplicate keys become one-line SpecErrors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from testbed.spec.errors import SpecError


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: dict[Any, yaml.Node] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            dup = key in seen
        except TypeError:  # unhashable key: let the base constructor report it
            break
        if dup:
            first = seen[key].start_mark.line + 1
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first})", key_node.start_mark
            )
        seen[key] = key_node
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file; errors read ``FILE: yaml: line N, column M: problem``."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SpecError(path, "file", "not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(path, "file", f"cannot read ({e.__class__.__name__}: {e})") from None
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(e.problem or e.context or "syntax error").split())
        raise SpecError(path, "yaml", f"{where}{problem}") from None
    except yaml.YAMLError as e:
        raise SpecError(path, "yaml", " ".join(str(e).split())) from None
