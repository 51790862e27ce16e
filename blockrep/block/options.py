"""Block options: QEMU keyval strings and JSON into one nested dict, checked by schema.

A schema maps an option name to its type:

* ``"str"``, ``"int"``, ``"bool"``, ``"size"``, ``"any"``
* ``("enum", ("a", "b"))``
* ``"ref"``: a BlockdevRef, either the name of an existing node (str) or a nested
  options dict (opened as a new node)
* ``("list", T)``: keyval gives lists as ``children.0.x``, ``children.1.x``
* a dict: a nested struct with its own schema

Errors carry QEMU's texts. The visitor that reads keyval strings converts them to
the schema's types; the one that reads JSON demands them typed already.
"""

from __future__ import annotations

import json
from typing import Any

from ..errors import OptionError

Schema = dict[str, Any]

SIZE_SUFFIXES = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "e": 1 << 60,
}


def split_keyval(text: str) -> list[tuple[str, str | None]]:
    """Split ``a=b,c.d=e,,f,flag`` into pairs; ``,,`` is a literal comma in a value."""
    pairs: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        key = text[i:j]
        if j < n and text[j] == "=":
            j += 1
            val: list[str] = []
            while j < n:
                if text[j] == ",":
                    if j + 1 < n and text[j + 1] == ",":
                        val.append(",")
                        j += 2
                        continue
                    break
                val.append(text[j])
                j += 1
            pairs.append((key, "".join(val)))
        else:
            if not key:
                raise OptionError("Invalid option name ''")
            pairs.append((key, None))
        i = j + 1
    return pairs


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """Turn dotted keys into nested dicts (QEMU's qdict_crumple)."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        cur = out
        for p in parts[:-1]:
            nxt = cur.get(p)
            if nxt is None:
                nxt = cur[p] = {}
            elif not isinstance(nxt, dict):
                raise OptionError(f"Cannot mix scalar and non-scalar keys: '{p}'")
            cur = nxt
        last = parts[-1]
        if last in cur and isinstance(cur[last], dict) and not isinstance(value, dict):
            raise OptionError(f"Cannot mix scalar and non-scalar keys: '{key}'")
        cur[last] = value
    return out


def parse_keyval(text: str, implied_key: str | None = None) -> dict[str, Any]:
    """Parse QEMU keyval syntax into a nested dict of strings.

    A bare ``word`` becomes ``implied_key=word`` when the caller names one (for
    ``-qmp unix:...``), else ``word=on`` as QemuOpts does for flags.
    """
    flat: dict[str, Any] = {}
    for idx, (key, val) in enumerate(split_keyval(text)):
        if val is None:
            if implied_key is not None and idx == 0:
                key, val = implied_key, key
            else:
                val = "on"
        if not key:
            raise OptionError("Invalid option name ''")
        if key in flat:
            raise OptionError(f"Parameter '{key}' given more than once")
        flat[key] = val
    return nest(flat)


def parse_options(text: str) -> tuple[dict[str, Any], bool]:
    """Parse a ``-blockdev``-style argument: JSON if it starts with ``{``, else keyval.

    Returns (options, typed): ``typed`` is True for JSON, whose scalars are already
    of their schema type.
    """
    stripped = text.lstrip()
    if stripped.startswith("{"):
        try:
            obj = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise OptionError(f"JSON parse error, {e.msg}") from None
        if not isinstance(obj, dict):
            raise OptionError("Expected a JSON object")
        return obj, True
    return parse_keyval(text), False


def parse_size(text: str, name: str = "size") -> int:
    t = text.strip().lower()
    num = t.rstrip("bkmgtpe")
    suffix = t[len(num) :]
    if suffix.endswith("b") and len(suffix) == 2:
        suffix = suffix[0]
    if suffix not in SIZE_SUFFIXES or not num:
        raise OptionError(f"Parameter '{name}' expects a non-negative number below 2^64")
    try:
        value = float(num) if "." in num else int(num, 0)
    except ValueError:
        raise OptionError(f"Parameter '{name}' expects a non-negative number below 2^64") from None
    result = int(value * SIZE_SUFFIXES[suffix])
    if result < 0 or result >= 1 << 64:
        raise OptionError(f"Parameter '{name}' expects a non-negative number below 2^64")
    return result


_JSON_TYPE_NAMES = {"str": "string", "int": "integer", "size": "integer", "bool": "boolean"}


def _full(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert_scalar(kind: str, value: Any, name: str, typed: bool) -> Any:
    if typed:
        ok = {
            "str": isinstance(value, str),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "size": isinstance(value, int) and not isinstance(value, bool) and value >= 0,
            "bool": isinstance(value, bool),
        }[kind]
        if not ok:
            raise OptionError(
                f"Invalid parameter type for '{name}', expected: {_JSON_TYPE_NAMES[kind]}"
            )
        return value
    if not isinstance(value, str):
        raise OptionError(
            f"Invalid parameter type for '{name}', expected: {_JSON_TYPE_NAMES[kind]}"
        )
    if kind == "str":
        return value
    if kind == "bool":
        if value in ("on", "yes", "true", "y"):
            return True
        if value in ("off", "no", "false", "n"):
            return False
        raise OptionError(f"Parameter '{name}' expects 'on' or 'off'")
    if kind == "int":
        try:
            return int(value, 0)
        except ValueError:
            raise OptionError(f"Parameter '{name}' expects an integer") from None
    return parse_size(value, name)


def _list_from_keyval(value: Any, name: str) -> list[Any]:
    if isinstance(value, list):
        return value
    if not isinstance(value, dict):
        raise OptionError(f"Invalid parameter type for '{name}', expected: array")
    try:
        keys = sorted(value, key=int)
    except ValueError:
        raise OptionError(f"Invalid parameter type for '{name}', expected: array") from None
    if [int(k) for k in keys] != list(range(len(keys))):
        raise OptionError(f"Parameter '{name}.{len(keys)}' is missing")
    return [value[k] for k in keys]


def check(
    schema: Schema,
    opts: dict[str, Any],
    *,
    typed: bool,
    path: str = "",
    unknown: str = "Parameter '{name}' is unexpected",
    required: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Validate ``opts`` against ``schema``; return a new dict with converted values.

    ``unknown`` formats the error for an option the schema lacks: QMP and -blockdev
    say "Parameter 'x' is unexpected", -drive says "Block format 'd' does not
    support the option 'x'".
    """
    out: dict[str, Any] = {}
    for key, value in opts.items():
        name = _full(path, key)
        if key not in schema:
            raise OptionError(unknown.format(name=name, key=key))
        out[key] = convert(schema[key], value, name, typed)
    for key in required:
        if key not in out:
            raise OptionError(f"Parameter '{_full(path, key)}' is missing")
    return out


def convert(spec: Any, value: Any, name: str, typed: bool) -> Any:
    """Convert one option value to the type ``spec`` describes."""
    if spec == "any":
        return value
    if spec == "ref":
        if value is None:
            return None
        if isinstance(value, (str, dict)):
            return value
        raise OptionError(f"Invalid parameter type for '{name}', expected: object")
    if isinstance(spec, str):
        return _convert_scalar(spec, value, name, typed)
    if isinstance(spec, tuple) and spec[0] == "enum":
        if not isinstance(value, str):
            raise OptionError(f"Invalid parameter type for '{name}', expected: string")
        if value not in spec[1]:
            raise OptionError(f"Parameter '{name}' does not accept value '{value}'")
        return value
    if isinstance(spec, tuple) and spec[0] == "list":
        items = _list_from_keyval(value, name) if not typed else value
        if not isinstance(items, list):
            raise OptionError(f"Invalid parameter type for '{name}', expected: array")
        return [convert(spec[1], v, f"{name}[{i}]", typed) for i, v in enumerate(items)]
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise OptionError(f"Invalid parameter type for '{name}', expected: object")
        return check(spec, value, typed=typed, path=name)
    raise TypeError(f"bad schema entry {spec!r}")


# Options every node takes (QAPI BlockdevOptions base members).
COMMON_SCHEMA: Schema = {
    "driver": "str",
    "node-name": "str",
    "discard": ("enum", ("ignore", "unmap", "off", "on")),
    "cache": {"direct": "bool", "no-flush": "bool"},
    "read-only": "bool",
    "auto-read-only": "bool",
    "force-share": "bool",
    "detect-zeroes": ("enum", ("off", "on", "unmap")),
}
