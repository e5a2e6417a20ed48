"""One module per `fuyou-ray` subcommand; each has `register(subparsers)`.

To add a command: write `fuyou_ray/commands/<name>.py` with a `register` function that adds its parser
and sets `func`, and list the module in `COMMANDS` below.
"""

COMMANDS = [
    "train",
    "inspect",
    "bench",
    "report",
    "status",
    "plan",
    "probe",
    "import_hf",
    "export_hf",
    "generate",
    "evaluate",
    "checkpoint",
]
