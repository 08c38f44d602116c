"""Python host API for msim kernel libraries: a thin ctypes layer over the C ABI (msim_host.h).

    lib = msim.Library(msim.build(["kernels/rmsnorm.metal"], include_dirs=["kernels"]))
    lib.dispatch("rmsnorm_float", [x, w, out, np.uint32(cols), np.float32(1e-6)],
                 threads_per_threadgroup=(256,), threadgroups=(rows,))

Buffers are numpy arrays or torch CPU tensors (bound by index, whole array unless wrapped in
Buffer(obj, offset, length)); numpy scalars, bytes and ctypes structures become set_bytes; Python
numbers are packed with the type the kernel declares. Every detector report raises MetalError.
"""

from __future__ import annotations

import ctypes
import dataclasses
from pathlib import Path

import numpy as np


class MetalError(RuntimeError):
    """A dispatch failed: invalid launch, or a detector (race, bounds, divergence...) fired."""


@dataclasses.dataclass(frozen=True)
class Param:
    kind: str  # buffer | threadgroup | id
    index: str
    space: str
    type: str
    name: str
    cond: str = ""  # function constant index that makes the parameter exist

    @property
    def scalar(self) -> str:
        """Element type name without address space, qualifiers, pointer or vector width."""
        words = [
            w
            for w in self.type.replace("*", " ").replace("&", " ").split()
            if w not in ("device", "constant", "threadgroup", "thread", "const", "volatile")
        ]
        base = words[-1] if words else ""
        return base.rstrip("234") if base.rstrip("234") in _NP_TYPES else base

    @property
    def is_pointer(self) -> bool:
        return "*" in self.type


@dataclasses.dataclass(frozen=True)
class Kernel:
    name: str
    params: tuple
    location: str

    def signature(self) -> str:
        parts = []
        for p in self.params:
            attr = {"buffer": f"buffer({p.index})", "threadgroup": f"threadgroup({p.index})"}
            parts.append(f"{p.type} {p.name} [[{attr.get(p.kind, p.index)}]]")
        return f"{self.name}({', '.join(parts)})"


@dataclasses.dataclass
class Buffer:
    """Bind part of an array: `offset` and `length` in bytes, like setBuffer:offset:."""

    obj: object
    offset: int = 0
    length: int | None = None


_NP_TYPES = {
    "float": np.float32,
    "half": np.float16,
    "int": np.int32,
    "uint": np.uint32,
    "short": np.int16,
    "ushort": np.uint16,
    "char": np.int8,
    "uchar": np.uint8,
    "long": np.int64,
    "ulong": np.uint64,
    "bool": np.bool_,
    "bfloat": None,
    "int8_t": np.int8,
    "uint8_t": np.uint8,
    "int16_t": np.int16,
    "uint16_t": np.uint16,
    "int32_t": np.int32,
    "uint32_t": np.uint32,
    "int64_t": np.int64,
    "uint64_t": np.uint64,
    "size_t": np.uint64,
}

_C = ctypes
_SIGS = {
    "msim_kernel_count": (_C.c_int, []),
    "msim_kernel_name": (_C.c_char_p, [_C.c_int]),
    "msim_kernel_signature": (_C.c_char_p, [_C.c_int]),
    "msim_kernel_location": (_C.c_char_p, [_C.c_int]),
    "msim_encoder_create": (_C.c_void_p, []),
    "msim_encoder_destroy": (None, [_C.c_void_p]),
    "msim_set_pipeline": (_C.c_int, [_C.c_void_p, _C.c_char_p]),
    "msim_set_buffer": (_C.c_int, [_C.c_void_p, _C.c_uint, _C.c_void_p, _C.c_size_t, _C.c_size_t]),
    "msim_set_bytes": (_C.c_int, [_C.c_void_p, _C.c_uint, _C.c_void_p, _C.c_size_t]),
    "msim_set_threadgroup_memory_length": (_C.c_int, [_C.c_void_p, _C.c_uint, _C.c_size_t]),
    "msim_set_option": (_C.c_int, [_C.c_void_p, _C.c_char_p, _C.c_char_p]),
    "msim_set_function_constant": (_C.c_int, [_C.c_void_p, _C.c_uint, _C.c_double]),
    "msim_dispatch_threadgroups": (
        _C.c_int,
        [_C.c_void_p, _C.POINTER(_C.c_uint), _C.POINTER(_C.c_uint)],
    ),
    "msim_dispatch_threads": (
        _C.c_int,
        [_C.c_void_p, _C.POINTER(_C.c_uint), _C.POINTER(_C.c_uint)],
    ),
    "msim_last_error": (_C.c_char_p, []),
    "msim_coverage": (_C.c_char_p, []),
}


