"""Configs are dataclasses holding the papers' defaults; a YAML file and command-line flags override them.

    cfg = load_config(RobustifyConfig, yaml_path="my.yaml", overrides={"lr": 0.01})
    add_dataclass_flags(parser, RobustifyConfig)        # --lr, --kl-weight, ... (one flag per field)
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import math
import numbers
import os
import typing


def _field_types(cls):
    return typing.get_type_hints(cls)


def parse_float(value) -> float:
    """A float, also written as a fraction: ``"8/255"`` (how attack budgets are usually given)."""
    if isinstance(value, str) and "/" in value:
        num, den = value.split("/", 1)
        if float(den) == 0:  # a ValueError, so that argparse reports it as a bad flag value
            raise ValueError(f"{value!r} divides by zero")
        return float(num) / float(den)
    return float(value)


def _number_flag(text: str) -> float:
    """``parse_float`` for argparse: its message, not "invalid parse_float value"."""
    import argparse

    try:
        return parse_float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or a fraction such as 8/255"
                                         + (f" ({err})" if "divides by zero" in str(err) else "")) from None


def _coerce(value, annotation, name):
    """A flag's string or a YAML value as the field's type; anything that would only pass by a silent conversion
    (``true`` as an int, a list as a string, an empty YAML key as a path) is an error naming the option."""
    optional = type(None) in typing.get_args(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if value is None:
        if optional:
            return None
        raise ValueError(f"config: {name} has no value (an empty YAML key?); give one, or remove the line to keep "
                         "the default")
    if args and (optional or typing.get_origin(annotation) is typing.Union):
        return _coerce(value, args[0], name)
    if annotation is bool:
        if isinstance(value, bool) or value in (0, 1) and isinstance(value, int):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"config: {name} must be true/false, got {value!r}")
    if annotation in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float, str))):
        raise ValueError(f"config: {name} must be a number, got {value!r}")
    if annotation is int and isinstance(value, float) and not value.is_integer():  # int(2.5) would be 2
        raise ValueError(f"config: {name} must be a whole number, got {value!r}")
    if annotation is str and (isinstance(value, bool) or not isinstance(value, (str, int, float))):
        raise ValueError(f"config: {name} must be a string, written as on the command line (a list of names is one "
                         f"string with its separator, e.g. 'cifar10,stl10'), got {value!r}")
    if annotation in (int, float, str):
        try:
            return parse_float(value) if annotation is float else annotation(value)
        except (TypeError, ValueError) as err:
            raise ValueError(f"config: {name} must be {annotation.__name__}, got {value!r}") from err
    return value


# Help of the training commands' --resume and --overwrite (the loop refuses both together).
RESUME_HELP = ("(default: False) continue the run in --out from its last.pt, or start one where there is none; "
               "without it, an --out that holds a run is an error")
OVERWRITE_HELP = "(default: False) delete the run in --out (checkpoints, log) and start over; not with --resume"


def check_ranges(cfg, who: str, *, positive=(), non_negative=(), fraction=(), pixel_budget=()) -> None:
    """A ValueError naming the first field of ``cfg`` out of its range: ``positive`` (> 0), ``non_negative`` (>= 0),
    ``fraction`` (in [0, 1), as SGD's momentum), ``pixel_budget`` (an L-inf budget or step in (0, 1] pixel units).
    NaN and infinities are out of every range. Every field's type is checked first (``check_field_types``)."""
    check_field_types(cfg, who)
    for names, ok, wanted in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                              (fraction, lambda v: 0 <= v < 1, "in [0, 1)")):
        for name in names:
            value = getattr(cfg, name)
            if not ok(value):
                raise ValueError(f"{who}: {name} must be {wanted}, got {value}")
            if math.isinf(value):  # a weight or lr of inf makes every loss inf, reported later as bad data
                raise ValueError(f"{who}: {name} must be finite, got {value}")
    for name in pixel_budget:
        check_pixel_budget(getattr(cfg, name), name, who)


