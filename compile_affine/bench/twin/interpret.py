"""Inductor's Triton code for CPU tensors, run by Triton's interpreter.

``with triton_on_cpu() as twin:`` compiles and runs what ``torch.compile`` is given inside
the block the way a GPU would, as far as code generation goes: Inductor lowers to Triton
(not C++), and each kernel it writes runs through ``triton.runtime.interpreter`` (numpy,
grid cell by grid cell) on the CPU tensors. The compile_affine pass decides as on a GPU
(``passes.target.decide_as("cuda")``). Float64 results can then be checked against eager.

What it does not reproduce: Inductor's own device-keyed branches (the conv bias gradient
split out as ``aten.sum`` on GPUs, reduction splits by SM count...) take their CPU side.
Slow: seconds per step on tiny nets.

Importing this module patches nothing. Everything the block patches (listed in
``triton_on_cpu``) is put back on exit, and it runs between a fresh Inductor cache and a
Dynamo reset at both ends, so no compiled C++ artefact leaks in and no interpreted kernel
leaks out. Not thread-safe: the patches are process-wide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Iterator

import torch

from ...passes import target


def missing() -> str | None:
    """Why ``triton_on_cpu`` cannot run here, or None (for tests to skip on)."""
    try:
        import triton.language as tl  # noqa: F401
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.runtime.driver import driver
        from triton.runtime.interpreter import InterpretedFunction  # noqa: F401
        from triton.runtime.jit import JITFunction  # noqa: F401
    except ImportError as e:
        return f"triton or its interpreter is not importable: {e}"
    if not hasattr(driver, "set_active"):
        return "triton.runtime.driver.driver has no set_active"
    if not hasattr(torch._inductor.config, "cpu_backend"):
        return "torch._inductor.config has no cpu_backend"
    if _fresh_cache() is None:
        return "torch._inductor.utils has neither fresh_cache nor fresh_inductor_cache"
    return _numpy_clash()


def _numpy_clash() -> str | None:
    """Triton's interpreter before 3.8 (3.6 beside torch 2.11; 3.7 was not tried) turns a loop
    bound into a Python int with ``int(array)`` on a one-element array (``tensor.__index__``
    in ``triton.runtime.interpreter._patch_lang``), which NumPy 2.x refuses: every reduction
    loop then fails. Triton 3.8 (torch 2.14) and 3.9 (torch 2.15) run."""
    import numpy as np
    import triton

    version = tuple(int(p) for p in triton.__version__.split(".")[:2] if p.isdigit())
    try:
        int(np.array([1]))
    except TypeError:
        if version < (3, 8):
            return (f"triton {triton.__version__}'s interpreter calls int() on one-element arrays, "
                    f"which numpy {np.__version__} refuses (reduction loops fail); triton 3.8 and 3.9 run")  # fmt: skip
    return None


@dataclasses.dataclass
class Launches:
    """The kernels the interpreter ran inside the block, by name, in launch order."""

    kernels: list[str] = dataclasses.field(default_factory=list)


class _Driver:
    """Stands in for ``triton.runtime.driver.driver.active`` (a ``triton.backends.driver.DriverBase``,
    CUDA's ``triton.backends.nvidia.driver.CudaDriver`` on a GPU): with no GPU no backend is
    active, and ``torch.utils._triton.triton_backend()`` stops at "0 active drivers". Inductor
    reads the target off it to pick its Triton code path; an H100's (sm90, warp size 32)."""

    def is_active(self) -> bool:
        return True

    def get_current_target(self) -> Any:
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", 90, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")  # where the interpreter's tensors live

    def get_device_interface(self) -> Any:
        return torch.cpu

    def get_benchmarker(self) -> Any:
        from triton.testing import do_bench

        return do_bench


def _fresh_cache() -> Any:
    utils = torch._inductor.utils
    return getattr(utils, "fresh_cache", None) or getattr(utils, "fresh_inductor_cache", None)


@contextlib.contextmanager
def _set_attr(obj: Any, name: str, value: Any) -> Iterator[None]:
    """``obj.name = value`` for the block; the old value (or its absence) comes back after."""
    had, old = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


