"""CIFAR-10 python batches, read WITHOUT unpickling.

Shape legend: N images, C = 3 channels, H = W = 32.

A CIFAR-10 batch file is a pickled dict {'data': uint8 ndarray (N, 3072), 'labels': [N ints], ...}.
Unpickling would run whatever callables the file names, so minidiff never unpickles. Instead
`pickletools.genops` decodes the opcode stream (it executes nothing) and `scan_pickle` replays it on
a symbolic stack that builds only literal values (str, bytes, int, float, list, tuple, dict). Every
GLOBAL becomes an inert Global(module, name) and every REDUCE/NEWOBJ an inert Call(func, args) with
the BUILD state attached; nothing is ever imported or called. Two patterns are then read by hand:

    _codecs.encode(text, 'latin1')                       -> text.encode('latin1')   (protocol-2 bytes)
    numpy _reconstruct(ndarray, (0,), b'b') + BUILD (1, shape, dtype, fortran, raw)  -> raw, shape
    numpy _frombuffer(buffer, dtype, shape, order)       -> buffer, shape           (protocol 5)

    data row n = [R (32*32 row-major), G, B]  ->  image (3, 32, 32)  (already NCHW)
"""

from __future__ import annotations

import pickletools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dataset import MAX_CLASSES

@dataclass(eq=False)
class Global:
    """An inert reference to module.name (never imported)."""
    module: str
    name: str


@dataclass(eq=False)
class Call:
    """An inert record of func(*args) followed by BUILD(state) (never called)."""
    func: object
    args: tuple
    state: object = field(default=None)


_MARK = object()  # the MARK sentinel on the symbolic stack
_CODECS_ENCODE = ("_codecs", "encode")
_RECONSTRUCT = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct")}
_FROMBUFFER = {("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer")}
_LITERAL_OPS = {  # opcodes whose decoded argument is the pushed value
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT",
    "STRING", "BINSTRING", "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8",
    "UNICODE", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8",
}


def _pop_mark(stack):
    """Pop and return the items above the topmost MARK (the MARK is removed too)."""
    for i in range(len(stack) - 1, -1, -1):
        if stack[i] is _MARK:
            items = stack[i + 1:]
            del stack[i:]
            return items
    raise ValueError("MARK not found")


def _reduce(func, args):
    """REDUCE: decode _codecs.encode(text, 'latin1') to bytes; anything else stays an inert Call."""
    if isinstance(func, Global) and (func.module, func.name) == _CODECS_ENCODE:
        if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
            return args[0].encode("latin-1")
    return Call(func, tuple(args))


def scan_pickle(data: bytes):
    """Replay a pickle's opcodes on a symbolic stack; return the top-level value. Executes nothing."""
    stack, memo = [], {}
    for op, arg, _pos in pickletools.genops(data):
        name = op.name
        if name in _LITERAL_OPS:
            stack.append(arg)
        elif name == "BYTEARRAY8":
            stack.append(bytes(arg))
        elif name in ("PROTO", "FRAME"):
            continue
        elif name == "STOP":
            return stack.pop()
        elif name == "MARK":
            stack.append(_MARK)
        elif name == "POP":
            stack.pop()
        elif name == "POP_MARK":
            _pop_mark(stack)
        elif name == "DUP":
            stack.append(stack[-1])
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name in ("NONE", "NEWTRUE", "NEWFALSE"):
            stack.append({"NONE": None, "NEWTRUE": True, "NEWFALSE": False}[name])
        elif name in ("EMPTY_LIST", "EMPTY_TUPLE", "EMPTY_DICT"):
            stack.append({"EMPTY_LIST": list, "EMPTY_TUPLE": tuple, "EMPTY_DICT": dict}[name]())
        elif name == "LIST":
            stack.append(list(_pop_mark(stack)))
        elif name == "TUPLE":
            stack.append(tuple(_pop_mark(stack)))
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            k = int(name[-1])
            items = tuple(stack[-k:])
            del stack[-k:]
            stack.append(items)
        elif name == "DICT":
            items = _pop_mark(stack)
            stack.append(dict(zip(items[0::2], items[1::2])))
        elif name == "APPEND":
            value = stack.pop()
            stack[-1].append(value)
        elif name == "APPENDS":
            items = _pop_mark(stack)
            stack[-1].extend(items)
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            stack[-1][key] = value
        elif name == "SETITEMS":
            items = _pop_mark(stack)
            stack[-1].update(zip(items[0::2], items[1::2]))
        elif name == "GLOBAL":
            module, _, attr = arg.partition(" ")
            stack.append(Global(module, attr))
        elif name == "STACK_GLOBAL":
            attr, module = stack.pop(), stack.pop()
            stack.append(Global(module, attr))
        elif name in ("REDUCE", "NEWOBJ"):
            args, func = stack.pop(), stack.pop()
            stack.append(_reduce(func, args))
        elif name == "BUILD":
            state = stack.pop()
            if not isinstance(stack[-1], Call):
                raise ValueError(f"BUILD applied to a {type(stack[-1]).__name__}")
            stack[-1].state = state
        else:
            raise ValueError(f"unsupported pickle opcode {name}")
    raise ValueError("pickle stream has no STOP opcode")


