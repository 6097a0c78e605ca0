"""The solver's input: per-layer candidate options with their costs, hardware limits and ties.

A :class:`Problem` is what ``bitplan solve`` reads (JSON, ``version: 1``) and what
:func:`solver.options.build_problem` produces from a model. Costs are per sample: ``size_bytes``
in bytes, ``bops`` in bit operations (any consistent unit works: the HAWQ reference instances
use their own), ``latency_ms`` in milliseconds. Validation raises
:class:`~solver.errors.BadProblemError` with a message that names the offending field.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import BadProblemError

VERSION = 1
RESOURCES: tuple[str, ...] = ("size_bytes", "bops", "latency_ms")
# A total counts as within a limit up to this relative tolerance (float sums of many layers).
FEAS_RTOL = 1e-9

_OPTION_KEYS = {"w_bits", "a_bits", "omega", "size_bytes", "bops", "latency_ms", "tag", "drq",
                "group_size"}
_OPTION_REQUIRED = {"w_bits", "a_bits", "omega", "size_bytes", "bops", "tag"}
_LAYER_KEYS = {"name", "options"}
_PROBLEM_KEYS = {"version", "layers", "limits", "ties", "source"}


def within(total: float, limit: float) -> bool:
    """True when ``total`` meets ``limit`` up to :data:`FEAS_RTOL` (relative)."""
    return total <= limit + FEAS_RTOL * max(abs(limit), 1e-300)


def limit_scale(limit: float, top: float) -> float:
    """The unit a limit is normalised by in the solvers' arithmetic: the limit itself, floored
    at 1e-9 of ``top`` (the largest reachable total) so that a tiny positive limit does not
    blow costs up to overflow; 1 when both are 0."""
    return max(limit, 1e-9 * top) or 1.0


def _finite(value: Any, what: str, *, nonneg: bool = False, allow_none: bool = False) -> Any:
    if value is None:
        if allow_none:
            return None
        raise BadProblemError(f"{what} is missing (null)")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadProblemError(f"{what} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise BadProblemError(f"{what} must be finite, got {value!r}")
    if nonneg and value < 0:
        raise BadProblemError(f"{what} must be >= 0, got {value!r}")
    return value


def _check_keys(obj: Any, allowed: set[str], required: set[str], what: str) -> None:
    if not isinstance(obj, dict):
        raise BadProblemError(f"{what} must be a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise BadProblemError(f"{what} has unknown keys {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(obj))
    if missing:
        raise BadProblemError(f"{what} is missing keys {missing}")


def tie_components(names: list[str], ties: Any) -> list[list[str]]:
    """Connected components of the tie graph over ``names`` (each in ``names`` order, ordered
    by first member); every layer is in exactly one component."""
    index = {n: i for i, n in enumerate(names)}
    parent = list(range(len(names)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in ties:
        ra, rb = find(index[a]), find(index[b])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[str]] = {}
    for i, n in enumerate(names):
        groups.setdefault(find(i), []).append(n)
    return list(groups.values())


@dataclass(frozen=True)
class Option:
    """One candidate precision of one layer and what it costs.

    ``omega`` is the loss perturbation (HAWQ's Omega, lower is better; may be negative when a
    Hessian trace estimate is). ``a_bits`` may be fractional (DRQ expected bits). ``tag``
    names the precision (``"w4a8"``, ``"w4drq2x2f0.3"``); tied layers must pick equal tags.
    """

    w_bits: int
    a_bits: float
    omega: float
    size_bytes: float
    bops: float
    latency_ms: float | None
    tag: str
    drq: dict | None = None
    group_size: int | None = None  # weight scales per group of inputs; None = per channel

    def __post_init__(self) -> None:
        if isinstance(self.w_bits, bool) or not isinstance(self.w_bits, int) or self.w_bits < 1:
            raise BadProblemError(f"option {self.tag!r}: w_bits must be an int >= 1")
        _finite(self.a_bits, f"option {self.tag!r}: a_bits", nonneg=True)
        if self.a_bits <= 0:
            raise BadProblemError(f"option {self.tag!r}: a_bits must be > 0")
        _finite(self.omega, f"option {self.tag!r}: omega")
        _finite(self.size_bytes, f"option {self.tag!r}: size_bytes", nonneg=True)
        _finite(self.bops, f"option {self.tag!r}: bops", nonneg=True)
        _finite(self.latency_ms, f"option {self.tag!r}: latency_ms", nonneg=True, allow_none=True)
        if not isinstance(self.tag, str) or not self.tag:
            raise BadProblemError("every option needs a non-empty string tag")
        if self.drq is not None and not isinstance(self.drq, dict):
            raise BadProblemError(f"option {self.tag!r}: drq must be an object or null")
        g = self.group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise BadProblemError(f"option {self.tag!r}: group_size must be null or an int >= 1")

    def cost(self, resource: str) -> float | None:
        """The option's cost in ``resource`` (one of :data:`RESOURCES`)."""
        return getattr(self, resource)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "w_bits": self.w_bits,
            "a_bits": self.a_bits,
            "omega": self.omega,
            "size_bytes": self.size_bytes,
            "bops": self.bops,
            "latency_ms": self.latency_ms,
            "tag": self.tag,
        }
        if self.drq is not None:
            out["drq"] = self.drq
        if self.group_size is not None:
            out["group_size"] = self.group_size
        return out

    @classmethod
    def from_dict(cls, obj: Any, where: str = "option") -> Option:
        _check_keys(obj, _OPTION_KEYS, _OPTION_REQUIRED, where)
        return cls(
            w_bits=obj["w_bits"],
            a_bits=obj["a_bits"],
            omega=obj["omega"],
            size_bytes=obj["size_bytes"],
            bops=obj["bops"],
            latency_ms=obj.get("latency_ms"),
            tag=obj["tag"],
            drq=obj.get("drq"),
            group_size=obj.get("group_size"),
        )


