"""A TCP relay between network namespaces, for the test bed's control-plane connections.

The bed never gives the host an address inside its namespaces (nor a namespace a route out),
so a process on one side that must reach an API server on the other goes through a relay: a
listener made in one namespace, upstream sockets made in another (a socket keeps the namespace
it was created in). Used both ways: the host reaching a bed cluster's API server
(``kubecluster``) and a bench node reaching the test apiserver on the host's loopback
(``bench.kubeproxy``). Runs on its own thread and event loop; ``close()`` stops it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading

from dataplane.netns import in_netns


class TCPRelay:
    """Listen on ``127.0.0.1:port`` in ``listen_netns``; relay each connection to ``target``,
    dialled from ``dial_netns`` (None: the caller's namespace for either)."""

    def __init__(self, target: tuple[str, int], *, listen_netns: str | None = None,
                 dial_netns: str | None = None, port: int = 0, name: str = "relay") -> None:
        self.target = target
        self.dial_netns = dial_netns
        with in_netns(listen_netns) if listen_netns else contextlib.nullcontext():
            self._listener = socket.create_server(("127.0.0.1", port))
        self.port: int = self._listener.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError(f"{name}: the relay did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._server = await asyncio.start_server(self._handle, sock=self._listener)
        self._ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            await self._server.serve_forever()

    def _upstream_socket(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.target[0] else socket.AF_INET
        with in_netns(self.dial_netns) if self.dial_netns else contextlib.nullcontext():
            sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        return sock

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = self._upstream_socket()
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(upstream, self.target), 10)
            up_reader, up_writer = await asyncio.open_connection(sock=upstream)
        except (OSError, TimeoutError):
            upstream.close()
            writer.close()
            return
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    def close(self) -> None:
        if self._loop.is_closed():
            return

        def stop() -> None:
            self._server.close()
            for task in asyncio.all_tasks(self._loop):
                task.cancel()

        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(stop)
        self._thread.join(10)
        with contextlib.suppress(RuntimeError):
            self._loop.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            dst.close()