def check_field_types(cfg, who: str) -> None:
    """A TypeError naming a field of the dataclass ``cfg`` whose value is not of its annotated bool / int / float /
    str type (an int is a float; a bool is neither): configs built in Python get no conversion, so
    ``attack_eps="8/255"`` or ``iterations=4.5`` would fail later inside a comparison or a range()."""
    if not dataclasses.is_dataclass(cfg):
        return
    kinds = {bool: (bool,), int: (numbers.Integral,), float: (numbers.Real,), str: (str,)}
    for name, annotation in _field_types(type(cfg)).items():
        value = getattr(cfg, name)
        if annotation not in kinds or value is None:
            continue
        if not isinstance(value, kinds[annotation]) or (annotation is not bool and isinstance(value, bool)):
            hint = " (in Python give the number, e.g. 8 / 255)" if isinstance(value, str) and annotation is float \
                else ""
            raise TypeError(f"{who}: {name} must be {annotation.__name__}, got {value!r} "
                            f"({type(value).__name__}){hint}")


def repeated(items) -> list:
    """The items that occur more than once, sorted (names given twice, for the error that lists them)."""
    counts = collections.Counter(items)
    return sorted(item for item, count in counts.items() if count > 1)


def check_choices(cfg, who: str, choices: dict) -> None:
    """A ValueError naming the first field of ``cfg`` whose value is not among ``choices[field]``."""
    for name, allowed in choices.items():
        value = getattr(cfg, name)
        if value not in allowed:
            raise ValueError(f"{who}: {name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


def check_pixel_budget(value, name: str, who: str) -> None:
    """An L-inf budget or step size (``*alpha``) in [0, 1] pixel units: 8 (meaning 8/255) would let the attack reach
    any image."""
    if not 0 < value <= 1:  # NaN too
        hint = f"; did you mean {value:g}/255?" if 1 < value <= 255 else ""
        kind = "step size" if name.endswith("alpha") else "budget"
        raise ValueError(f"{who}: {name} is an L-inf {kind} in (0, 1] pixel units (write 8/255 for 8 of 255 levels), "
                         f"got {value}{hint}")


def _unique_key_loader():
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last without a word)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            lines = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = lines.get(key)
                except TypeError:  # an unhashable key: the base class names it
                    break
                if first is not None:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (first at line {first})", key_node.start_mark)
                lines[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep)

    return UniqueKeyLoader


def load_config(cls, yaml_path: str | None = None, overrides: dict | None = None):
    """An instance of dataclass ``cls``: its defaults, then the YAML file's keys, then ``overrides`` (None = unset).
    Unknown keys are an error that lists the valid ones."""
    values = {}
    if yaml_path:
        if not os.path.isfile(yaml_path):
            raise FileNotFoundError(f"config: {yaml_path!r} does not exist")
        import yaml

        with open(yaml_path) as f:
            try:
                loaded = yaml.load(f, Loader=_unique_key_loader()) or {}
            except yaml.YAMLError as err:
                where = getattr(err, "problem_mark", None)
                at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
                raise ValueError(f"config: {yaml_path!r} is not valid YAML{at}: "
                                 f"{getattr(err, 'problem', None) or err}") from err
        if not isinstance(loaded, dict):
            raise ValueError(f"config: {yaml_path!r} must hold a mapping of option: value")
        keys = [k for k in loaded if not isinstance(k, str)]
        if keys:
            raise ValueError(f"config: {yaml_path!r} has key {keys[0]!r}, which is not an option name")
        spelled = {}
        for key in loaded:
            name = key.replace("-", "_")
            if name in spelled:
                raise ValueError(f"config: {yaml_path!r} sets {name} twice, as {spelled[name]!r} and as {key!r}")
            spelled[name], values[name] = key, loaded[key]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    types = _field_types(cls)
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(f"config: unknown option(s) {unknown} for {cls.__name__}; valid: {sorted(types)}")
    return cls(**{k: _coerce(v, types[k], k) for k, v in values.items()})


