"""`rlhf export` and `rlhf import`: preference pairs in TRL's format, Parquet,
or a `datasets` folder, and back (plus HH-RLHF transcripts). See rlhf/exchange_import.py and rlhf/exchange_export.py.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rlhf.commands.common import at_least, open_db, say
from rlhf.errors import UserError
from rlhf.text_input import MAX_TEXT_CHARS, error_summary


def register(sub: argparse._SubParsersAction) -> None:

    p = sub.add_parser("export", help="write preference pairs as TRL JSONL, Parquet or a datasets folder "
                                      "(or with --rollouts, PPO's kept rollouts as JSONL)")
    p.add_argument("out", type=Path, help="output file (.jsonl, .parquet) or folder (--format hf)")
    p.add_argument("--format", dest="fmt", choices=("trl", "parquet", "hf"), default=None,
                   help="trl = TRL preference JSONL, parquet, hf = datasets save_to_disk folder "
                        "(default: from OUT's suffix: .jsonl -> trl, .parquet -> parquet, none -> hf)")
    p.add_argument("--conversational", action="store_true",
                   help="message lists ([{'role', 'content'}]) instead of plain text")
    p.add_argument("--since", default=None, help="only pairs recorded since this date (YYYY-MM-DD[THH:MM], UTC)")
    p.add_argument("--policy-version", type=at_least(0), default=None,
                   help="only pairs whose two completions come from this policy version")
    p.add_argument("--labeler", default=None, help="only this labeler's pairs")
    p.add_argument("--source", default=None,
                   help="'label' (your labels), 'import' (every imported file) or an exact source "
                        "such as import:file.jsonl")
    p.add_argument("--no-metadata", dest="metadata", action="store_false",
                   help="only prompt/chosen/rejected, without comparison_id, policy_version, labeler, "
                        "created_at and source columns")
    p.add_argument("--rollouts", action="store_true",
                   help="write every kept PPO rollout instead (JSONL: job, iteration, policy version, prompt, "
                        "completion, score, spread, KL, length, how it ended)")
    p.add_argument("--job", type=at_least(1), default=None, help="with --rollouts: only this PPO job's")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="add preference pairs from a TRL / HH-RLHF JSONL, Parquet or datasets folder",
                       description="Add the pairs of a file, all of them or none: rows that cannot be used "
                                   "(no chosen/rejected, control characters, a text over MAX_TEXT_CHARS = "
                                   f"{MAX_TEXT_CHARS} characters, two answers equal up to whitespace) are "
                                   "skipped and reported; pairs already there are counted, not added twice.")
    p.add_argument("file", type=Path)
    p.add_argument("--label-prompts", action="store_true",
                   help="also put the file's prompts in the labeling queue (imported prompts stay out of it "
                        "otherwise), to sample and label them yourself")
    p.set_defaults(func=cmd_import)


def cmd_export(args: argparse.Namespace) -> int:
    from rlhf.exchange_export import export_pairs, format_for, reimport_warning

    if args.rollouts:
        return export_rollouts(args)

    fmt = args.fmt or format_for(args.out)
    if fmt is None:
        raise UserError(f"cannot tell the format from {args.out.name}: pass --format trl, parquet or hf")
    with open_db(args) as store:
        n = export_pairs(store, args.out, fmt, conversational=args.conversational, since=args.since,
                         policy_version=args.policy_version, labeler=args.labeler, source=args.source,
                         metadata=args.metadata)
    style = "conversational" if args.conversational else "standard"
    print(f"wrote {n} pairs to {args.out} ({fmt}, {style})")
    warning = reimport_warning(args.out)
    if warning:
        say(f"warning: {warning}")
    return 0


def export_rollouts(args: argparse.Namespace) -> int:
    from rlhf.exchange_export import format_for
    from rlhf.rollout_archive import export_rollouts

    if args.fmt not in (None, "trl") or format_for(args.out) != "trl":
        raise UserError(f"rollouts are written as JSONL: name the output like {args.out.stem}.jsonl")
    with open_db(args) as store:
        n = export_rollouts(store, args.out, args.job)
    print(f"wrote {n} rollouts to {args.out} (JSONL)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from rlhf.exchange_import import import_file, import_summary, offer_for_labeling

    with open_db(args) as store:
        report = import_file(store, args.file)
        offered = offer_for_labeling(store, report) if args.label_prompts else None
    for line in error_summary(report.errors):
        say(line)
    print(import_summary(report, args.file))
    if offered is not None:
        print(f"{offered} of its {len(report.prompts)} prompts joined the labeling queue")
    # Exit 1 when the file held nothing usable: a script should notice.
    return 1 if report.errors and not (report.added or report.duplicates) else 0
