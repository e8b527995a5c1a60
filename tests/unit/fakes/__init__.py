"""Hand-written fakes for unit tests (libvirt connection, netlink sockets)."""