@dataclass(frozen=True)
class LayerOptions:
    """A layer (by its FQN) and its candidate options; the solver picks exactly one."""

    name: str
    options: tuple[Option, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise BadProblemError("every layer needs a non-empty string name")
        object.__setattr__(self, "options", tuple(self.options))
        if not self.options:
            raise BadProblemError(f"layer {self.name!r} has no options; give at least one")
        tags = [o.tag for o in self.options]
        dup = sorted({t for t in tags if tags.count(t) > 1})
        if dup:
            raise BadProblemError(f"layer {self.name!r} has duplicate option tags {dup}")


@dataclass(frozen=True)
class Limits:
    """Upper limits on the totals; ``None`` means unconstrained."""

    size_bytes: float | None = None
    bops: float | None = None
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        for r in RESOURCES:
            _finite(getattr(self, r), f"limit {r}", nonneg=True, allow_none=True)

    def get(self, resource: str) -> float | None:
        return getattr(self, resource)

    def active(self) -> list[str]:
        """The resources that have a limit, in :data:`RESOURCES` order."""
        return [r for r in RESOURCES if getattr(self, r) is not None]

    def to_dict(self) -> dict[str, float | None]:
        return {r: getattr(self, r) for r in RESOURCES}

    @classmethod
    def from_dict(cls, obj: Any) -> Limits:
        _check_keys(obj, set(RESOURCES), set(), "limits")
        return cls(**{r: obj.get(r) for r in RESOURCES})


@dataclass(frozen=True)
class Problem:
    """Layers with options, limits and ties (pairs of layer names that must share a tag)."""

    layers: tuple[LayerOptions, ...]
    limits: Limits = field(default_factory=Limits)
    ties: tuple[tuple[str, str], ...] = ()
    source: str | None = None
    version: int = VERSION

    def __post_init__(self) -> None:
        if self.version != VERSION:
            raise BadProblemError(f"problem version {self.version!r} is not supported (use 1)")
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise BadProblemError("the problem has no layers")
        names = [la.name for la in self.layers]
        seen: set[str] = set()
        for n in names:
            if n in seen:
                raise BadProblemError(f"duplicate layer name {n!r}; layer names must be unique")
            seen.add(n)
        ties = []
        for t in self.ties:
            if not isinstance(t, list | tuple) or len(t) != 2:
                raise BadProblemError(f"each tie must be a pair of layer names, got {t!r}")
            a, b = t
            for n in (a, b):
                if n not in seen:
                    raise BadProblemError(f"tie {[a, b]} names unknown layer {n!r}")
            if a == b:
                raise BadProblemError(f"tie {[a, b]} ties a layer to itself")
            ties.append((a, b))
        object.__setattr__(self, "ties", tuple(ties))
        by_name = {la.name: la for la in self.layers}
        for group in self.tie_groups():
            if len(group) < 2:
                continue
            first = by_name[group[0]]
            tags = {o.tag for o in first.options}
            for n in group[1:]:
                other = {o.tag for o in by_name[n].options}
                if other != tags:
                    raise BadProblemError(
                        f"tied layers {first.name!r} and {n!r} offer different option tags "
                        f"({sorted(tags)} vs {sorted(other)}); tied layers must offer the same set"
                    )
        if self.limits.latency_ms is not None:
            for la in self.layers:
                for o in la.options:
                    if o.latency_ms is None:
                        raise BadProblemError(
                            f"a latency limit is set but layer {la.name!r} option {o.tag!r} has "
                            "no latency_ms; give latencies for every option or drop the limit"
                        )

    def tie_groups(self) -> list[list[str]]:
        """Connected components of the tie graph, each in layer order, ordered by first layer."""
        return tie_components([la.name for la in self.layers], self.ties)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "layers": [
                {"name": la.name, "options": [o.to_dict() for o in la.options]}
                for la in self.layers
            ],
            "limits": self.limits.to_dict(),
            "ties": [list(t) for t in self.ties],
        }
        if self.source is not None:
            out["source"] = self.source
        return out

    def to_json(self, indent: int | None = None) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, obj: Any) -> Problem:
        _check_keys(obj, _PROBLEM_KEYS, {"version", "layers"}, "problem")
        if obj["version"] != VERSION:
            raise BadProblemError(f"problem version {obj['version']!r} is not supported (use 1)")
        if not isinstance(obj["layers"], list):
            raise BadProblemError("problem 'layers' must be a list")
        layers = []
        for i, la in enumerate(obj["layers"]):
            _check_keys(la, _LAYER_KEYS, _LAYER_KEYS, f"layers[{i}]")
            if not isinstance(la["options"], list):
                raise BadProblemError(f"layers[{i}].options must be a list")
            opts = tuple(
                Option.from_dict(o, f"layers[{i}] ({la['name']!r}).options[{j}]")
                for j, o in enumerate(la["options"])
            )
            layers.append(LayerOptions(la["name"], opts))
        ties = obj.get("ties") or []
        if not isinstance(ties, list):
            raise BadProblemError("problem 'ties' must be a list of [layer, layer] pairs")
        source = obj.get("source")
        if source is not None and not isinstance(source, str):
            raise BadProblemError("problem 'source' must be a string")
        return cls(
            layers=tuple(layers),
            limits=Limits.from_dict(obj.get("limits") or {}),
            ties=tuple(tuple(t) if isinstance(t, list) else t for t in ties),
            source=source,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Problem:
        """Parse and validate a problem; raises BadProblemError on any malformed field."""
        try:
            obj = json.loads(text)
        except (ValueError, TypeError) as exc:
            raise BadProblemError(f"problem is not valid JSON: {exc}") from exc
        return cls.from_dict(obj)