def _dims(v) -> ctypes.Array:
    v = (v,) if isinstance(v, int) else tuple(v)
    if not 1 <= len(v) <= 3 or any(int(x) < 0 for x in v):
        raise ValueError(f"expected 1 to 3 non-negative sizes, got {v!r}")
    v = v + (1,) * (3 - len(v))
    return (ctypes.c_uint * 3)(*(int(x) for x in v))


def _array_info(obj):
    """(address, nbytes, dtype name) of a contiguous numpy array or torch CPU tensor, else None."""
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise MetalError("msim binds contiguous arrays only (use np.ascontiguousarray)")
        return obj.ctypes.data, obj.nbytes, obj.dtype.name
    if type(obj).__module__.startswith("torch"):
        if obj.device.type != "cpu" or not obj.is_contiguous():
            raise MetalError("msim binds contiguous CPU tensors only")
        return obj.data_ptr(), obj.numel() * obj.element_size(), str(obj.dtype).split(".")[-1]
    return None


_DTYPE_OK = {
    "float": {"float32"},
    "half": {"float16"},
    "bfloat": {"bfloat16", "uint16"},
    "int": {"int32"},
    "uint": {"uint32"},
    "short": {"int16"},
    "ushort": {"uint16"},
    "char": {"int8"},
    "uchar": {"uint8", "bool"},
    "bool": {"bool", "uint8"},
    "long": {"int64"},
    "ulong": {"uint64"},
}


_BYTE_TYPES = {"char", "uchar", "int8_t", "uint8_t", "void"}


class Encoder:
    """Mirror of a Metal compute encoder; bindings persist across dispatches."""

    def __init__(self, lib: Library):
        self._lib = lib
        self._h = lib._dll.msim_encoder_create()
        self._keep: dict = {}  # objects whose memory is bound
        self.kernel: Kernel | None = None

    def __del__(self):
        if getattr(self, "_h", None):
            self._lib._dll.msim_encoder_destroy(self._h)
            self._h = None

    def _check(self, rc: int) -> None:
        if rc:
            raise MetalError(self._lib._dll.msim_last_error().decode(errors="replace"))

    def set_pipeline(self, name: str) -> None:
        self._check(self._lib._dll.msim_set_pipeline(self._h, name.encode()))
        self.kernel = self._lib.kernels[name]

    def set_buffer(self, index: int, obj, offset: int = 0, length: int | None = None) -> None:
        info = _array_info(obj)
        if info is None:
            raise MetalError(f"buffer({index}): expected a numpy array or torch tensor")
        addr, nbytes, _ = info
        if length is None:
            length = nbytes - offset
        if offset < 0 or length < 0 or offset + length > nbytes:
            raise MetalError(f"buffer({index}): offset {offset} + length {length} > {nbytes} bytes")
        self._keep[index] = obj
        self._check(self._lib._dll.msim_set_buffer(self._h, index, addr, offset, length))

    def set_bytes(self, index: int, data) -> None:
        raw = bytes(data) if not isinstance(data, np.generic) else data.tobytes()
        self._check(self._lib._dll.msim_set_bytes(self._h, index, raw, len(raw)))

    def set_threadgroup_memory_length(self, index: int, length: int) -> None:
        self._check(self._lib._dll.msim_set_threadgroup_memory_length(self._h, index, length))

    def set_function_constant(self, index: int, value) -> None:
        self._check(self._lib._dll.msim_set_function_constant(self._h, index, float(value)))

    def set_option(self, key: str, value) -> None:
        self._check(self._lib._dll.msim_set_option(self._h, key.encode(), str(value).encode()))

    def dispatch_threadgroups(self, threadgroups, threads_per_threadgroup) -> None:
        self._check(
            self._lib._dll.msim_dispatch_threadgroups(
                self._h, _dims(threadgroups), _dims(threads_per_threadgroup)
            )
        )

    def dispatch_threads(self, threads, threads_per_threadgroup) -> None:
        self._check(
            self._lib._dll.msim_dispatch_threads(
                self._h, _dims(threads), _dims(threads_per_threadgroup)
            )
        )

    def bind(self, args) -> None:
        """Bind args by buffer index: a list (position = index) or a dict {index: arg}."""
        items = args.items() if isinstance(args, dict) else enumerate(args)
        params = {int(p.index): p for p in self.kernel.params if p.kind == "buffer"}
        for index, arg in items:
            if arg is None:  # e.g. a [[function_constant]] buffer that is switched off
                continue
            p = params.get(int(index))
            if p is None:
                raise MetalError(f"kernel '{self.kernel.name}' has no [[buffer({index})]]")
            self._bind_one(int(index), p, arg)

    def _bind_one(self, index: int, p: Param, arg) -> None:
        obj, offset, length = arg, 0, None
        if isinstance(arg, Buffer):
            obj, offset, length = arg.obj, arg.offset, arg.length
        info = _array_info(obj)
        if info is not None:
            # Byte pointers (`device const char*`, as ggml binds every tensor) take any array.
            ok = None if p.scalar in _BYTE_TYPES else _DTYPE_OK.get(p.scalar)
            if ok and info[2] not in ok:
                raise MetalError(
                    f"kernel '{self.kernel.name}' buffer({index}) '{p.name}' is '{p.type}' but "
                    f"got a {info[2]} array"
                )
            self.set_buffer(index, obj, offset, length)
        elif isinstance(obj, (bytes, bytearray, np.generic, ctypes.Structure, ctypes.Array)):
            self.set_bytes(index, obj)
        elif isinstance(obj, (bool, int, float)):
            np_type = _NP_TYPES.get(p.scalar)
            if np_type is None or p.is_pointer:
                raise MetalError(
                    f"buffer({index}) '{p.name}' is '{p.type}': pass a numpy scalar or bytes"
                )
            self.set_bytes(index, np_type(obj))
        else:
            raise MetalError(f"buffer({index}): cannot bind a {type(obj).__name__}")


