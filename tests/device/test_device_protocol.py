"""The device protocol trusts no one: real lean device runtimes behind a real TVM tracker on loopback, attacked
the way a peer on the network could. Without the token there is no TVM session at all (TVM's own client and
raw RPC packets -- memory copies, allocations -- are cut off before TVM reads a byte); a device that does not
know the token gets nothing from the client and gives it no result; garbage, truncated packets and killed
sessions leave the device serving; a device killed mid-run is reported as dropped within seconds."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from typer.testing import CliRunner

from cli import app
from tests.fixtures.device_farm import TOKEN, Farm, start_tracker
from tests.fixtures.device_models import fit_linear, save
from toolchain import api
from toolchain.bench import prepare_job
from toolchain.core.cache import Cache
from toolchain.core.errors import InfraError, UsageError
from toolchain.core.profile import load_profile
from toolchain.device.farm import bench_many
from toolchain.device.protocol import (
    MAGIC,
    PROTOCOL_VERSION,
    HandshakeError,
    RemoteSpec,
    new_nonce,
    proof,
    recv_frame,
    send_frame,
)
from toolchain.device.runtime import DeviceServer
from toolchain.device.session import connect_device, handshake, local_versions, open_session
from toolchain.export import import_onnx_file

pytestmark = pytest.mark.rpc
KEY = "edgec-guard"
ROGUE_KEY = "edgec-guard-rogue"  # an edgec device that does not know the token
DOOMED_KEY = "edgec-guard-doomed"  # killed mid-run
RPC_MAGIC = 0xFF271  # TVM's RPC magic (tvm.rpc.base)
KCOPY_TO_REMOTE, KINIT_SERVER, KDEV_ALLOC_DATA = 7, 2, 13  # TVM's RPCCode (rpc_reference.h)


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = tmp_path_factory.mktemp("guard")
    f = start_tracker(KEY, log_dir=d)
    f.calls = d / "calls.jsonl"  # type: ignore[attr-defined]
    f.rogue_calls = d / "rogue-calls.jsonl"  # type: ignore[attr-defined]
    try:
        f.honest = f.add_device(lean=True, log=f.calls)  # type: ignore[attr-defined]
        f.add_device(token="not-the-token", key=ROGUE_KEY, lean=True, log=f.rogue_calls)
        f.doomed = f.add_device(key=DOOMED_KEY, lean=True)  # type: ignore[attr-defined]
        f.wait_devices(1)
        f.wait_devices(1, key=ROGUE_KEY)
        f.wait_devices(1, key=DOOMED_KEY)
    except BaseException:
        f.close()
        raise
    yield f
    f.close()


@pytest.fixture(scope="module")
def art(tmp_path_factory: pytest.TempPathFactory, fashion: object) -> tuple[Cache, Any]:
    d = tmp_path_factory.mktemp("guard-art")
    cache = Cache(d / "cache")
    src, _ = import_onnx_file(save(fit_linear(fashion), d / "lin.onnx"), cache)
    return cache, api.compile(src, profile=load_profile("x86-avx512"), target="ort", cache=cache)[0]


def spec(farm: Farm, key: str = KEY, token: str = TOKEN, **kw: Any) -> RemoteSpec:
    return RemoteSpec("127.0.0.1", farm.tracker_port, key, token, **kw)


def host_port(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def calls(path: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.is_file() else []


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the peer sends until it closes the connection (fails if it keeps it open)."""
    sock.settimeout(timeout)
    got = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return got
            got += chunk
    except ConnectionResetError:
        return got
    finally:
        sock.close()


def tvm_packet(code: int, payload: bytes) -> bytes:
    return struct.pack("<Qi", 4 + len(payload), code) + payload


def tvm_connect_bytes(key: str = "client:" + KEY) -> bytes:
    return struct.pack("<ii", RPC_MAGIC, len(key)) + key.encode()


def bench_ok(farm: Farm, art: tuple[Cache, Any]) -> dict[str, Any]:
    cache, a = art
    job = prepare_job(a, cache, data="fashion-mnist", samples=100, duration_s=0.1)
    res = bench_many([job], spec(farm, request_timeout_s=30))
    assert res[a.key]["agreement"]["argmax_agreement"] == 1.0
    return res[a.key]


