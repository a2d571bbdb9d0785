"""A node's model keeper: one long-lived process per SuperNode and run that holds the loaded
model between Flower messages.

Flower's deployment runs every message a node handles in a new, short-lived ClientApp process
(Flower 1.4x, both ``subprocess`` and ``process`` isolation; its architecture keeps the
long-lived part, the SuperNode, free of task code). A fedlora ClientApp process therefore
imports torch, transformers and PEFT, builds its data and loads the model for every message,
seconds each time. With ``keep-model=true`` in a node's config the ClientApp does none of that:
it imports only Flower and this module, and hands the message to the node's keeper, which does
the work with the model it keeps and answers.

- The keeper is started by the first ClientApp of a run that needs it (under a file lock), in
  a session of its own, and serves that one run: ``fedlora-UID/node-SUPERNODE_PID-run-RUN_ID``
  under the temporary directory (mode 0700) holds its Unix socket, its key and its log.
- It stops when the SuperNode that started its first ClientApp is gone, or after ``idle_s``
  without a message (the run's ``round_timeout_s`` plus a minute): a finished run's keeper does
  not hold its model for long.
- What passes is Flower's own protobuf serialisation of the message content and of the node
  state (``flwr.common.serde``), framed by ``multiprocessing.connection``'s byte messages with
  HMAC authentication against the key; nothing is ever pickled.
- The keeper runs the very handlers a ClientApp runs (:func:`fedlora.flower.apps.node_train`),
  on the node's state the ClientApp sent, and sends the state back, which the ClientApp returns
  to Flower; so a node with a keeper computes what one without computes (the simulation engine
  keeps its worker processes too, and is tested equal to in-process).
- A keeper that dies fails the message it was handling, like a ClientApp that raises; the next
  message starts a new keeper.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from multiprocessing import AuthenticationError
from multiprocessing.connection import (
    Client,
    Connection,
    Listener,
    answer_challenge,
    deliver_challenge,
)
from pathlib import Path
from typing import Any

from flwr.app import Context, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedlora.errors import ConfigError, FedloraError
from fedlora.flower import CONFIG_KEY
from fedlora.flower.private import private_folder, read_private, write_private
from fedlora.schema import FlowerConfig

KEEP_MODEL = "keep-model"
"""The node-config key that turns the keeper on."""

START_S = 120.0
"""How long a ClientApp waits for a new keeper to listen."""
MAX_HEADER_BYTES = 1 << 20
"""The most a request's header (its JSON: kind, ids, node and run config) may take; a longer one
is refused unread."""
HANDSHAKE_S = 30.0
"""How long a connection may take to authenticate and send its request; a slower one is dropped.
The keeper answers one connection at a time, so one that connects and stays silent would
otherwise hold it for good."""


def keeps_model(node_config: Mapping[str, Any]) -> bool:
    value = node_config.get(KEEP_MODEL, False)
    if not isinstance(value, bool):
        raise ConfigError(f"node config {KEEP_MODEL} must be true or false, got {value!r}")
    return value


def folder(run_id: int, supernode_pid: int) -> Path:
    """Where the keeper of ``run_id`` on the SuperNode ``supernode_pid`` keeps its socket, key
    and log: created with mode 0700, and refused if it (or its parent) is a symbolic link,
    another user's, or open to others (:func:`fedlora.flower.private.private_folder`, which
    reads the folder itself with ``lstat``, never what a link points to)."""
    root = private_folder(Path(tempfile.gettempdir()) / f"fedlora-{os.getuid()}")
    return private_folder(root / f"node-{supernode_pid}-run-{run_id}")


def stopped_log(where: Path) -> Path:
    """Where the log of the keeper in ``where`` is kept once it has stopped and removed its
    folder (socket, key, lock): beside the folder, in the same owner-only root."""
    return where.parent / f"{where.name}.log"


def _encode(records: RecordDict) -> bytes:
    return bytes(recorddict_to_proto(records).SerializeToString())


def _decode(data: bytes) -> RecordDict:
    proto = ProtoRecordDict()
    proto.ParseFromString(data)
    return recorddict_from_proto(proto)


# --- the ClientApp's side -----------------------------------------------------------------------


def relay(kind: str, content: RecordDict, context: Context) -> RecordDict:
    """Hand a ``query`` or ``train`` message to this node's keeper (starting it if there is
    none) and return its reply content; ``context.state`` becomes the state the keeper left."""
    where = folder(context.run_id, os.getppid())
    header = {
        "kind": kind,
        "run_id": context.run_id,
        "node_id": context.node_id,
        "node_config": dict(context.node_config),
        "run_config": dict(context.run_config),
    }
    conn = _connect(where, context)
    with conn:
        conn.send_bytes(json.dumps(header).encode())
        conn.send_bytes(_encode(content))
        conn.send_bytes(_encode(context.state))
        try:
            status = json.loads(conn.recv_bytes())
            if "error" in status:
                raise FedloraError(f"the node's model keeper failed: {status['error']}")
            reply, state = _decode(conn.recv_bytes()), _decode(conn.recv_bytes())
        except EOFError:
            raise FedloraError(
                f"the node's model keeper died while handling the message; see {where / 'log'}"
            ) from None
    for key in list(context.state):
        del context.state[key]
    for key, record in state.items():
        context.state[key] = record
    return reply


def _connect(where: Path, context: Context) -> Connection:
    """A connection to the keeper in ``where``, started (under a lock) if none answers."""
    with (where / "lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        conn = _try_connect(where)
        if conn is not None:
            return conn
        (where / "socket").unlink(missing_ok=True)  # a dead keeper's
        write_private(where / "key", os.urandom(32))
        argv = [sys.executable, "-m", "fedlora.flower.node", str(where)]
        argv += ["--parent", str(os.getppid()), "--idle-s", str(_idle_s(context))]
        with (where / "log").open("a") as log:
            subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            conn = _try_connect(where)
            if conn is not None:
                return conn
            time.sleep(0.05)
    raise FedloraError(
        f"the node's model keeper did not start within {START_S:.0f} s; see {where / 'log'}"
    )


def _try_connect(where: Path) -> Connection | None:
    if not (where / "socket").exists():
        return None
    try:
        key = read_private(where / "key")
        return Client(str(where / "socket"), family="AF_UNIX", authkey=key)
    except (OSError, AuthenticationError):
        return None  # a keeper that is gone, or one that holds another key


def _idle_s(context: Context) -> float:
    """The run's round time-out plus a minute: no round waits longer for a node. Read from the
    config's JSON by hand: building the config imports the strategies, and so torch."""
    timeout = FlowerConfig.round_timeout_s
    with contextlib.suppress(ValueError, AttributeError):
        flower = json.loads(str(context.run_config.get(CONFIG_KEY))).get("flower", {})
        timeout = float(flower.get("round_timeout_s", timeout))
    return timeout + 60


