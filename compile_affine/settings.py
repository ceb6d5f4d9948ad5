"""Typed plugin settings, parsed once per compile.

The plugin's options travel inside ``torch.compile(..., options=...)`` under the
single key ``"compile_affine"`` so they can never collide with an Inductor config
name; every other key is Inductor's and is passed through untouched.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from typing import Any, Literal, Mapping

ENV_VAR = "COMPILE_AFFINE"
OPTIONS_KEY = "compile_affine"

FoldPolicy = Literal["auto", "always", "never"]
_FOLD_POLICIES = ("auto", "always", "never")
EpiloguePolicy = Literal["auto", "off"]
_EPILOGUE_POLICIES = ("auto", "off")
_ENV_VALUES = {"0": False, "1": True}


Objective = Literal["time", "memory"]
_OBJECTIVES = ("time", "memory")

TRAFFIC_BREAK_EVEN = 3.5
"""Activation bytes per weight byte above which a fold moves fewer bytes than it saves:
it adds 7 weight-sized accesses (``W * s`` in forward and again in backward, 2 each;
``gW' * s`` with ``sum(gW' * W)``, 3) and removes at least 2 activation-sized ones (the
reads of ``y`` and ``g`` for ``sum(g * y)``), each costing its tensor's bytes
(docs/design.md, "The cost rule's objective, and on GPU"). Where every site clears it,
a step moves no more bytes than stock's, which is time on a bandwidth-bound device, and
on CPU every block measured above it stepped faster than stock (docs/benchmarks.md,
"The cost rule")."""
MEMORY_MIN_ACTIVATION_RATIO = 0.3
"""The lowest ratio at which folding measured time-neutral within the CPU benchmark's
noise (fitted on fp32 training steps, docs/benchmarks.md "The re-fitted default"): below
3.5 a fold still frees the conv output it no longer saves, but it moves more bytes, and
at 0.38 one block stepped 1.055x stock. The memory-for-time trade, taken only on request."""
OBJECTIVE_MIN_ACTIVATION_RATIO = {"time": TRAFFIC_BREAK_EVEN, "memory": MEMORY_MIN_ACTIVATION_RATIO}
"""The default threshold for each ``objective``. This module's source is hashed into the
pass uuid, so a changed value misses the FX cache."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the pass may do. Frozen so it can be hashed into the pass uuid."""

    enabled: bool = True
    """Install the pass at all. ``COMPILE_AFFINE=0`` forces False."""
    strict: bool = False
    """Re-raise errors from the pass instead of falling back to stock Inductor."""
    fold: FoldPolicy = "auto"
    """``auto``: fold legal sites the cost model says pay; ``always``: every legal
    site; ``never``: recognise and report sites but fold none."""
    objective: Objective = "time"
    """What ``fold="auto"`` optimises. ``time``: fold only sites where the fold moves fewer
    bytes than it saves (``TRAFFIC_BREAK_EVEN``), so no fold adds bytes to a step.
    ``memory``: also fold where it costs some time but frees the conv output
    (``MEMORY_MIN_ACTIVATION_RATIO``)."""
    min_activation_ratio: float | None = None
    """``fold="auto"`` folds a site when its conv output has at least this many bytes per
    byte of the stored weight, each in its own dtype (under bf16 autocast an fp32 weight
    needs twice the output elements it needs in fp32; in fp32 this is the element ratio).
    Lower trades speed for saved-activation memory.
    None: the ``objective``'s default (``OBJECTIVE_MIN_ACTIVATION_RATIO``)."""
    epilogue: EpiloguePolicy = "off"
    """``auto``: after folding, run ``conv -> (+bias) -> relu`` on CPU as one fused op
    (oneDNN post-op, ``compile_affine::conv_act``); ``off``: leave it to Inductor."""
    modules: tuple[str, ...] | None = None
    """Glob patterns (``fnmatch``) of qualified module names, as ``model.named_modules()``
    gives them: only sites whose affine or producer module matches one fold. None: all.
    A pattern matches a name or any dotted prefix of it, so ``backbone`` selects
    everything under ``backbone``. A list is accepted and stored as a tuple."""
    exclude: tuple[str, ...] = ()
    """Glob patterns as for ``modules``: a site whose affine or producer module matches
    one is not folded, even if ``modules`` selects it. A site either option turns away
    is reported as ``excluded by option``, whatever legality would have said: the
    user's word is checked first."""

    def __post_init__(self) -> None:
        for name in ("enabled", "strict"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"compile_affine option {name!r} must be a bool, got {getattr(self, name)!r}")
        ratio = self.min_activation_ratio
        if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 0):
            raise ValueError(f"compile_affine option 'min_activation_ratio' must be a number >= 0, got {self.min_activation_ratio!r}")
        if self.fold not in _FOLD_POLICIES:
            raise ValueError(f"compile_affine option 'fold' must be one of {_FOLD_POLICIES}, got {self.fold!r}")
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"compile_affine option 'objective' must be one of {_OBJECTIVES}, got {self.objective!r}")
        if self.epilogue not in _EPILOGUE_POLICIES:
            raise ValueError(f"compile_affine option 'epilogue' must be one of {_EPILOGUE_POLICIES}, got {self.epilogue!r}")
        # Frozen and hashed into the pass uuid: patterns are kept as a tuple.
        if self.modules is not None:
            object.__setattr__(self, "modules", _patterns("modules", self.modules))
        object.__setattr__(self, "exclude", _patterns("exclude", self.exclude))

    def selects(self, *names: str) -> bool:
        """Whether a site whose affine and producer modules are ``names`` may fold."""
        if any(matches(name, self.exclude) for name in names):
            return False
        return self.modules is None or any(matches(name, self.modules) for name in names)

    @property
    def activation_ratio(self) -> float:
        """The threshold ``fold="auto"`` applies: ``min_activation_ratio``, else the objective's."""
        if self.min_activation_ratio is not None:
            return self.min_activation_ratio
        return OBJECTIVE_MIN_ACTIVATION_RATIO[self.objective]


