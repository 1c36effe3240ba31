"""A plain TCP rendezvous on the coordinator port, run before ``jax.distributed.initialize``.

The runtime's coordination service does not raise when a process of the job never
comes: process 0 aborts inside its ``connect`` (a C++ check failure with a stack
trace, exit 134) once the initialization timeout passes, and so does a process
that cannot reach process 0.  Nothing of that can be caught in Python.  So every
process first meets the others here, with nothing but sockets:

* process 0 listens on the coordinator's port (all interfaces, as the runtime
  does) and waits for a hello line ``jaxroute-join <process_id> <num_processes>``
  from every other process; then it closes the listener, answers ``go`` to each
  and returns, and the runtime's service binds the same port;
* every other process connects, says hello and waits for ``go`` (retrying while
  process 0 is not up yet).

Either side raises ``ValueError`` naming what is missing when ``timeout`` seconds
pass, so an absent process ends the job with one line.  After a successful
rendezvous every process is known to be alive, and the runtime's own
initialization only fails if one dies in the moment between the two.
"""
from __future__ import annotations

import selectors
import socket
import time
from typing import Callable

HELLO = "jaxroute-join"
LOG_EVERY = 10.0  # seconds between progress lines while waiting


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` too) -> (host, port); ValueError for anything else."""
    host, sep, port = address.rpartition(":")
    if not host.strip("[]") or not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"the coordinator address must be host:port, got {address!r}")
    return host.strip("[]"), int(port)


def _listen(port: int) -> socket.socket:
    if socket.has_dualstack_ipv6():
        return socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    return socket.create_server(("", port))


def _names(ids) -> str:
    ids = sorted(ids)
    return ("process " if len(ids) == 1 else "processes ") + ", ".join(map(str, ids))


def gather(address: str, num_processes: int, timeout: float, log: Callable[[str], object] = print) -> None:
    """Process 0: wait until processes 1 .. ``num_processes - 1`` have said hello, then release them."""
    _, port = split_address(address)
    try:
        server = _listen(port)
    except OSError as e:
        raise ValueError(f"cannot listen on the coordinator port {port} ({address}): "
                         f"{e.strerror or e}") from None
    sel = selectors.DefaultSelector()
    sel.register(server, selectors.EVENT_READ)
    joined: dict[int, socket.socket] = {}
    buffers: dict[socket.socket, bytes] = {}
    start = time.monotonic()
    deadline, last_log = start + timeout, start

    def drop(conn):
        sel.unregister(conn)
        buffers.pop(conn, None)
        for pid, c in list(joined.items()):
            if c is conn:
                del joined[pid]
        conn.close()

    try:
        while len(joined) < num_processes - 1:
            now = time.monotonic()
            missing = set(range(1, num_processes)) - set(joined)
            if now >= deadline:
                raise ValueError(f"could not join the distributed job at {address} within {timeout:g} s: "
                                 f"{_names(missing)} of {num_processes} never connected (start them with "
                                 f"--coordinator {address}, or check the address)")
            if now - last_log >= LOG_EVERY:
                log(f"waiting for {_names(missing)} of {num_processes} at {address}; {deadline - now:.0f} s left")
                last_log = now
            for key, _ in sel.select(timeout=min(0.5, max(0.0, deadline - now))):
                sock = key.fileobj
                if sock is server:
                    conn, _ = server.accept()
                    conn.setblocking(False)
                    buffers[conn] = b""
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                try:
                    data = sock.recv(256)
                except OSError:
                    data = b""
                if not data:  # gone (given up, or a port probe)
                    drop(sock)
                    continue
                buffers[sock] += data
                if b"\n" not in buffers[sock]:
                    if len(buffers[sock]) > 256:  # not one of ours
                        drop(sock)
                    continue
                words = buffers[sock].split(b"\n", 1)[0].decode(errors="replace").split()
                buffers[sock] = b""
                if len(words) != 3 or words[0] != HELLO or not (words[1] + words[2]).isdigit():
                    drop(sock)
                    continue
                pid, n = int(words[1]), int(words[2])
                if n != num_processes or not 0 < pid < num_processes:
                    _send(sock, f"refuse process 0 runs a job of {num_processes} processes; this one says "
                                f"process {pid} of {n}")
                    drop(sock)
                    continue
                if pid in joined and joined[pid] is not sock:  # the same process again (restarted): keep the new one
                    drop(joined[pid])
                joined[pid] = sock
        sel.unregister(server)
        server.close()  # free the port for the runtime's service before anyone is released
        for conn in joined.values():
            _send(conn, "go")
    finally:
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()


def _send(conn: socket.socket, line: str) -> None:
    try:
        conn.setblocking(True)
        conn.settimeout(2)
        conn.sendall((line + "\n").encode())
    except OSError:
        pass


def join(address: str, process_id: int, num_processes: int, timeout: float,
         log: Callable[[str], object] = print) -> None:
    """Process ``process_id`` > 0: say hello to process 0 and wait for its ``go`` (retrying until it is up)."""
    host, port = split_address(address)
    start = time.monotonic()
    deadline, last_log = start + timeout, start
    state = "no answer"
    while True:
        now = time.monotonic()
        if now >= deadline:
            if state == "waiting for the others":
                raise ValueError(f"could not join the distributed job at {address} within {timeout:g} s: process 0 "
                                 "answered, but not every process of the job connected")
            raise ValueError(f"the coordinator {address} did not answer within {timeout:g} s ({state}); start "
                             "process 0 first, or check the address")
        if now - last_log >= LOG_EVERY:
            log(f"waiting for the coordinator {address} ({state}); {deadline - now:.0f} s left")
            last_log = now
        try:
            with socket.create_connection((host, port), timeout=min(2.0, max(0.1, deadline - now))) as conn:
                conn.sendall(f"{HELLO} {process_id} {num_processes}\n".encode())
                state = "waiting for the others"
                reply = _read_line(conn, deadline)
        except OSError as e:
            state = e.strerror or type(e).__name__
            time.sleep(0.5)
            continue
        if reply == "go":
            return
        if reply.startswith("refuse "):
            raise ValueError(f"the coordinator {address} refused this process: {reply[len('refuse '):]}")
        time.sleep(0.5)  # closed without an answer (process 0 restarted?): try again


def _read_line(conn: socket.socket, deadline: float) -> str:
    """One line from ``conn``, waiting at most until ``deadline`` ('' when closed or out of time)."""
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return ""
        conn.settimeout(min(1.0, left))
        try:
            data = conn.recv(256)
        except socket.timeout:
            continue
        if not data:
            return ""
        buf += data
    return buf.split(b"\n", 1)[0].decode(errors="replace").strip()