# --- the keeper ---------------------------------------------------------------------------------

Handler = Callable[[str, RecordDict, Context], RecordDict]


class _Late(Exception):
    """A connection took longer than its deadline (:func:`_deadline`)."""


@contextlib.contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise :class:`_Late` in this (the main) thread if the block takes longer than
    ``seconds``: a blocking read is interrupted by the timer's signal."""

    def late(signum: int, frame: object) -> None:
        raise _Late(f"nothing within {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, late)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def serve(
    where: Path, parent: int, idle_s: float, handle: Handler, handshake_s: float = HANDSHAKE_S
) -> None:
    """Listen on ``where/socket`` and answer one message at a time with ``handle`` until the
    process ``parent`` is gone or ``idle_s`` pass without a message. A connection that does not
    authenticate and send its request within ``handshake_s`` is dropped."""
    key = read_private(where / "key")
    last = [time.monotonic()]

    def stop(own: int, why: str) -> None:
        print(f"keeper stops: {why}", flush=True)
        with contextlib.suppress(OSError):
            if os.lstat(where / "socket").st_ino == own:  # not a newer keeper's: all is ours
                os.replace(where / "log", stopped_log(where))
                shutil.rmtree(where)
        os._exit(0)

    def watch(own: int) -> None:
        while True:
            time.sleep(1.0)
            if not _alive(parent):
                stop(own, "SuperNode gone")
            if time.monotonic() - last[0] > idle_s:
                stop(own, "idle")

    # no authkey here: the handshake happens below, under a deadline (Listener's own has none)
    with Listener(str(where / "socket"), family="AF_UNIX") as listener:
        own = (where / "socket").stat().st_ino
        signal.signal(signal.SIGTERM, lambda signum, frame: stop(own, "terminated"))
        threading.Thread(target=watch, args=(own,), daemon=True).start()
        print(f"keeper {os.getpid()} listening for SuperNode {parent}", flush=True)
        while True:
            try:
                conn = listener.accept()
            except OSError as exc:
                print(f"refused a connection: {exc}", flush=True)
                continue
            with conn:
                try:
                    with _deadline(handshake_s):
                        deliver_challenge(conn, key)
                        answer_challenge(conn, key)
                        request = _request(conn)
                except (OSError, EOFError, AuthenticationError, _Late) as exc:  # a wrong key
                    print(f"refused a connection: {type(exc).__name__}: {exc}", flush=True)
                    continue
                if isinstance(request, Exception):  # bad JSON, protobuf, keys: refused
                    print(f"refused a malformed request: {request}", flush=True)
                    with contextlib.suppress(OSError):
                        conn.send_bytes(json.dumps({"error": "malformed request"}).encode())
                    continue
                _answer(*request, conn, handle)
            last[0] = time.monotonic()


