"""Checking calls against the real Python bindings of TensorRT and cuda-python.

TensorRT (pybind11): every method's docstring carries its signature(s) with keyword names and types, e.g.
``set_timing_cache(self: tensorrt.IBuilderConfig, cache: tensorrt.ITimingCache, ignore_mismatch: bool) -> bool``
(one numbered line per overload). :class:`Checked` fakes bind each call against those signatures: a method,
property, keyword, argument count or argument type the real class lacks fails the call with ``TypeError`` or
``AttributeError``, as the real binding would.

cuda-python (Cython): without a driver every call returns ``cudaErrorInsufficientDriver`` after converting its
arguments, so the CUDA fake (:mod:`cuda_sim`) calls the real function first (argument conversion is the check).
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable

SIGNATURE = re.compile(r"^(?:\d+\.\s+)?(?P<name>\w+)\((?P<params>.*)\)\s*->\s*(?P<ret>.+)$")


@dataclass(frozen=True)
class Param:
    name: str
    annotation: str
    has_default: bool


def split_top_level(text: str, sep: str = ",") -> list[str]:
    """Split ``text`` at ``sep`` outside brackets (``[]``, ``()``, ``<>``)."""
    parts, depth, current = [], 0, []
    for ch in text:
        if ch in "[(<":
            depth += 1
        elif ch in "])>":
            depth -= 1
        if ch == sep and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    if "".join(current).strip():
        parts.append("".join(current))
    return [p.strip() for p in parts]


def parse_params(params: str) -> list[Param]:
    out = []
    for part in split_top_level(params):
        name, _, rest = part.partition(":")
        annotation, eq, _default = rest.partition(" = ")
        out.append(Param(name.strip(), annotation.strip(), bool(eq)))
    return out


def overloads(real_function: Any, name: str) -> list[list[Param]]:
    """The parameter lists (without ``self``) of every overload in a pybind11 docstring."""
    sigs = []
    for line in (getattr(real_function, "__doc__", None) or "").splitlines():
        m = SIGNATURE.match(line.strip())
        if m and m.group("name") == name and "*args" not in m.group("params"):
            params = parse_params(m.group("params"))
            sigs.append(params[1:] if params and params[0].name in ("self", "arg0") else params)
    if not sigs:
        raise AssertionError(f"no signature found in the docstring of {name}: {real_function.__doc__!r}")
    return sigs


def setter_param(prop: property) -> Param:
    """The value parameter of a pybind11 property setter (``(arg0: Class, arg1: type) -> None``)."""
    m = re.match(r"^\((?P<params>.*)\)\s*->", (prop.fset.__doc__ or "").strip())
    if not m:
        raise AssertionError(f"no setter signature in {prop.fset.__doc__!r}")
    return parse_params(m.group("params"))[1]


def resolve(module: ModuleType, dotted: str) -> Any:
    """``tensorrt_bindings.tensorrt.ILogger.Severity`` -> the class in ``module`` (``None`` when not a class of it)."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if part in ("tensorrt", "tensorrt_lean") and i + 1 < len(parts):
            obj: Any = module
            for attr in parts[i + 1:]:
                obj = getattr(obj, attr, None)
                if obj is None:
                    return None
            return obj
    return None


def is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) or (hasattr(v, "__index__") and not isinstance(v, float))


def accepts(value: Any, annotation: str, module: ModuleType, fakes: dict[type, type]) -> bool:
    """Whether pybind11 would accept ``value`` for a parameter annotated ``annotation``."""
    a = annotation
    if a in ("int", "typing.SupportsInt"):
        return is_int(value)
    if a in ("float", "typing.SupportsFloat"):
        return isinstance(value, numbers.Real)
    if a == "str":
        return isinstance(value, str)
    if a == "bool":
        return isinstance(value, bool) or type(value).__name__ == "bool_"
    if a == "tuple":
        return isinstance(value, tuple)
    if a == "list":
        return isinstance(value, list)
    if a in ("buffer", "typing_extensions.Buffer"):
        try:
            memoryview(value)
        except TypeError:
            return hasattr(value, "__bytes__")  # a fake IHostMemory passed back
        return True
    if a.startswith(("List[", "collections.abc.Sequence[", "list[")):
        return isinstance(value, (list, tuple)) and all(is_int(v) for v in value)
    cls = resolve(module, a)
    if not isinstance(cls, type):
        return True  # object, capsules and types outside the module: not checked
    if cls.__name__ == "Dims":  # pybind11 converts sequences of ints implicitly
        return isinstance(value, cls) or (isinstance(value, (list, tuple)) and all(is_int(v) for v in value))
    if isinstance(value, cls):
        return True
    fake_real = fakes.get(type(value))
    return fake_real is not None and issubclass(fake_real, cls)


