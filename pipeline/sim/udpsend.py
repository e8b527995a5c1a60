"""Send `total` bytes of UDP payload from `src` to `dst` (port 9) in datagrams of `size`."""

import socket
import sys

src, dst, total, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    s.bind((src, 0))
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        s.sendto(b"k" * n, (dst, 9))
        sent += n
