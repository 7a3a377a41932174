"""``workbench``: open the labeling workbench on a database.

    workbench [--db PATH] [--model embedded|DIR|FILE.gguf|HUB_ID] [--no-4bit] [--device D]
              [--dtype float32|bfloat16|float16]
              [--k 4] [--labeler NAME]

Problems the user can fix (a missing model path, a database that is not ours or
is newer than this program, a second workbench on the same database) are one
line on stderr and exit status 2, before the screen starts.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from rlhf.errors import UserError
from rlhf.locations import default_db_path


def build_parser() -> argparse.ArgumentParser:
    from rlhf.commands.common import Parser, add_db_option, add_model_options, at_least
    from workbench.app import default_labeler

    parser = Parser(
        prog="workbench", description="RLHF workbench: label completions, train, watch the policy drift.")
    add_db_option(parser, note="; created, with the sample prompts, when missing")
    add_model_options(parser)
    parser.add_argument("--k", type=at_least(2, at_most=6), default=4, help="completions shown per prompt, 2 to 6 (default 4)")
    parser.add_argument("--labeler", default=default_labeler(),
                        help="name recorded with every label (default: your user name)")
    parser.add_argument("--repeat-every", type=at_least(0), default=None, metavar="N",
                        help="show an earlier comparison again, unannounced, every N labels: your agreement with "
                             "yourself, beside the reward model's (default 20; 0: never)")
    return parser


def check_model_source(source: str) -> None:
    """Refuse a model argument that cannot work, without loading anything.

    rlhf.models.resolve_model_dir only checks paths for a model directory or a
    hub id, but converts GGUF files (tens of seconds): those are checked here and
    converted later, in the app, with progress on screen."""
    from rlhf import models
    from rlhf.locations import cache_dir

    if source == models.EMBEDDED:
        if not (cache_dir() / "models" / models.EMBEDDED_NAME / "model.safetensors").exists():
            models.embedded_gguf_path()  # raises when the package is missing
        return
    if Path(source).expanduser().suffix == ".gguf" and Path(source).expanduser().is_file():
        return
    models.resolve_model_dir(source)


def main(argv: Sequence[str] | None = None) -> int:
    # Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning.
    # The app's sampling shares the cores with the UI and often with a training
    # job; with spinning threads a batched generate ran 3x slower beside one
    # busy process on two cores (and the tiny test model 70x slower).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    db_path = args.db if args.db is not None else default_db_path()
    try:
        return run(args, db_path)
    except UserError as e:
        print(f"workbench: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, db_path: Path) -> int:
    from rlhf.commands.common import model_options
    from rlhf.locking import AppLock
    from rlhf.models import pick_device
    from rlhf.store import Store
    from workbench.app import WorkbenchApp
    from workbench.model_host import quiet_libraries

    model = model_options(args)
    check_model_source(model.source)
    pick_device(model.device)  # --device cuda without a GPU: one line now, not an error on screen later
    with Store(db_path) as store, AppLock(store.path):
        quiet_libraries()
        app = WorkbenchApp(store, k=args.k, labeler=args.labeler, model=model, idle_gc=True,
                           **({} if args.repeat_every is None else {"repeat_every": args.repeat_every}))
        app.run()
    return app.return_code or 0


if __name__ == "__main__":
    sys.exit(main())