def _request(conn: Connection) -> tuple[str, RecordDict, Context] | Exception:
    """A request's kind, content and context, read part by part; or, for any malformed request
    (a header longer than :data:`MAX_HEADER_BYTES`, bad JSON, protobuf or keys), what was wrong.
    A connection that goes silent raises (the caller's deadline)."""
    try:
        header = json.loads(conn.recv_bytes(MAX_HEADER_BYTES))
        content, state = _decode(conn.recv_bytes()), _decode(conn.recv_bytes())
        context = Context(
            run_id=int(header["run_id"]),
            node_id=int(header["node_id"]),
            node_config=dict(header["node_config"]),
            state=state,
            run_config=dict(header["run_config"]),
        )
        return str(header["kind"]), content, context
    except (_Late, EOFError):
        raise
    except Exception as exc:
        return ValueError(f"{type(exc).__name__}: {exc}")


def _answer(
    kind: str, content: RecordDict, context: Context, conn: Connection, handle: Handler
) -> None:
    try:
        reply = handle(kind, content, context)
    except Exception as exc:
        print(f"the {kind} message failed: {exc!r}", flush=True)
        with contextlib.suppress(OSError):
            conn.send_bytes(json.dumps({"error": f"{type(exc).__name__}: {exc}"}).encode())
        return
    with contextlib.suppress(OSError):  # the ClientApp may have been stopped meanwhile
        conn.send_bytes(b"{}")
        conn.send_bytes(_encode(reply))
        conn.send_bytes(_encode(context.state))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _handle(kind: str, content: RecordDict, context: Context) -> RecordDict:
    from fedlora.flower import apps  # torch, transformers, PEFT: once per keeper

    start = time.perf_counter()
    reply = apps.node_handle(kind, content, context)
    seconds = time.perf_counter() - start
    print(f"{kind} answered in {seconds:.2f} s; models loaded: {apps.model_loads()}", flush=True)
    return reply


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fedlora.flower.node")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--idle-s", type=float, required=True)
    parser.add_argument("--handshake-s", type=float, default=HANDSHAKE_S)
    args = parser.parse_args(argv)
    serve(args.folder, args.parent, args.idle_s, _handle, args.handshake_s)


if __name__ == "__main__":
    main()