def test_a_client_without_the_token_gets_no_tvm_session(farm: Farm) -> None:
    from tvm import rpc

    host, port = host_port(farm.honest)  # type: ignore[attr-defined]
    # TVM's own client: the device reads its 4-byte magic, sees no edgec handshake and closes.
    with pytest.raises(Exception, match=r"(?i)closed|reset|connect|socket|magic"):
        rpc.connect(host, port, KEY)
    # Raw TVM RPC packets, with and without TVM's connect exchange first: copy bytes to a raw address,
    # allocate device memory, init a server session. The device answers nothing and closes.
    copy = struct.pack("<QQQiiBBH", 0x1000, 0, 8, 1, 0, 2, 32, 1) + b"\xcc" * 8
    for raw in (tvm_connect_bytes() + tvm_packet(KINIT_SERVER, struct.pack("<Q", 5) + b"0.8.0"),
                tvm_connect_bytes() + tvm_packet(KCOPY_TO_REMOTE, copy),
                tvm_packet(KCOPY_TO_REMOTE, copy),
                tvm_packet(KDEV_ALLOC_DATA, struct.pack("<iiQ", 1, 0, 1 << 20))):
        s = socket.create_connection((host, port), timeout=5)
        s.sendall(raw)
        assert closed_by_peer(s) == b""
    # The edgec handshake without the token: the device proves itself, the wrong proof ends the connection,
    # and TVM packets sent after it are never read.
    s = socket.create_connection((host, port), timeout=5)
    hello = {"edgec": "client", "protocol": PROTOCOL_VERSION, "nonce": new_nonce(), "versions": local_versions(),
             "key": KEY, "session_timeout_s": 0.0}
    s.sendall(MAGIC)
    send_frame(s, hello)
    dev = recv_frame(s)
    assert dev["edgec"] == "device" and "proof" in dev
    send_frame(s, {"proof": proof("guessed-token", "client", hello, dev)})
    assert recv_frame(s) == {"error": "wrong token"}
    assert closed_by_peer(s) == b""
    # Through the client library with a wrong token: refused before anything is sent.
    with pytest.raises(UsageError, match="did not prove the token"):
        open_session(spec(farm, token="not-the-token", request_timeout_s=20))
    assert calls(farm.calls) == []  # type: ignore[attr-defined]  (no upload, no module load, ever)
    assert "session 1 from" not in farm.log_text(farm.honest)  # type: ignore[attr-defined]
    assert "wrong magic" in farm.log_text(farm.honest) and "wrong token" in farm.log_text(farm.honest)  # type: ignore[attr-defined]


def test_a_device_without_the_token_gets_nothing_and_gives_no_result(farm: Farm, art: tuple[Cache, Any]) -> None:
    cache, a = art
    r = CliRunner().invoke(app, ["--cache-dir", str(cache.root), "bench", a.key, "--data", "fashion-mnist",
                                 "--samples", "50", "--duration", "0.1", "--json", "--tracker", farm.tracker,
                                 "--key", ROGUE_KEY, "--token", TOKEN])
    assert r.exit_code == 2, r.output
    assert "did not prove the token" in r.output and "not yours" in r.output
    assert not list(Path(cache.root).glob("*/*/result.json"))  # no result was recorded
    assert calls(farm.rogue_calls) == []  # type: ignore[attr-defined]  (the artifact never left the client)


def test_a_version_mismatch_is_refused_with_both_versions_named(farm: Farm) -> None:
    host, port = host_port(farm.honest)  # type: ignore[attr-defined]
    s = socket.create_connection((host, port), timeout=5)
    hello = {"edgec": "client", "protocol": PROTOCOL_VERSION, "nonce": new_nonce(),
             "versions": {**local_versions(), "tvm": "0.0.1"}, "key": KEY}
    s.sendall(MAGIC)
    send_frame(s, hello)
    err = recv_frame(s)["error"]
    assert "versions differ" in err and "tvm 0.0.1 on the client" in err
    s.close()

    # A device (in this process, real sockets) that runs another tvm-ffi: the session is refused with both
    # versions named, before any proof is sent.
    server = DeviceServer(TOKEN, "solo", None, "127.0.0.1", 0, 1)
    server.versions = {**server.versions, "tvm_ffi": "9.9.9"}

    def serve_one() -> None:
        with contextlib.suppress(HandshakeError):
            server._handshake(server.sock.accept()[0])

    t = threading.Thread(target=serve_one, daemon=True)
    t.start()
    with pytest.raises(UsageError, match=r"versions differ \(tvm_ffi \S+ on the client, 9\.9\.9 on the device"):
        connect_device("127.0.0.1", server.port, "solo", TOKEN)
    t.join(5)
    server.close()


