"""kvcache: the sample project's server.  A cache of VALUES values of 4 KiB held in memory,
which it keeps rewriting (RATE values a second) the way a busy cache does, and serves over TCP:
"GET n\n" answers the 4 KiB of value n.  It prints its port on stdout once it listens."""

import os
import random
import socket
import sys
import threading
import time

VALUES = int(os.environ.get("KVCACHE_VALUES", "16384"))    # 64 MiB
RATE = float(os.environ.get("KVCACHE_RATE", "2000"))       # values rewritten a second


def main() -> None:
    store = bytearray(VALUES * 4096)
    for i in range(VALUES):
        store[i * 4096:i * 4096 + 16] = i.to_bytes(8, "little") * 2
    lock = threading.Lock()

    def churn() -> None:
        rng = random.Random(1)
        n = 0
        while True:
            i = rng.randrange(VALUES)
            with lock:
                n += 1
                store[i * 4096 + 16:i * 4096 + 24] = n.to_bytes(8, "little")
            time.sleep(1 / RATE)

    threading.Thread(target=churn, daemon=True).start()
    srv = socket.create_server(("127.0.0.1", 0))
    print(srv.getsockname()[1], flush=True)
    while True:
        conn, _ = srv.accept()
        with conn, conn.makefile("rb") as f:
            for line in f:
                i = int(line.split()[1])
                with lock:
                    value = bytes(store[i * 4096:(i + 1) * 4096])
                conn.sendall(value)


if __name__ == "__main__":
    sys.exit(main())
