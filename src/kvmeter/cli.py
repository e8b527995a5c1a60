"""The `kvmeter` command: one entry point, subcommands loaded on first use.

Subcommands are imported lazily so that `kvmeter agent` on a KVM host never imports
the collector (which needs a newer Python and other libraries).
"""

from __future__ import annotations

import importlib
import sys

import click

from kvmeter import __version__

# name -> (module, attribute, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "agent": ("kvmeter.agent.cli", "agent", "Meter this KVM host's VM interfaces and publish to Kafka."),
    "collector": ("kvmeter.collector.cli", "collector", "Consume measures and lifecycle events into usage."),
    "ingest": ("kvmeter.collector.cli", "ingest", "Apply event and measure files to a usage store."),
    "usage": ("kvmeter.collector.cli", "usage", "Report usage records from a store."),
    "costs": ("kvmeter.collector.cli_costs", "costs", "Costs per account this month, and projected."),
    "reconcile": (
        "kvmeter.collector.cli_reconcile",
        "reconcile",
        "One pass against CloudStack's API (--dry-run).",
    ),
    "corrections": ("kvmeter.collector.cli_reconcile", "corrections", "List what reconciliation corrected."),
    "credentials": (
        "kvmeter.collector.cli_credentials",
        "credentials",
        "Mint, list and revoke the API's credentials.",
    ),
    "credits": (
        "kvmeter.collector.cli_credits",
        "credits",
        "Add and list credits (balance = credits - costs).",
    ),
    "dead-letters": (
        "kvmeter.collector.cli_dead_letters",
        "dead_letters",
        "List, show and re-drive what the collector could not use.",
    ),
    "prune": (
        "kvmeter.collector.cli_prune",
        "prune",
        "Delete what the retention policy no longer keeps (--dry-run).",
    ),
    "rebuild": (
        "kvmeter.collector.cli_rebuild",
        "rebuild",
        "Replay the topics and stored events into a new store; diff it with the live one.",
    ),
    "run": ("kvmeter.pipeline.allinone", "run", "Run agent and collector in one process (all-in-one)."),
    "demo": ("kvmeter.pipeline.sim.demo", "demo", "Build a small simulated cloud and meter it."),
}


# The package that brings each part: a host has the agent's or the collector's, or both.
PACKAGES = {"kvmeter.agent": "kvmeter-agent", "kvmeter.collector": "kvmeter-collector"}


def not_installed(cmd_name: str, exc: ModuleNotFoundError) -> str:
    """What to tell the operator when a subcommand's code or one of its libraries is missing."""
    missing = exc.name or str(exc)
    for part, package in PACKAGES.items():
        if missing == part or missing.startswith(part + "."):
            return (
                f"kvmeter {cmd_name}: {part} is not installed for {sys.executable}; "
                f"it comes with the package {package}"
            )
    return f"kvmeter {cmd_name}: the Python module {missing} is not installed for {sys.executable}"


class LazyGroup(click.Group):
    """A click group whose subcommands are imported only when invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        spec = SUBCOMMANDS.get(cmd_name)
        if spec is None:
            return None
        module_name, attr, _ = spec
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # An agent-only host runs `kvmeter usage`: a sentence, not a traceback.
            raise click.ClickException(not_installed(cmd_name, exc)) from None
        command = getattr(module, attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{module_name}.{attr} is not a click command")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # List help without importing every subcommand's module.
        rows = [(name, SUBCOMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="kvmeter")
def main() -> None:
    """kvmeter: every byte a VM moved, billed exactly once, seconds later."""