def test_garbage_and_killed_sessions_leave_the_device_serving(farm: Farm, art: tuple[Cache, Any]) -> None:
    host, port = host_port(farm.honest)  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    sent = 0
    for i in range(200):
        kind = i % 8
        s = socket.create_connection((host, port), timeout=5)
        if kind == 0:  # random bytes
            s.sendall(rng.bytes(int(rng.integers(1, 400))))
        elif kind == 1:  # truncated magic / frame header
            s.sendall((MAGIC + b"\x00\x00\x10")[: int(rng.integers(1, 7))])
        elif kind == 2:  # a frame cut short
            s.sendall(MAGIC + struct.pack(">I", 4000) + b'{"edgec": "client", "nonce": "')
        elif kind == 3:  # a frame longer than allowed
            s.sendall(MAGIC + struct.pack(">I", 0xFFFFFFFF) + rng.bytes(64))
        elif kind == 4:  # not JSON
            s.sendall(MAGIC + struct.pack(">I", 72) + rng.bytes(72))
        elif kind == 5:  # JSON, not a hello
            send = json.dumps([1, 2, {"nonce": 3}]).encode()
            s.sendall(MAGIC + struct.pack(">I", len(send)) + send)
        elif kind == 6:  # TVM's connect exchange and a copy packet
            s.sendall(tvm_connect_bytes() + tvm_packet(KCOPY_TO_REMOTE, rng.bytes(48)))
        else:  # a valid hello with a short nonce
            hello = {"edgec": "client", "nonce": "ab", "versions": {}, "key": KEY}
            s.sendall(MAGIC)
            send_frame(s, hello)
        with contextlib.suppress(OSError):  # the device may have closed already
            s.shutdown(socket.SHUT_WR)
        closed_by_peer(s)
        sent += 1
    assert sent == 200

    # 20 killed sessions: 10 authenticated clients that die halfway through a TVM packet, 10 session
    # processes killed on the device while a client holds them.
    from tvm.rpc import base

    dev = farm.procs[farm.honest]  # type: ignore[attr-defined]
    for i in range(20):
        value = _request(farm)
        h, p, matchkey = value[1]
        if i < 10:
            s = socket.create_connection((h, p), timeout=10)
            handshake(s, TOKEN, matchkey)
            s.sendall(struct.pack("<Q", 4096) + b"\x03\x00\x00\x00" + b"\x00" * 100)  # half a call packet
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, as a crash does
            s.close()
        else:
            sess = connect_device(h, p, matchkey, TOKEN)
            t_end = time.monotonic() + 10
            while not (children := psutil.Process(dev.pid).children()) and time.monotonic() < t_end:
                time.sleep(0.05)
            assert children, "no session process on the device"
            for c in children:
                os.kill(c.pid, signal.SIGKILL)
            with pytest.raises(Exception):
                sess.get_function("runtime.GetDeviceAttr")
            del sess
        assert base.RPC_MAGIC  # tvm.rpc stays importable
    assert dev.poll() is None, farm.log_text(farm.honest)  # type: ignore[attr-defined]
    log = farm.log_text(farm.honest)  # type: ignore[attr-defined]
    assert log.count("ended with signal 9") >= 10 and "Traceback" not in log
    bench_ok(farm, art)  # and a real benchmark still runs


def _request(farm: Farm) -> Any:
    from tvm.rpc import base

    from toolchain.device.session import _tracker_call

    value = _tracker_call(spec(farm, request_timeout_s=30), [base.TrackerCode.REQUEST, KEY, "", 1], 30)
    assert value[0] == base.TrackerCode.SUCCESS
    return value


def test_a_device_killed_mid_run_is_reported_as_dropped_within_seconds(farm: Farm, art: tuple[Cache, Any]) -> None:
    cache, a = art
    job = prepare_job(a, cache, data="fashion-mnist", samples=100, duration_s=5.0)
    killed_at: list[float] = []
    lost_at: list[float] = []

    def on_event(event: str, key: str, addr: str) -> None:
        if event == "start":
            threading.Timer(0.5, lambda: (killed_at.append(time.monotonic()),
                                          farm.kill(farm.doomed))).start()  # type: ignore[attr-defined]
        if event == "lost":
            lost_at.append(time.monotonic())

    with pytest.raises(InfraError, match="dropped") as e:
        bench_many([job], spec(farm, key=DOOMED_KEY, request_timeout_s=60), on_event)
    done = time.monotonic()
    assert killed_at and lost_at, e.value
    assert lost_at[0] - killed_at[0] < 10.0 and done - killed_at[0] < 10.0
    assert farm.doomed in str(e.value) and "no other device" in str(e.value)  # type: ignore[attr-defined]
