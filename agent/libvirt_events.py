"""libvirt's side of the inventory (kvmeter.agent.inventory): its process-wide event loop, the
domain events that mean a domain may have changed, and its domain states in the agent's words."""

from __future__ import annotations

import threading

import libvirt

# libvirt virDomainState -> DomainInfo.state. "shutdown" is libvirt's "being shut down": still up.
STATES = {
    libvirt.VIR_DOMAIN_NOSTATE: "unknown",
    libvirt.VIR_DOMAIN_RUNNING: "running",
    libvirt.VIR_DOMAIN_BLOCKED: "running",
    libvirt.VIR_DOMAIN_PAUSED: "paused",
    libvirt.VIR_DOMAIN_SHUTDOWN: "running",
    libvirt.VIR_DOMAIN_SHUTOFF: "shutoff",
    libvirt.VIR_DOMAIN_CRASHED: "crashed",
    libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
}

# Events that mean "this domain's XML or state may have changed": refresh that domain.
DOMAIN_EVENTS = ("VIR_DOMAIN_EVENT_ID_LIFECYCLE", "VIR_DOMAIN_EVENT_ID_DEVICE_ADDED",
                  "VIR_DOMAIN_EVENT_ID_DEVICE_REMOVED", "VIR_DOMAIN_EVENT_ID_METADATA_CHANGE")  # fmt: skip

_event_loop_lock = threading.Lock()
_event_loop_started = False


def ensure_event_loop() -> None:
    """libvirt delivers events through one process-wide event loop; start it once, before any
    connection that registers callbacks is opened."""
    global _event_loop_started
    with _event_loop_lock:
        if _event_loop_started:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr by default; we log the ones that matter.
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_started = True


def domain_state(code: int) -> str:
    return STATES.get(code, "unknown")
