"""Test harness: the real parts (broker, PostgreSQL, libvirt test driver, network namespaces)."""