EXCLUDED = "excluded by option"
"""The reason a site ``Settings.selects`` turns away is reported with."""


def _patterns(name: str, value: Any) -> tuple[str, ...]:
    # A bare string would iterate as one-letter patterns: ``modules="backbone"`` is a
    # common slip, so it is an error rather than a guess.
    if isinstance(value, str):
        raise TypeError(f"compile_affine option {name!r} must be a list of module name patterns, "
                        f"got the string {value!r}; write [{value!r}]")
    if not isinstance(value, (list, tuple)) or not all(isinstance(p, str) for p in value):
        raise TypeError(f"compile_affine option {name!r} must be a list of strings (module name patterns), got {value!r}")
    return tuple(value)


def matches(name: str, patterns: tuple[str, ...]) -> bool:
    """``name`` (``layer1.0.bn1``) or one of its dotted prefixes (``layer1``, ``layer1.0``)
    matches a pattern, case-sensitively. ``*`` crosses dots, as in ``fnmatch``."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(p, pattern) for pattern in patterns for p in prefixes)



ACCEPTED_KEYS = tuple(f.name for f in dataclasses.fields(Settings))


def env_enabled() -> bool:
    """Read ``COMPILE_AFFINE``; unset means on. A typo must not silently mean on or off."""
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return True
    value = raw.strip()
    if value not in _ENV_VALUES:
        raise ValueError(
            f"environment variable {ENV_VAR}={raw!r} is not valid; accepted values are "
            f"{', '.join(map(repr, _ENV_VALUES))} (0 = stock Inductor, 1 = fold affines)"
        )
    return _ENV_VALUES[value]


def split_options(options: Mapping[str, Any] | None) -> tuple[Settings, dict[str, Any]]:
    """Separate our settings from Inductor's options.

    Returns the parsed ``Settings`` (with the environment variable applied) and the
    remaining options for Inductor, unchanged.
    """
    inductor_options = dict(options or {})
    ours = inductor_options.pop(OPTIONS_KEY, None) or {}
    if not isinstance(ours, Mapping):
        raise TypeError(f"options[{OPTIONS_KEY!r}] must be a dict of plugin options, got {type(ours).__name__}")
    unknown = sorted(set(ours) - set(ACCEPTED_KEYS))
    if unknown:
        raise ValueError(
            f"unknown compile_affine option {unknown[0]!r}; accepted keys are {', '.join(ACCEPTED_KEYS)}"
        )
    settings = Settings(**ours)
    if not env_enabled():
        settings = dataclasses.replace(settings, enabled=False)
    return settings, inductor_options
