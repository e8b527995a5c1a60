"""kvmeter pipeline: the all-in-one process and the simulated cloud the demo and tests meter."""
