import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Server:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, os.path.join(HERE, "kvcache.py")],
                                     stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid
        self.port = int(self.proc.stdout.readline())

    def get(self, i: int) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port)) as s:
            s.sendall(f"GET {i}\n".encode())
            data = b""
            while len(data) < 4096:
                data += s.recv(4096 - len(data))
            return data

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def kvcache():
    s = Server()
    yield s
    s.stop()
