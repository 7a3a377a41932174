"""Command groups of the `rlhf` CLI, one module each; see rlhf/cli.py."""
