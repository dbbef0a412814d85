"""KV transfer: the in-memory fake and the torch.distributed (gloo) transport between two
processes that share nothing but a TCPStore address."""

from __future__ import annotations

import multiprocessing as mp
import threading
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from moebius.disagg.kv_transfer import FakeHub, KVPayload, TorchDistTransport, TransferError
from moebius.engine.worker import free_port


def _payload(seed: int, tokens: int = 5) -> KVPayload:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(3, 2, tokens, 2, 4, generator=g)
    return KVPayload({"request": f"r{seed}", "first_token": seed, "counts": [[1, 2], [3, 4]]}, kv)


def test_fake_roundtrip_and_tags():
    hub = FakeHub()
    a, b = hub.endpoint("prefill"), hub.endpoint("decode")
    p1, p2 = _payload(1), _payload(2)
    a.send("decode", p1, tag=1)
    a.send("decode", p2, tag=2)
    got2, got1 = b.recv("prefill", tag=2), b.recv("prefill", tag=1)
    assert got1.meta == p1.meta and torch.equal(got1.kv, p1.kv)
    assert got2.meta == p2.meta and torch.equal(got2.kv, p2.kv)
    hub.dead.add("decode")
    with pytest.raises(TransferError):
        a.send("decode", p1)
    b.timeout_s = 0.05
    with pytest.raises(TransferError):
        b.recv("prefill", tag=9)


def _sender(store_port: int, names: tuple[str, str], n: int, q) -> None:
    t = TorchDistTransport(names[0], f"127.0.0.1:{store_port}", timeout_s=30)
    try:
        threads = [
            threading.Thread(target=t.send, args=(names[1], _payload(i, 3 + i), i))
            for i in range(n)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        q.put("ok")
    except Exception as e:  # reported to the test
        q.put(repr(e))


def test_gloo_transport_between_processes():
    port = free_port()
    store = dist.TCPStore(
        "127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30)
    )
    names = ("prefill-a", "decode-b")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    n = 4
    proc = ctx.Process(target=_sender, args=(port, names, n, q), daemon=True)
    proc.start()
    recv = TorchDistTransport(names[1], f"127.0.0.1:{port}", timeout_s=30)
    try:
        # receive in the reverse order of the tags: gloo matches by tag, so concurrent
        # transfers of one pair do not mix
        for i in reversed(range(n)):
            got = recv.recv(names[0], tag=i)
            want = _payload(i, 3 + i)
            assert got.meta == want.meta
            assert got.kv.dtype == want.kv.dtype and torch.equal(got.kv, want.kv)
        assert q.get(timeout=30) == "ok"
    finally:
        proc.join(timeout=10)
        recv.close()
        del store
