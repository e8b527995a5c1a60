"""Receive and drop UDP datagrams on port 9 (discard) on every address, until killed."""

import socket

with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.bind(("0.0.0.0", 9))
    while True:
        s.recv(65536)
