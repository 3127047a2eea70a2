"""Bytes through torch.distributed collectives, counted per phase (bench/teacher_placement.py, tests/test_placement.py).

    counter = CommCounter(world).install()     # before the process group: DeepSpeed's comm backend binds
    with counter.phase("teacher"): ...         # torch.distributed's functions when it is created
    counter.totals()                           # {phase: {op: bytes}}

Every collective of torch.distributed (and what DeepSpeed's ZeRO calls through it: parameter all-gathers, gradient
reduce-scatters, norms) is counted once, at the outermost call (a collective implemented by another one, e.g.
all_gather_object -> all_gather, counts as itself). Bytes are what crosses one rank's link for a ring algorithm, the
convention of distillery/zero_cost.py: all-gather (n - 1) / n of the gathered tensor, reduce-scatter (n - 1) / n of
the input, all-reduce 2 (n - 1) / n of the tensor, broadcast the tensor. A measuring tool: nothing in training
installs it.
"""
import contextlib
import functools
import threading
from collections import defaultdict

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# op name -> (kind, which argument holds the tensor(s) whose size counts)
OPS = {
    "all_gather_into_tensor": ("all_gather", "output_tensor", 0),
    "_all_gather_base": ("all_gather", "output_tensor", 0),
    "all_gather": ("all_gather", "tensor_list", 0),
    "reduce_scatter_tensor": ("reduce_scatter", "input", 1),
    "_reduce_scatter_base": ("reduce_scatter", "input", 1),
    "reduce_scatter": ("reduce_scatter", "input_list", 1),
    "all_reduce": ("all_reduce", "tensor", 0),
    "all_reduce_coalesced": ("all_reduce", "tensors", 0),
    "broadcast": ("broadcast", "tensor", 0),
    "all_to_all_single": ("all_to_all", "input", 1),
}


def _nbytes(x):
    if isinstance(x, (list, tuple)):
        return sum(_nbytes(t) for t in x)
    return x.numel() * x.element_size()


def ring_bytes(kind, nbytes, world):
    """Bytes one rank sends (= receives) for a collective over `nbytes` (see the module docstring)."""
    frac = (world - 1) / world
    return {"all_gather": frac, "reduce_scatter": frac, "all_to_all": frac, "all_reduce": 2 * frac,
            "broadcast": 1.0}[kind] * nbytes


class CommCounter:
    def __init__(self, world):
        self.world = world
        self.bytes = defaultdict(lambda: defaultdict(float))   # phase -> kind -> ring bytes per rank
        self.calls = defaultdict(lambda: defaultdict(int))
        self._phase = "other"
        self._depth = threading.local()

    def install(self):
        """Wrap torch.distributed's collectives (both the module and distributed_c10d, which calls its own globals)."""
        for name, (kind, arg, pos) in OPS.items():
            fn = getattr(c10d, name, None)
            if fn is None or getattr(fn, "_commcount", False):
                continue
            wrapped = self._wrap(fn, kind, arg, pos)
            setattr(c10d, name, wrapped)
            if getattr(dist, name, None) is fn:
                setattr(dist, name, wrapped)
        return self

    def _wrap(self, fn, kind, arg, pos):
        @functools.wraps(fn)
        def counted(*args, **kw):
            depth = getattr(self._depth, "n", 0)
            if depth == 0:
                t = kw[arg] if arg in kw else args[pos]
                group = kw.get("group")
                n = dist.get_world_size(group) if group is not None else self.world
                if n > 1:
                    self.bytes[self._phase][kind] += ring_bytes(kind, _nbytes(t), n)
                self.calls[self._phase][kind] += 1
            self._depth.n = depth + 1
            try:
                return fn(*args, **kw)
            finally:
                self._depth.n = depth
        counted._commcount = True
        return counted

    @contextlib.contextmanager
    def phase(self, name):
        """Collectives inside the block count under `name` (phases nest: the inner one wins)."""
        prev, self._phase = self._phase, name
        try:
            yield
        finally:
            self._phase = prev

    def totals(self):
        return {p: dict(k) for p, k in self.bytes.items()}

    def reset(self):
        self.bytes.clear()
        self.calls.clear()
