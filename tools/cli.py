"""The ``graft`` admin CLI: a thin typer layer; each command group lives in its own ``tools.cli_*`` module.

Every ``tools.cli_<name>`` module exposes ``register(app: typer.Typer) -> None`` and adds its commands
(or a sub-typer) to the root app. Logic lives in ``common``/``services``, never here.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="graft",
    help="Graft: inference serving for hybrid deep learning (re-aligned DNN fragments on GPU shares).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Graft: inference serving for hybrid deep learning."""


# Order is the order of ``graft --help``.
COMMAND_MODULES = (
    "tools.cli_models",
    "tools.cli_profile",
    "tools.cli_workload",
    "tools.cli_plan",
    "tools.cli_simulate",
    "tools.cli_bench",
    "tools.cli_up",
    "tools.cli_admin",
    "tools.cli_doctor",
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # the module is not part of this build
                continue
            raise
        module.register(app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
