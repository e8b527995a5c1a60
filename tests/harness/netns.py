"""Network-namespace hosts for tests: the same simulation `kvmeter demo` uses."""

from kvmeter.pipeline.sim.simnet import COUNTERS, Host, Lab, Vm, VmNic, read_counters, sh

__all__ = ["COUNTERS", "Host", "Lab", "Vm", "VmNic", "read_counters", "sh"]
