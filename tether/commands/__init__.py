"""Sub-commands of the `tether` command, one module per area.

Each module exposes ``add_parsers(subparsers)``, registering its sub-commands with a
``handler`` default taking the parsed namespace and returning an exit code. Heavy
imports (torch, zmq) happen inside handlers so `tether --help` stays fast.
"""
