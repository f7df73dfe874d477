"""Reading YAML input strictly: syntax errors and duplicate keys become one-line SpecErrors.

PyYAML resolves scalars by YAML 1.1 rules, under which ``1e9`` and ``1.0e9`` are strings (1.1 wants a
dot and a signed exponent: ``1.0e+9``).  Every YAML file and ``--set`` value of the testbed is read
with one loader that also takes the YAML 1.2 forms as floats, so ``bw_mbit: 1e3`` is a number.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from testbed.spec.check import read_input
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

# YAML 1.2 floats with an exponent (1e9, 1.0e9, .5E-3, 2E+06); the 1.1 resolver already reads the rest.
# add_implicit_resolver copies the resolver table for the subclass, so yaml.safe_load is unchanged.
_FLOAT_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_EXPONENT, list("-+0123456789."))


def parse_yaml(text: str, source: str | Path, field: str = "yaml") -> Any:
    """Parse YAML text; errors read ``SOURCE: FIELD: line N, column M: problem``."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(str(e.problem or e.context or "syntax error").split())
        # a duplicate key is well-formed YAML that the testbed refuses: no "syntax error" for it
        prefix = "" if isinstance(e, yaml.constructor.ConstructorError) else "syntax error at "
        raise SpecError(source, field, f"{prefix}{where}{problem}") from None
    except yaml.YAMLError as e:
        raise SpecError(source, field, "syntax error: " + " ".join(str(e).split())) from None


def load_yaml(path: str | Path, source: str | Path | None = None, field: str = "file") -> Any:
    """Read and parse a YAML file.

    A missing or unreadable file is reported as ``SOURCE: FIELD: PATH: file not found`` (``source`` is the
    file that names this one, e.g. a suite naming its prompt set; default: the file itself); syntax
    errors and duplicate keys name the file they are in: ``FILE: yaml: syntax error at line N, ...``.
    """
    data = read_input(path, source, field)
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        raise SpecError(path, "file", f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    return parse_yaml(text, path)
