"""The ``vmkv`` command line. Verbs are dispatched from a fixed table; nothing typed here
ever reaches a shell."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from vmkv.vmm_ops import BACKENDS, DriverError, open_vmm, probe


def backend_report() -> list[dict[str, object]]:
    """What each backend can do on this machine, and why a missing one is missing."""
    report: list[dict[str, object]] = []
    for kind in BACKENDS:
        entry: dict[str, object] = {"backend": kind, **probe(kind)}
        if entry["available"]:
            try:
                vmm = open_vmm(kind)
                entry["free_bytes"], entry["total_bytes"] = vmm.mem_info()
                vmm.close()
            except DriverError as error:
                entry["available"], entry["reason"] = False, str(error)
        report.append(entry)
    return report


def _gib(value: object) -> str:
    return f"{value / 2**30:.1f}" if isinstance(value, int) else "-"


def cmd_info(args: argparse.Namespace) -> int:
    report = backend_report()
    if args.json:
        print(json.dumps({"backends": report}))
        return 0
    print(f"{'backend':8} {'available':9} {'devices':7} {'granularity':11} {'free/total GiB':15} reason")
    for e in report:
        memory = f"{_gib(e.get('free_bytes'))}/{_gib(e.get('total_bytes'))}"
        print(
            f"{e['backend']:8} {'yes' if e['available'] else 'no':9} {e['device_count']:<7} "
            f"{e['granularity']:<11} {memory:15} {e['reason']}"
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from vmkv.demo import run_demo

    return run_demo(seconds=args.seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmkv", description="Elastic KV-cache memory for co-located engines"
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    info = verbs.add_parser("info", help="backends on this machine, granularity and device count")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=cmd_info)
    demo = verbs.add_parser("demo", help="two processes grow and shrink KV spaces on the host backend")
    demo.add_argument("--seconds", type=float, default=6.0, help="length of the run")
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
