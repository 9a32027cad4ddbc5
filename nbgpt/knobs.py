"""What a knob is: a typed configuration field, with one value parser and one validator wherever its value
comes from.

A knob is a field of a dataclass (TrainConfig, GPTConfig, the pipeline's step configs). Its annotation says
how a value is read, so `-p compile false`, `--compile false`, a JSON config and a preset entry all mean the
same thing: booleans take true/false/1/0 (any case), optional fields take none/null, numbers must parse.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import types
import typing
import warnings
from collections.abc import Sequence

from .errors import NbgptError

_TRUE, _FALSE, _NONE = ("true", "1"), ("false", "0"), ("none", "null")


class ConfigError(NbgptError, ValueError):
    """A model or training configuration that cannot work."""


class ConfigWarning(UserWarning):
    """Settings that run but contradict each other (e.g. a warmup longer than the whole run)."""


@contextlib.contextmanager
def config_warnings_to(echo):
    """Run a block and hand each ConfigWarning it raises to `echo` as a line ("warning: ..."), after it ends;
    other warnings go on as usual. For places where a Python warning would not be seen: a run's terminal, which
    shows train.log, rather than a notebook cell's stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConfigWarning)
        yield
    for warning in caught:
        if issubclass(warning.category, ConfigWarning):
            echo(f"warning: {warning.message}")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)


class _Unset:
    def __repr__(self) -> str:
        return "unset"


UNSET = _Unset()  # the dataclass default of every knob: "not given", until __post_init__ settles it


def knob(default=dataclasses.MISSING, help: str = "", *, default_factory=dataclasses.MISSING):
    """A config field with its one line of help, written beside it: the class reads like a commented list of
    its knobs, and `--help` shows the same line for the field's flag (knob_help), so the two never differ.

    The field starts UNSET, its one default kept in the knob (knob_default): __post_init__ can tell a value
    given from one left out, which a configuration of several layers (TrainConfig: a preset, a recipe) needs,
    and fills what is left with fill_defaults."""
    return dataclasses.field(default=UNSET, metadata={"help": help, "default": default, "factory": default_factory})


def knob_default(f: dataclasses.Field):
    """The default of a dataclass field: a knob's own (see knob), else the field's."""
    default, factory = f.metadata.get("default", f.default), f.metadata.get("factory", f.default_factory)
    return default if factory is dataclasses.MISSING else factory()


def default_of(cls, name: str):
    """The default of knob `name` of config dataclass `cls`."""
    return knob_default(next(f for f in dataclasses.fields(cls) if f.name == name))


def fill_defaults(config) -> None:
    """Every knob of a dataclass instance still unset takes its default (call first in __post_init__)."""
    for f in dataclasses.fields(config):
        if getattr(config, f.name) is UNSET:
            setattr(config, f.name, knob_default(f))


def knob_help(cls) -> dict[str, str]:
    """{field name: its line of help} of a config dataclass ('' for a field declared without knob())."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def did_you_mean(name: str, known) -> str:
    """' (did you mean 'max_steps'?)' for a near miss, else ''."""
    close = difflib.get_close_matches(name, sorted(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _optional_inner(annotation):
    """X for `X | None`, else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return None


def _describe(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def coerce(annotation, value, name: str):
    """`value` as a field annotated `annotation` holds it; text (from -p or a flag) is parsed.

    Raises ConfigError naming the parameter when the value cannot be one of that type.
    """
    inner = _optional_inner(annotation)
    if inner is not None and (value is None or (isinstance(value, str) and value.lower() in _NONE)):
        return None
    kind = inner or annotation
    try:
        return _convert(kind, value)
    except (ValueError, TypeError):
        raise ConfigError(f"{name} must be {_describe(kind)}{' or none' if inner else ''}, got {value!r}") from None


def _convert(kind, value):
    origin = typing.get_origin(kind) or kind
    if origin in (typing.Union, types.UnionType):  # e.g. `int | str`: the first member that takes the value
        for member in typing.get_args(kind):
            with contextlib.suppress(ValueError, TypeError):
                return _convert(member, value)
        raise ValueError
    if kind is bool:
        return _to_bool(value)
    if kind in (int, float):
        return _to_number(kind, value)
    if kind is str:
        if not isinstance(value, str):
            raise ValueError
        return value
    if origin is dict:
        value = json.loads(value) if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise ValueError
        return value
    if isinstance(origin, type) and issubclass(origin, Sequence):
        if isinstance(value, str):  # one string, or a JSON list of them
            value = json.loads(value) if value.startswith("[") else [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError
        return tuple(value)
    raise NotImplementedError(f"no parser for fields annotated {kind!r}")


def _to_bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
        return value.lower() in _TRUE
    raise ValueError("expected true/false/1/0")


def _to_number(kind, value):
    if isinstance(value, bool):
        raise ValueError  # True is an int to Python, never a step count to a user
    if isinstance(value, str):
        value = kind(value.replace("_", "")) if kind is int else float(value)
    if kind is int and not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
        raise ValueError
    return kind(value)


def field_types(cls) -> dict[str, object]:
    """{field name: resolved annotation} of a dataclass (annotations are strings under `from __future__`)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def check_fields(config) -> None:
    """Fill every unset knob with its default, then coerce every field of a dataclass instance to its
    annotation, in place (call from __post_init__)."""
    fill_defaults(config)
    for name, annotation in field_types(type(config)).items():
        setattr(config, name, coerce(annotation, getattr(config, name), name))


def check_known(values: dict, known, what: str) -> None:
    """Refuse keys that are not in `known`, each with its nearest known name."""
    unknown = sorted(set(values) - set(known))
    if unknown:
        hints = "".join(did_you_mean(k, known) for k in unknown)
        listing = "" if hints else f"; the known names: {', '.join(sorted(known))}"
        raise ConfigError(f"unknown {what}(s) {unknown}{hints}{listing}")


def typed_mapping(cls, values: dict, exclude: tuple[str, ...] = ()) -> dict:
    """`values` checked against the fields of `cls` (minus `exclude`) and coerced to their types."""
    types_ = {k: v for k, v in field_types(cls).items() if k not in exclude}
    check_known(values, types_, f"{cls.__name__} field")
    return {k: coerce(types_[k], v, k) for k, v in values.items()}


def differences(saved: dict, current: dict) -> str:
    """The settings on which what was made (`saved`: a checkpoint's run, a dataset) and what is asked now
    disagree, in words ('' if none): how every "made with other settings" refusal names them."""
    return ", ".join(f"{name} {saved.get(name)!r} there, {current.get(name)!r} here"
                     for name in {**saved, **current} if saved.get(name) != current.get(name))