def bind(params: list[Param], args: tuple, kwargs: dict, module: ModuleType, fakes: dict[type, type]) -> None:
    """Bind a call to one overload; ``TypeError`` saying why it does not match."""
    if len(args) > len(params):
        raise TypeError(f"{len(args)} positional arguments, the signature takes {len(params)}")
    given = {p.name: v for p, v in zip(params, args)}
    names = {p.name for p in params}
    for k, v in kwargs.items():
        if k not in names:
            raise TypeError(f"unexpected keyword argument {k!r} (keywords: {sorted(names)})")
        if k in given:
            raise TypeError(f"argument {k!r} given twice")
        given[k] = v
    for p in params:
        if p.name not in given:
            if not p.has_default:
                raise TypeError(f"missing argument {p.name!r}")
            continue
        if not accepts(given[p.name], p.annotation, module, fakes):
            raise TypeError(f"argument {p.name!r}={given[p.name]!r} is not a {p.annotation}")


def check_call(real_cls: type, name: str, args: tuple, kwargs: dict, module: ModuleType,
               fakes: dict[type, type]) -> None:
    """Raise ``TypeError`` unless ``real_cls.name(*args, **kwargs)`` matches one of the real overloads."""
    attr = "__init__" if name == "__init__" else name
    real = getattr(real_cls, attr)
    reasons = []
    for params in overloads(real, attr):
        try:
            bind(params, args, kwargs, module, fakes)
            return
        except TypeError as e:
            reasons.append(f"({', '.join(p.name for p in params)}): {e}")
    raise TypeError(f"{real_cls.__name__}.{attr}{args!r}{kwargs!r} matches no signature of the real "
                    f"{module.__name__} {getattr(module, '__version__', '')}: " + "; ".join(reasons))


class Checked:
    """Base of fakes of real TensorRT classes: set ``REAL`` (the real class) and ``MODULE`` (the real module).

    Every public method and property a subclass defines must exist on ``REAL`` (checked at class creation: a fake
    cannot invent API); calls are bound against the real signatures; reading an attribute the fake lacks raises
    ``AttributeError`` when the real class lacks it too and ``NotImplementedError`` when only the fake does;
    setting one requires a writable real property and a value its setter accepts.
    """

    REAL: type
    MODULE: ModuleType
    CONSTRUCTED = False  # the package constructs it (Builder, OnnxParser, Runtime): its __init__ is checked too
    FAKES: dict[type, type] = {}  # fake class -> real class (shared registry for type checks)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        real = cls.__dict__.get("REAL")
        if real is None:
            return
        Checked.FAKES[cls] = real
        for name, value in list(cls.__dict__.items()):
            if name.startswith("_") and not (name == "__init__" and cls.__dict__.get("CONSTRUCTED")):
                continue
            if name in ("REAL", "MODULE", "CONSTRUCTED"):
                continue
            if not hasattr(real, name):
                raise AssertionError(f"fake {cls.__name__}.{name}: the real {real.__name__} has no {name}")
            if isinstance(value, property):
                if not isinstance(getattr(real, name), property):
                    raise AssertionError(f"fake {cls.__name__}.{name} is a property, the real one is not")
            elif callable(value):
                setattr(cls, name, _checked_method(real, name, value, cls))

    def __getattr__(self, name: str) -> Any:  # only reached when normal lookup fails
        if hasattr(self.REAL, name):
            raise NotImplementedError(f"the fake {type(self).__name__} lacks {name}, which the real "
                                      f"{self.REAL.__name__} has: extend the fake")
        raise AttributeError(f"'{self.REAL.__name__}' object has no attribute '{name}' (real "
                             f"{self.MODULE.__name__} {getattr(self.MODULE, '__version__', '')})")

    def __setattr__(self, name: str, value: Any) -> None:
        if not name.startswith("_"):
            prop = getattr(self.REAL, name, None)
            if not isinstance(prop, property) or prop.fset is None:
                raise AttributeError(f"'{self.REAL.__name__}' attribute '{name}' is not writable (real "
                                     f"{self.MODULE.__name__} {getattr(self.MODULE, '__version__', '')})")
            param = setter_param(prop)
            if not accepts(value, param.annotation, self.MODULE, Checked.FAKES):
                raise TypeError(f"{self.REAL.__name__}.{name} = {value!r}: not a {param.annotation}")
        object.__setattr__(self, name, value)


def _checked_method(real: type, name: str, fn: Callable, owner: type) -> Callable:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        check_call(real, name, args, kwargs, owner.MODULE, Checked.FAKES)
        return fn(self, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = fn.__doc__
    return method

