"""The ``servesim`` command line."""

from __future__ import annotations

import importlib
import importlib.util

import click

# (module, attribute) of each command; imported lazily so that ``servesim simulate`` never
# pays for torch, and so that a command whose extra is missing fails only when used.
COMMANDS = {
    "simulate": ("experiments.commands.simulate", "simulate"),
    "compare": ("experiments.commands.compare", "compare"),
    "capacity": ("experiments.commands.capacity", "capacity"),
    "run": ("experiments.commands.run", "run"),
    "calibrate": ("experiments.commands.calibrate", "calibrate"),
    "profile": ("experiments.commands.profile", "profile"),
    "validate": ("experiments.commands.validate", "validate"),
    "demo": ("experiments.commands.demo", "demo"),
    "serve": ("experiments.commands.serve", "serve"),
    "bench": ("experiments.commands.bench", "bench"),
    "checkpoint": ("experiments.commands.checkpoint", "checkpoint"),
    "traces": ("experiments.commands.traces", "traces"),
    "models": ("experiments.commands.presets", "models"),
    "hardware": ("experiments.commands.presets", "hardware"),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (module, _) in COMMANDS.items() if importlib.util.find_spec(module) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name]
        try:
            return getattr(importlib.import_module(module), attr)
        except ModuleNotFoundError as e:
            if e.name and e.name.split(".")[0] in ("torch", "transformers", "safetensors"):
                raise click.ClickException(
                    f"'servesim {name}' needs the runtime extra ({e.name} is missing): pip install 'servesim[runtime]'"
                ) from e
            raise


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="servesim")
def main() -> None:
    """servesim: predict how an LLM serving engine behaves under real traffic, and prove it.

    Calibrate once on your device (calibrate), simulate traces offline (simulate, compare,
    capacity), and check the simulator against the live engine (run, validate). `servesim demo`
    does it all on CPU with the tiny model and the embedded Azure conversation trace.
    """
