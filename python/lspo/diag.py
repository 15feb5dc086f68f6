"""Diagnostics: how often an lspo optimizer's Python face calls into its C++ core.

    with lspo.diag.CoreCallCounter(opt) as c:
        for batch in data: loss(batch).backward(); opt.step(); opt.zero_grad()
    c.per_layer_step(steps)   # max over projected layers of (calls about that layer) / steps

Calls that name a slot (``on_grad``, ``on_compressed``, ``dense_this_step``, ``projectors``,
``state``, ...) count for that slot; the others (``step``, ``set_groups``, ``zero_grad``, ...) are
optimizer-wide and counted in ``other``.
"""
from __future__ import annotations

_SLOT_CALLS = ("on_grad", "on_compressed", "dense_this_step", "projectors", "state", "load_state",
               "is_projected", "step_count", "slot_name", "allocated")


class _Proxy:
    def __init__(self, core, counter: "CoreCallCounter"):
        self._core, self._counter = core, counter

    def __getattr__(self, name):
        attr = getattr(self._core, name)
        if not callable(attr):
            return attr
        c = self._counter

        def call(*a, **k):
            if name in _SLOT_CALLS and a:
                c.per_slot[a[0]] = c.per_slot.get(a[0], 0) + 1
            else:
                c.other += 1
            return attr(*a, **k)
        return call


class CoreCallCounter:
    def __init__(self, opt):
        self.opt = opt
        self.per_slot: dict = {}
        self.other = 0

    def __enter__(self) -> "CoreCallCounter":
        self._core = self.opt._core
        proxy = _Proxy(self._core, self)
        self.opt._core = proxy
        for h in getattr(self.opt, "_handles", {}).values():
            h._core = proxy
        return self

    def __exit__(self, *exc) -> None:
        self.opt._core = self._core
        for h in getattr(self.opt, "_handles", {}).values():
            h._core = self._core

    def projected_slots(self) -> list:
        return [i for p, i in self.opt._index.items() if self._core.is_projected(i)]

    def per_layer_step(self, steps: int) -> float:
        """Max over projected layers of the calls about that layer per step."""
        slots = self.projected_slots()
        return max((self.per_slot.get(i, 0) for i in slots), default=0) / steps
