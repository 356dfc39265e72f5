"""Traffic of one training step, counted in Triton's interpreter (run with TRITON_INTERPRET=1).

Every load and store a kernel makes goes through the interpreter's builder; ``Probe`` wraps those
calls and the launch of each grid, and attributes each byte to the kernel argument whose tensor
holds the address.  Reads of logits-sized tensors (at least half the logits' elements) are
classified element by element:

* ``first``: the step's first touch of that element (a read from HBM);
* ``same_program``: read again by the program that read it before (the second pass over a row:
  served by L2 when the rows in flight fit there, see ``bench.model.code``);
* ``later_launch``: read again in a later launch, or after a write (from HBM at the headline
  sizes, whose logits are many times the L2).

A TorchDispatchMode counts the PyTorch operations around the kernels: the small ones, the
logits-sized ones (traffic the kernels do not see), and host synchronisations
(``aten._local_scalar_dense``, ``aten.nonzero``, ``aten.equal``).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operations that move no data: views, allocations, metadata.
_FREE_OPS = {
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view",
    "_unsafe_view",
    "reshape", "as_strided", "alias", "detach", "t", "transpose", "expand", "slice", "select",
    "unsqueeze", "squeeze", "permute", "unbind", "split", "lift_fresh", "_to_copy_noop",
    "set_", "resize_", "view_as", "squeeze_", "unsqueeze_", "_reshape_alias",
}
_SYNC_OPS = {"_local_scalar_dense", "nonzero", "equal", "item"}
_ACTIVE: Probe | None = None


@dataclasses.dataclass
class Launch:
    kernel: str
    grid: tuple[int, ...]
    loads: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    stores: dict[str, int] = dataclasses.field(default_factory=collections.Counter)
    big_args: set[str] = dataclasses.field(default_factory=set)  # logits-sized arguments
    reads: dict[str, int] = dataclasses.field(default_factory=collections.Counter)  # by class


class Probe(TorchDispatchMode):
    """Counts a step's kernel traffic (by argument and read class) and its PyTorch operations."""

    def __init__(self, big_numel: int):
        super().__init__()
        self.big_numel = big_numel
        self.launches: list[Launch] = []
        self.ops: collections.Counter = collections.Counter()
        self.big_ops: list[str] = []
        self.syncs = 0
        self._args: list[tuple[int, int, str, bool]] = []  # (start, end, name, big) of a launch
        self._touched: dict[int, tuple[int, tuple]] = {}  # element address -> (launch, program)
        self._in_kernel = False

    # -- PyTorch operations ---------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self._in_kernel and func.namespace != "fusedce":  # (fusedce's ops: kernels)
            name = func.__name__.split(".")[0]
            if name in _SYNC_OPS:
                self.syncs += 1
            if name not in _FREE_OPS:
                self.ops[name] += 1
                tensors = [t for t in torch.utils._pytree.tree_leaves((args, kwargs, out))
                           if isinstance(t, torch.Tensor)]
                if any(t.numel() >= self.big_numel for t in tensors):
                    self.big_ops.append(name)
        return out

    # -- Kernel launches ------------------------------------------------------------------------
    def install(self):
        """Route the interpreter's loads, stores and grid launches through this probe (the
        builder and executor are patched once per process; later probes take over)."""
        global _ACTIVE
        first = _ACTIVE is None
        _ACTIVE = self
        if not first:
            return
        from triton.runtime import interpreter

        def probe_now():
            return _ACTIVE
        builder = interpreter.InterpreterBuilder
        executor = interpreter.GridExecutor
        real_load, real_store = builder.create_masked_load, builder.create_masked_store
        real_call = executor.__call__

        def load(self_, ptrs, mask, other, cache_policy, is_volatile):
            size = interpreter._get_np_dtype(ptrs.get_element_ty()).itemsize
            probe_now()._record(ptrs.data, mask.data, size, False, self_.grid_idx)
            return real_load(self_, ptrs, mask, other, cache_policy, is_volatile)

        def store(self_, ptrs, value, mask, cache_policy):
            probe_now()._record(ptrs.data, mask.data, value.data.dtype.itemsize, True,
                                self_.grid_idx)
            return real_store(self_, ptrs, value, mask, cache_policy)

        def call(self_, *args, **kwargs):
            probe_now()._begin(self_, args, kwargs)
            try:
                return real_call(self_, *args, **kwargs)
            finally:
                probe_now()._in_kernel = False

        builder.create_masked_load, builder.create_masked_store = load, store
        executor.__call__ = call

    def _begin(self, executor, args, kwargs):
        self._in_kernel = True
        grid = executor.grid if not callable(executor.grid) else ()
        launch = Launch(executor.fn.__name__ if hasattr(executor.fn, "__name__") else "kernel",
                        tuple(grid))
        self.launches.append(launch)
        ranges: dict[tuple[int, int], tuple[str, bool]] = {}
        for name, value in [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items()):
            if isinstance(value, torch.Tensor) and value.numel() > 0:
                start = value.data_ptr()
                extent = (1 + sum((s - 1) * st for s, st in zip(value.shape, value.stride()))
                          ) * value.element_size()
                big = value.numel() >= self.big_numel
                # An argument passed only for its address (a placeholder aliasing another)
                # yields to the later argument of the same range.
                ranges[(start, start + extent)] = (name, big)
                if big:
                    launch.big_args.add(name)
        self._args = [(a, b, name, big) for (a, b), (name, big) in ranges.items()]

    def _record(self, addresses, mask, size, is_store, program):
        addresses = np.broadcast_to(addresses, np.broadcast_shapes(addresses.shape, mask.shape))
        active = addresses[np.broadcast_to(mask, addresses.shape)].ravel()
        if active.size == 0:
            return
        launch = self.launches[-1]
        index = len(self.launches) - 1
        for start, end, name, big in self._args:
            inside = active[(active >= start) & (active < end)]
            if inside.size == 0:
                continue
            (launch.stores if is_store else launch.loads)[name] += int(inside.size) * size
            if big:
                self._classify(launch, index, inside, size, is_store, program)
            break

    def _classify(self, launch, index, addresses, size, is_store, program):
        """Bytes read from a logits-sized tensor, by where the element was last touched."""
        for address in addresses.tolist():
            before = self._touched.get(address)
            if not is_store:
                if before is None:
                    launch.reads["first"] += size
                elif before == (index, program):
                    launch.reads["same_program"] += size
                else:
                    launch.reads["later_launch"] += size
            self._touched[address] = (index, program)


def count_step(step, big_numel: int) -> Probe:
    """Run ``step()`` under a fresh probe (the interpreter must be active)."""
    probe = Probe(big_numel)
    probe.install()
    with probe:
        step()
    return probe
