"""kvmeter: exact, real-time network-usage metering for KVM clouds."""

__version__ = "0.1.0"
