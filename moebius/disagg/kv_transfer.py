"""Moving one request's KV (and its metadata) from a prefill instance to a decode instance.

Owns the `KVTransport` interface, its torch.distributed implementation and an in-memory fake
for tests.

Shape legend: L layers, T tokens, kvh KV heads (all of them: the wire format is
layout-independent), d head dim. A payload's KV is (L, 2, T, kvh, d), keys then values.

`TorchDistTransport`: every pair (prefill endpoint, decode endpoint) gets its own two-member
process group (gloo on CPU, NCCL on GPU), built on first use from a `PrefixStore` over one
`TCPStore` whose address every instance is given on the command line (`--kv-store HOST:PORT`;
the router, or anyone, hosts it). The group is separate from each instance's own ranks'
group, so transfers never interleave with an engine's collectives. Endpoint names carry a
per-process random suffix, so a restarted instance never meets the stale keys of its previous
life. One transfer is: a header length (int64), the JSON header (uint8) with the metadata,
dtype and shape, then the KV tensor. Gloo matches by tag; NCCL ignores tags, so callers keep
at most one transfer in flight per pair (roles.py holds a per-peer lock).
"""

from __future__ import annotations

import json
import threading
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


class TransferError(RuntimeError):
    """A transfer failed (peer gone, timeout); the peer's group is dropped."""


@dataclass
class KVPayload:
    """One request's KV and what the receiver needs to continue it.

    meta: JSON-serialisable (prompt ids, first token, seed, expert counts, ...).
    kv: (L, 2, T, kvh, d), all KV heads of the T prompt tokens.
    """

    meta: dict
    kv: torch.Tensor


def endpoint_name(role: str, port: int) -> str:
    """A unique transport name: role, port and a random suffix (new at every start)."""
    return f"{role}-{port}-{uuid.uuid4().hex[:8]}"


class KVTransport(ABC):
    """Point-to-point transfer of `KVPayload`s between named endpoints.

    Contract: `send(peer, payload, tag)` on one endpoint pairs with `recv(peer, tag)` on the
    peer (each names the other); both block until the transfer is done and raise
    `TransferError` on failure or timeout. Tags distinguish concurrent transfers of one pair
    where the backend supports it; `recv` returns the payload on the receiver's device.
    """

    name: str

    @abstractmethod
    def send(self, peer: str, payload: KVPayload, tag: int = 0) -> None: ...

    @abstractmethod
    def recv(self, peer: str, tag: int = 0) -> KVPayload: ...

    def close(self) -> None:
        """Release connections (optional)."""
        return None


def _header(payload: KVPayload) -> bytes:
    kv = payload.kv
    head = {"meta": payload.meta, "dtype": str(kv.dtype).removeprefix("torch."), "shape": []}
    head["shape"] = list(kv.shape)
    return json.dumps(head).encode()


class TorchDistTransport(KVTransport):
    """torch.distributed point-to-point over lazily built pair groups; see the module doc."""

    def __init__(
        self,
        name: str,
        store_addr: str,
        device: str | torch.device = "cpu",
        timeout_s: float = 60.0,
    ) -> None:
        self.name = name
        self.device = torch.device(device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        self.timeout = timedelta(seconds=timeout_s)
        host, port = store_addr.rsplit(":", 1)
        self._store_addr = (host, int(port))
        self._store: dist.Store | None = None
        self._groups: dict[str, dist.ProcessGroup] = {}
        self._lock = threading.Lock()
        self._pair_locks: dict[str, threading.Lock] = {}

    def _get_store(self) -> dist.Store:
        if self._store is None:
            host, port = self._store_addr
            self._store = dist.TCPStore(
                host, port, is_master=False, timeout=self.timeout, wait_for_workers=False
            )
        return self._store

    def _group(self, peer: str) -> tuple[dist.ProcessGroup, int]:
        """The pair group with ``peer`` (built on first use; blocks until the peer joins) and
        the peer's rank in it. Ranks follow the sorted names, so both sides agree."""
        members = sorted([self.name, peer])
        with self._lock:
            pair_lock = self._pair_locks.setdefault(peer, threading.Lock())
        with pair_lock:
            pg = self._groups.get(peer)
            if pg is None:
                with self._lock:
                    store = self._get_store()
                prefix = dist.PrefixStore(f"kv/{members[0]}/{members[1]}", store)
                rank = members.index(self.name)
                try:
                    if self.backend == "gloo":
                        pg = dist.ProcessGroupGloo(prefix, rank, 2, self.timeout)
                    else:
                        opts = dist.ProcessGroupNCCL.Options()
                        opts._timeout = self.timeout
                        pg = dist.ProcessGroupNCCL(prefix, rank, 2, opts)
                except Exception as e:
                    raise TransferError(f"could not connect to {peer}: {e}") from e
                self._groups[peer] = pg
        return pg, members.index(peer)

    def _drop(self, peer: str) -> None:
        with self._lock:
            self._groups.pop(peer, None)

    def send(self, peer: str, payload: KVPayload, tag: int = 0) -> None:
        pg, dst = self._group(peer)
        head = torch.frombuffer(bytearray(_header(payload)), dtype=torch.uint8)
        tensors = [torch.tensor([head.numel()], dtype=torch.int64), head, payload.kv.contiguous()]
        try:
            for t in tensors:
                pg.send([t.to(self.device)], dst, tag).wait()
        except Exception as e:
            self._drop(peer)
            raise TransferError(f"sending to {peer} failed: {e}") from e

    def recv(self, peer: str, tag: int = 0) -> KVPayload:
        pg, src = self._group(peer)
        try:
            size = torch.zeros(1, dtype=torch.int64, device=self.device)
            pg.recv([size], src, tag).wait()
            head = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
            pg.recv([head], src, tag).wait()
            info = json.loads(bytes(head.cpu().numpy().tobytes()))
            kv = torch.empty(info["shape"], dtype=getattr(torch, info["dtype"]), device=self.device)
            pg.recv([kv], src, tag).wait()
        except Exception as e:
            self._drop(peer)
            raise TransferError(f"receiving from {peer} failed: {e}") from e
        return KVPayload(info["meta"], kv)

    def close(self) -> None:
        with self._lock:
            self._groups.clear()


class FakeHub:
    """The shared mailbox of `FakeTransport` endpoints (one process, any threads)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.boxes: dict[tuple[str, str, int], list[KVPayload]] = {}
        self.dead: set[str] = set()

    def endpoint(self, name: str) -> FakeTransport:
        return FakeTransport(name, self)


class FakeTransport(KVTransport):
    """In-memory transport for tests: payloads are cloned, so no buffer is shared."""

    def __init__(self, name: str, hub: FakeHub, timeout_s: float = 10.0) -> None:
        self.name, self.hub, self.timeout_s = name, hub, timeout_s

    def send(self, peer: str, payload: KVPayload, tag: int = 0) -> None:
        with self.hub.cond:
            if peer in self.hub.dead:
                raise TransferError(f"{peer} is gone")
            copy = KVPayload(json.loads(json.dumps(payload.meta)), payload.kv.clone())
            self.hub.boxes.setdefault((self.name, peer, tag), []).append(copy)
            self.hub.cond.notify_all()

    def recv(self, peer: str, tag: int = 0) -> KVPayload:
        key = (peer, self.name, tag)
        with self.hub.cond:
            ok = self.hub.cond.wait_for(
                lambda: self.hub.boxes.get(key) or peer in self.hub.dead, self.timeout_s
            )
            if not ok or not self.hub.boxes.get(key):
                raise TransferError(f"nothing from {peer} (tag {tag})")
            return self.hub.boxes[key].pop(0)
