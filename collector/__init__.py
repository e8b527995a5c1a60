"""kvmeter collector: merges measures and CloudStack lifecycle events into hourly usage."""
