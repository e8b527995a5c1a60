"""The demo's cloud, not part of the product: a simulated CloudStack host (network namespaces,
libvirt's test driver, an event bus), real QEMU guests for `kvmeter demo --real-vms`, and
`kvmeter demo` itself, which meters either through `kvmeter run --all-in-one`. Tests and
benchmarks build their labs from the same pieces."""