def _is(obj, names) -> bool:
    return isinstance(obj, Call) and isinstance(obj.func, Global) and (obj.func.module, obj.func.name) in names


def _check_uint8_dtype(dtype) -> None:
    ok = isinstance(dtype, Call) and isinstance(dtype.func, Global) and dtype.func.name == "dtype" \
        and dtype.args and dtype.args[0] in ("u1", "|u1", "uint8")
    if not ok:
        raise ValueError("the 'data' array is not uint8")


def array_from_scan(obj) -> np.ndarray:
    """The uint8 array recorded by a scanned numpy pickle (see the module docstring)."""
    if _is(obj, _RECONSTRUCT) and isinstance(obj.state, tuple) and len(obj.state) == 5:
        _version, shape, dtype, fortran, raw = obj.state
        order = "F" if fortran else "C"
    elif _is(obj, _FROMBUFFER) and len(obj.args) == 4:
        raw, dtype, shape, order = obj.args
    else:
        raise ValueError("the 'data' entry is not a pickled numpy array")
    _check_uint8_dtype(dtype)
    if isinstance(raw, str):  # a Python 2 str (BINSTRING), decoded by genops as latin-1
        raw = raw.encode("latin-1")
    if not isinstance(raw, bytes) or not isinstance(shape, tuple) or len(raw) != int(np.prod(shape)):
        raise ValueError("the 'data' array's bytes do not match its shape")
    return np.frombuffer(raw, np.uint8).reshape(shape, order=order).copy()


def _get(d, key):
    """d[key] where the key was pickled as str (Python 2) or bytes (Python 3)."""
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise KeyError(key)


def read_cifar_batch(path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (images uint8 (N, 3, 32, 32), labels int64 (N,))."""
    path = Path(path)
    try:
        top = scan_pickle(path.read_bytes())
        data = array_from_scan(_get(top, "data"))
        raw_labels = _get(top, "labels")
        if not isinstance(raw_labels, list) or not all(type(v) is int for v in raw_labels):  # before asarray:
            raise ValueError("labels must be a flat list of ints")  # nested shared lists would expand to GiBs
        if raw_labels and not 0 <= min(raw_labels) <= max(raw_labels) < MAX_CLASSES:  # before int64 (2**70)
            raise ValueError(f"labels must be 0..K-1 with K <= {MAX_CLASSES} (MAX_CLASSES), got "
                             f"{min(raw_labels)}..{max(raw_labels)}")
        labels = np.asarray(raw_labels, np.int64)
        if data.ndim != 2 or data.shape[1] != 3072 or labels.shape != (data.shape[0],):
            raise ValueError(f"data {data.shape} and labels {labels.shape} do not fit (N, 3072), (N,)")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise ValueError(f"{path} is not a readable CIFAR-10 python batch ({err}); "
                         "re-download cifar-10-python.tar.gz and extract it") from None
    return data.reshape(-1, 3, 32, 32), labels


MAX_NAME_CHARS = 256  # the longest class name batches.meta may hold


def read_cifar_label_names(path) -> list[str] | None:
    """label_names from batches.meta, or None if the file is missing or unreadable. The names must be a list of
    at most MAX_CLASSES str/bytes of at most MAX_NAME_CHARS each, checked before any is decoded (one shared 1 MB
    name repeated 10**4 times is a few MB pickled and 10 GB decoded); one line naming the file otherwise."""
    try:
        names = _get(scan_pickle(Path(path).read_bytes()), "label_names")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(names, list) or len(names) > MAX_CLASSES or not all(
            isinstance(n, (str, bytes)) and len(n) <= MAX_NAME_CHARS for n in names):
        raise ValueError(f"{path}: label_names must be a list of at most {MAX_CLASSES} names (MAX_CLASSES) of at most "
                         f"{MAX_NAME_CHARS} characters; re-download cifar-10-python.tar.gz or remove the file")
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else n for n in names]