@contextlib.contextmanager
def _env(key: str, value: str) -> Iterator[None]:
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@contextlib.contextmanager
def _active_driver(stand_in: _Driver) -> Iterator[None]:
    from triton.runtime.driver import driver

    # ``driver._active`` directly: reading ``driver.active`` on a machine with no GPU
    # raises (it would create the default driver), and None is its "not made yet" state.
    old = getattr(driver, "_active", None)
    driver.set_active(stand_in)
    try:
        yield
    finally:
        driver._active = old


def _math_twin(name: str) -> Any:
    import triton.language as tl

    # Looked up at call time: the interpreter swaps ``tl.math``'s builtins for its numpy
    # versions only while a kernel runs (``triton.runtime.interpreter._patch_lang``).
    def twin(*args: Any, **kwargs: Any) -> Any:
        return getattr(tl.math, name)(*args, **kwargs)

    twin.__name__ = name
    return twin


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[Launches]:
    """Inside the block ``torch.compile`` with Inductor (``backend="compile_affine"`` too)
    writes Triton kernels for CPU tensors and runs them in Triton's interpreter; the
    compile_affine pass decides as for CUDA. Yields the ``Launches`` the interpreter ran."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(f"triton_on_cpu: {reason}")
    import triton.language as tl
    from torch._inductor.runtime import triton_helpers
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    launches = Launches()
    interpreted: dict[int, InterpretedFunction] = {}

    # Stands in for ``triton.runtime.jit.JITFunction.__call__`` (which raises "Cannot call
    # @triton.jit'd outside of the scope of a kernel"). ``@triton.jit`` reads TRITON_INTERPRET
    # when it decorates: kernels Inductor loads inside the block become InterpretedFunctions,
    # but the helpers jitted at import (``triton.language.standard``'s ``tl.sum``, Inductor's
    # ``triton_helpers``) stay JITFunctions, which the interpreter then calls as Python.
    def call_interpreted(self: Any, *args: Any, **kwargs: Any) -> Any:
        fn = interpreted.get(id(self))
        if fn is None:
            fn = interpreted[id(self)] = InterpretedFunction(self.fn)
        return fn(*args, **kwargs)

    # Wraps ``triton.runtime.interpreter.InterpretedFunction.run`` (one kernel launch) to record it.
    original_run = InterpretedFunction.run

    def counted_run(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not kwargs.get("warmup"):
            launches.kernels.append(self.__name__)
        return original_run(self, *args, **kwargs)

    with contextlib.ExitStack() as stack:
        enter = stack.enter_context
        torch._dynamo.reset()  # no frame compiled before the block runs inside it...
        stack.callback(torch._dynamo.reset)  # ...and none compiled inside runs after it
        enter(_fresh_cache()())  # its own cache dir, in-memory caches cleared at both ends
        # Read by ``triton.jit`` (via ``triton.knobs.runtime.interpret``) as each kernel is
        # defined, and by Inductor's ``CachingAutotuner`` to launch through the interpreter.
        enter(_env("TRITON_INTERPRET", "1"))
        enter(torch._inductor.config.patch(cpu_backend="triton",
                                           compile_threads=1))  # compile workers would not see the stand-ins
        enter(_active_driver(_Driver()))
        enter(_set_attr(JITFunction, "__call__", call_interpreted))
        enter(_set_attr(InterpretedFunction, "run", counted_run))
        # Stands in for ``torch._inductor.runtime.triton_helpers.set_driver_to_cpu``, which each
        # CPU kernel module calls: it looks for a triton-cpu backend and, finding none, warns.
        # Here the stand-in driver stays active.
        if hasattr(triton_helpers, "set_driver_to_cpu"):
            enter(_set_attr(triton_helpers, "set_driver_to_cpu", lambda: None))
        # ``libdevice`` externs (``libdevice.rsqrt`` in every batch norm and layer norm kernel,
        # ``libdevice.erf`` in GELU's) do not run in the interpreter: the names Inductor's
        # kernels call (``triton_helpers.libdevice``, ``triton.language.extra.libdevice``'s
        # stubs, which return None, or a backend's ``core.extern`` functions) are pointed at
        # their ``tl.math`` twins, the builtins the interpreter does run.
        libdevice = getattr(triton_helpers, "libdevice", None)
        if libdevice is not None and libdevice is not tl.math:
            for name in dir(libdevice):
                if not name.startswith("_") and callable(getattr(tl.math, name, None)):
                    enter(_set_attr(libdevice, name, _math_twin(name)))
        enter(target.decide_as("cuda"))  # the pass's GPU decisions, for these CPU tensors
        yield launches
