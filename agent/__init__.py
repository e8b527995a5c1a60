"""kvmeter agent: meters one KVM host's VM interfaces and publishes measure batches."""
