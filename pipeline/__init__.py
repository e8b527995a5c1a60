"""kvmeter pipeline: the all-in-one process (agent and collector in one, allinone and handoff);
the demo's simulated cloud and real guests are in kvmeter.pipeline.sim."""
