"""Argument checks shared by the public ops: errors name the argument and say what to pass instead."""

from __future__ import annotations

import math
import operator
from numbers import Real

import torch

from ._memo import VersionedMemo

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"urda_fast: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"urda_fast: {name} must be a floating-point tensor (float16, bfloat16, float32 or float64), "
                        f"got {t.dtype}; convert it with .float()")


def check_same(ref, ref_name: str, t, name: str, *, dtype: bool = True) -> None:
    """``t`` matches ``ref`` in shape, device and (optionally) dtype."""
    check_tensor(t, name)
    if t.shape != ref.shape:
        raise ValueError(f"urda_fast: {name} has shape {tuple(t.shape)} but {ref_name} has {tuple(ref.shape)}; "
                         "they must match")
    if t.device != ref.device:
        raise ValueError(f"urda_fast: {name} is on {t.device} but {ref_name} is on {ref.device}; move both to one device")
    if dtype and t.dtype != ref.dtype:
        raise TypeError(f"urda_fast: {name} has dtype {t.dtype} but {ref_name} has {ref.dtype}; cast one of them")


def _values_checkable(t: torch.Tensor) -> bool:
    # Reading tensor values is data-dependent: skip under torch.compile (the eager call already checked such values
    # where it matters), and never on meta/fake tensors.
    return not torch.compiler.is_compiling() and t.device.type != "meta"


# math.isnan / isfinite refuse the symbolic floats torch.compile(dynamic=True) traces a float argument as; these
# comparisons take both (and guard on the value under tracing).
def is_nan(value) -> bool:
    return value != value


def is_finite(value) -> bool:
    return -math.inf < value < math.inf


def _infinite(name: str) -> str:
    return (f"urda_fast: {name} must be finite, got inf (an infinite step makes NaN of every zero gradient entry "
            "instead of stepping to the budget's edge)")


def check_nonneg(value, name: str, *, count: int, count_name: str, finite: bool = False) -> None:
    """A float >= 0, or a tensor of shape () or (count,) whose values are >= 0 and not NaN (and not inf if
    ``finite``)."""
    if isinstance(value, torch.Tensor):
        if value.dtype not in FLOAT_DTYPES and value.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"urda_fast: {name} must be a float or a real tensor, got dtype {value.dtype}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != count):
            raise ValueError(f"urda_fast: {name} must be a float or a tensor of shape () or ({count},) (one per "
                             f"{count_name}), got shape {tuple(value.shape)}")
        if _values_checkable(value) and value.numel() > 0:
            v = value.detach()
            # One host read for the three checks (a sync per call on a GPU): NaN, negative, infinite.
            has_nan, has_negative, has_inf = torch.stack(
                [torch.isnan(v).any(), (v < 0).any(), torch.isinf(v).any()]).tolist()
            if has_nan:
                raise ValueError(f"urda_fast: {name} contains NaN")
            if has_negative:
                raise ValueError(f"urda_fast: {name} must be >= 0, got a minimum of {v.min().item()}")
            if finite and has_inf:
                raise ValueError(_infinite(name))
        return
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"urda_fast: {name} must be a float or a tensor, got {type(value).__name__}")
    if is_nan(value):
        raise ValueError(f"urda_fast: {name} is NaN")
    if value < 0:
        raise ValueError(f"urda_fast: {name} must be >= 0, got {value}")
    if finite and not is_finite(value):
        raise ValueError(_infinite(name))


def check_bounds(lower, upper, channels: int) -> None:
    """lower/upper: floats or tensors of 1 or ``channels`` elements, no NaN, lower <= upper everywhere."""
    for value, name in ((lower, "lower"), (upper, "upper")):
        if isinstance(value, torch.Tensor):
            if value.dtype not in FLOAT_DTYPES and value.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"urda_fast: {name} must be a float or a real tensor, got dtype {value.dtype}")
            if value.numel() not in (1, channels):
                raise ValueError(f"urda_fast: {name} must be a float or a tensor of 1 or {channels} elements (one per "
                                 f"channel, dim 1 of x_adv), got shape {tuple(value.shape)}")
        elif not isinstance(value, Real) or isinstance(value, bool):
            raise TypeError(f"urda_fast: {name} must be a float or a tensor, got {type(value).__name__}")
    if _bounds_checked_before(lower, upper):
        return
    lo, hi = _bound_values(lower), _bound_values(upper)
    if lo is None or hi is None:
        return
    if any(is_nan(v) for v in lo + hi):
        raise ValueError("urda_fast: lower/upper contain NaN")
    width = max(len(lo), len(hi))  # one of them may be a single value for every channel
    if any(l > h for l, h in zip(lo * (width // len(lo)), hi * (width // len(hi)))):
        raise ValueError(f"urda_fast: lower must be <= upper, got lower={lo} upper={hi}")
    _remember_checked_bounds(lower, upper)


def _bound_values(value) -> list[float] | None:
    """A bound's values as Python floats (a float stays in Python: every attack step passes floats), or None where
    they cannot be read (under tracing, on meta tensors)."""
    if not isinstance(value, torch.Tensor):
        return [float(value)]
    return value.detach().reshape(-1).double().cpu().tolist() if _values_checkable(value) else None


# Bound tensor pairs whose values passed, inside an attack's memo scope (see _memo.py); inference tensors, which have
# no version counter, are checked every time.
_CHECKED_BOUNDS = VersionedMemo()


def _versioned_pair(lower, upper) -> bool:
    return (not torch.compiler.is_compiling() and isinstance(lower, torch.Tensor) and isinstance(upper, torch.Tensor)
            and not lower.is_inference() and not upper.is_inference())


def _bounds_checked_before(lower, upper) -> bool:
    return _versioned_pair(lower, upper) and _CHECKED_BOUNDS.get((lower, upper)) is not None


def _remember_checked_bounds(lower, upper) -> None:
    if _versioned_pair(lower, upper):
        _CHECKED_BOUNDS.put((lower, upper), True)


def check_positive_finite(value, name: str) -> None:
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"urda_fast: {name} must be a float, got {type(value).__name__}")
    if not is_finite(value) or value <= 0:
        raise ValueError(f"urda_fast: {name} must be a positive finite float, got {value}")


def int_pair(value, op: str, name: str) -> tuple[int, int]:
    """An int or a sequence of 1 or 2 ints (numpy's too) as a pair, as torch's 2-D layers read them."""
    values = tuple(value) if hasattr(value, "__len__") else (value,)
    try:
        if len(values) not in (1, 2) or any(isinstance(v, bool) for v in values):
            raise TypeError
        values = tuple(operator.index(v) for v in values)
    except TypeError:
        raise TypeError(f"urda_fast: {op}'s {name} must be an int or a pair of ints, got {value!r}") from None
    return values * (2 // len(values))


def check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ValueError(f"urda_fast: {name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
