"""Progressive (stall-free) switching, the scheduler side: move a few layers per decode step
instead of all of them between two steps.

Each decoder layer has its own slice of the KV pool and of the expert store, so layer l can be
read through the TP view while layer l+1 is read through the EP view. During a switch every
running request holds a block table in both views (``block_ids`` in the primary view, the
layout the switch started from, ``alt_block_ids`` in the other); new tokens get slots in both,
and each layer writes its KV into the view of its current layout. ``progress`` picks the next
layers, moves their experts (the same range swap as a whole switch, restricted to them) and
their KV (source view -> target view), and when every layer is in the target the primary view
becomes the target's. ``reverse`` turns a switch around half-way: the moved layers go back.
Requests admitted mid-switch get tables in both views and compute their whole prompt (no
prefix-cache hit: a cached prefix exists in one view only); each layer writes its KV into the
view of its current layout, and later moves carry it like everyone else's.
"""

from __future__ import annotations

from dataclasses import dataclass

from moebius.engine.messages import KVMove, SwitchInput
from moebius.kv.block_manager import BlockManager


@dataclass
class Transition:
    target: str
    modes: list[str]  # per decoder layer
    alt_managers: list[BlockManager]

    @property
    def done(self) -> bool:
        return all(m == self.target for m in self.modes)

    @property
    def share_done(self) -> float:
        """The fraction of layers already in the target layout."""
        return sum(m == self.target for m in self.modes) / len(self.modes)


def begin(sched, target: str) -> list:
    """Start moving towards ``target``: tables in the other view for every running request
    (the fewest preempted when they do not fit). Returns the preempted requests."""
    assert sched.transition is None and target != sched.layout
    alt = target
    alt_managers = sched._make_managers(alt)
    if alt == "ep":  # owners for the EP side; under an EP primary they exist already
        owners = sched._balanced_owners(list(sched.running))
        for req in sched.running:
            req.owner_rank = owners[req.request_id]
    sched.transition = Transition(target, [sched.layout] * sched.cfg.model.num_layers, alt_managers)
    # Moved layers rewrite the pool's bytes through the other view: cached blocks of the
    # primary view would be stale after a reversal, so the prefix cache starts over (running
    # requests re-register their blocks when the switch ends; nothing registers meanwhile).
    for mgr in sched.managers:
        mgr.forget_cached()
    for req in sched.running:
        req.block_hashes = []
    preempted = []
    for req in sorted(sched.running, key=lambda r: r.num_computed_tokens):
        mgr = sched.alt_manager(req)
        if mgr.can_allocate([], req.num_computed_tokens):
            req.alt_block_ids = mgr.allocate([], req.num_computed_tokens)
        else:
            preempted.append(req)
    for req in preempted:
        sched.running.remove(req)
        sched.manager(req).free_table(req.block_ids)
        sched._requeue(req)
    return preempted


def reverse(sched) -> None:
    """Turn the switch around: the layers already moved go back, the others stay."""
    tr = sched.transition
    tr.target = "ep" if tr.target == "tp" else "tp"


def progress(sched, num_layers: int) -> SwitchInput:
    """The next ``num_layers`` layers to move, with every running request's KV move."""
    tr = sched.transition
    layers = [i for i, m in enumerate(tr.modes) if m != tr.target][:num_layers]
    forward = tr.target != sched.layout  # primary view -> other view
    moves = []
    for req in sched.running:
        primary = (req.owner_rank if sched.layout == "ep" else -1, list(req.block_ids))
        other = (req.owner_rank if sched.layout != "ep" else -1, list(req.alt_block_ids))
        (oo, ob), (no, nb) = (primary, other) if forward else (other, primary)
        moves.append(KVMove(req.request_id, req.num_computed_tokens, oo, ob, no, nb))
    for i in layers:
        tr.modes[i] = tr.target
    plan = SwitchInput(tr.target, moves, layers)
    if tr.done:
        _finish(sched)
    return plan


def _finish(sched) -> None:
    tr = sched.transition
    sched.transition = None
    if tr.target != sched.layout:  # the other view becomes the primary one
        old_managers = sched.managers
        sched.managers = tr.alt_managers
        for req in sched.running:
            req.block_ids, req.alt_block_ids = req.alt_block_ids, []
        del old_managers
    else:  # reversed back: the other view is dropped
        for req in sched.running:
            req.alt_block_ids = []
    sched.layout = tr.target
    for req in sched.running:
        if sched.layout == "tp":
            req.owner_rank = -1
        req.block_hashes = []
        sched.commit_blocks(req)
    for req in sched.waiting:
        req.owner_rank = -1