def field_comments(cls) -> dict:
    """``{field: comment}``: the ``# comment`` ending each field's line in the sources of dataclass ``cls`` and its
    bases (a subclass's wins), with the comment lines that continue it (while a parenthesis is open), or else the
    comment lines just above the field; it says what the values mean. {} where the source cannot be read."""
    import inspect
    import io
    import tokenize

    comments = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        line_tokens = {}
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            line_tokens.setdefault(token.start[0], []).append(token)
        above, continued = [], None  # comment lines waiting for a field; the field whose comment goes on
        for _, tokens in sorted(line_tokens.items()):
            words = [t for t in tokens if t.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL,
                                                         tokenize.NEWLINE)]
            text = words[-1].string.lstrip("#").strip() if words and words[-1].type == tokenize.COMMENT else None
            if len(words) == 1 and text is not None:  # a comment line
                if continued is not None:
                    comments[continued] += " " + text
                    if comments[continued].count("(") <= comments[continued].count(")"):
                        continued = None
                else:
                    above.append(text)
                continue
            continued = None
            if (len(words) > 2 and words[0].type == tokenize.NAME and words[1].string == ":"
                    and words[0].string in klass.__dataclass_fields__):
                if text is not None:  # a comment left with an open parenthesis goes on in the lines below
                    comments[words[0].string] = text
                    continued = words[0].string if text.count("(") > text.count(")") else None
                elif above:
                    comments[words[0].string] = " ".join(above)
            above = []
    return comments


def _shown_default(name: str, default):
    """A budget or step as 8/255 when it is a whole number of levels (0.0313725... says nothing)."""
    if isinstance(default, float) and ("eps" in name or "alpha" in name) and 0 < default <= 1:
        levels = default * 255
        if abs(levels - round(levels)) < 1e-9:
            return f"{round(levels)}/255"
    return default


def add_dataclass_flags(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One ``--flag-name`` per field of ``cls`` (default None, so unset flags do not override the YAML file). The help
    shows the field's default and the comment on its line in the source, or its ``metadata["help"]``."""
    types = _field_types(cls)
    comments = field_comments(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        flag = "--" + field.name.replace("_", "-")
        annotation = types[field.name]
        default = field.default if field.default is not dataclasses.MISSING else None
        comment = f"; {comments[field.name]}" if field.name in comments else ""
        text = field.metadata.get("help") or f"(default: {_shown_default(field.name, default)}){comment}"
        text = text.replace("%", "%%")  # argparse %-formats help ("2-5% over" raised a TypeError at --help)
        kind = str if annotation is bool else (typing.get_args(annotation) or (annotation,))[0]
        kind = kind if kind in (int, str) else _number_flag if kind is float else str
        if annotation is bool:  # `--vat` alone means true; `--vat false` also works
            parser.add_argument(flag, type=str, nargs="?", const="true", default=None, dest=field.name,
                                help=f"true/false {text}")
        else:
            parser.add_argument(flag, type=kind, default=None, dest=field.name, help=text)


def flags_to_overrides(args: argparse.Namespace, cls) -> dict:
    return {f.name: getattr(args, f.name, None) for f in dataclasses.fields(cls)}


def warn_unused(cfg, who: str, unused: dict) -> None:
    """A warning for each option set away from its default that ``cfg`` will ignore: ``unused`` maps option names to
    the reason they have no effect (the caller includes only those). Not an error: one config is often run with a
    switch on and off (UDA with and without --vat, hpt beside hpt-gpd), but a flag given to no effect usually means
    another setting was meant."""
    import warnings

    defaults = type(cfg)()
    for name, why in unused.items():
        if getattr(cfg, name) != getattr(defaults, name):
            flag = "--" + name.replace("_", "-")
            warnings.warn(f"{who}: {flag} {getattr(cfg, name)!r} has no effect in this run: {why}", stacklevel=3)