class Library:
    """A compiled msim kernel library (see msim.build)."""

    def __init__(self, path):
        self.path = Path(path)
        self._dll = ctypes.CDLL(str(self.path))
        for name, (res, args) in _SIGS.items():
            fn = getattr(self._dll, name)
            fn.restype, fn.argtypes = res, args
        self.kernels: dict[str, Kernel] = {}
        for i in range(self._dll.msim_kernel_count()):
            name = self._dll.msim_kernel_name(i).decode()
            sig = self._dll.msim_kernel_signature(i).decode()
            params = tuple(Param(*f.split("|")) for f in sig.split(";") if f)
            loc = self._dll.msim_kernel_location(i).decode()
            self.kernels[name] = Kernel(name, params, loc)
        self._encoders: dict[str, Encoder] = {}

    def encoder(self) -> Encoder:
        return Encoder(self)

    def dispatch(
        self,
        name: str,
        args,
        threads_per_threadgroup,
        *,
        threadgroups=None,
        threads=None,
        tg_mem=None,
        constants=None,
        **options,
    ) -> None:
        """Bind `args` by buffer index and run: give `threadgroups` (dispatchThreadgroups) or
        `threads` (dispatchThreads). tg_mem: {index: bytes} for [[threadgroup(i)]] parameters.
        constants: {index: value} for [[function_constant(index)]] (bool, int or float).
        options: lane_order, tg_order, seed, workers, guard, uninit_check, tg_mem_limit, ..."""
        if name not in self.kernels:
            raise MetalError(f"no kernel with host name '{name}' in {self.path.name}")
        if (threadgroups is None) == (threads is None):
            raise ValueError("give exactly one of threadgroups= or threads=")
        enc = Encoder(self)
        enc.set_pipeline(name)
        enc.bind(args)
        for index, length in (tg_mem or {}).items():
            enc.set_threadgroup_memory_length(int(index), int(length))
        for index, value in (constants or {}).items():
            enc.set_function_constant(int(index), value)
        for key, value in options.items():
            enc.set_option(key, value)
        if threadgroups is not None:
            enc.dispatch_threadgroups(threadgroups, threads_per_threadgroup)
        else:
            enc.dispatch_threads(threads, threads_per_threadgroup)

    def coverage(self) -> set[str]:
        return set(self._dll.msim_coverage().decode().split())
