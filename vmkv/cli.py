"""The ``vmkv`` command line. Verbs are dispatched from a fixed table; nothing typed here
ever reaches a shell."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from vmkv.coordinator import UNLIMITED, Segment, SegmentError, parse_size, user_segments
from vmkv.coordinator.instance import ring
from vmkv.coordinator.metrics import render, serve
from vmkv.coordinator.segment import SHM_DIR, check_segment_name, remove_segment
from vmkv.coordinator.units import format_size
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


def _segments(only: str | None) -> list[Segment]:
    if only is None:
        return [Segment.attach(name) for name in user_segments()]
    try:
        return [Segment.attach(only)]
    except FileNotFoundError:
        raise SystemExit(f"vmkv: no coordinator segment {only!r} (no instance has opened it)") from None


def _listing(only: str | None) -> list[dict[str, Any]]:
    """Every segment with its header and live instances (dead ones are swept first)."""
    out: list[dict[str, Any]] = []
    for segment in _segments(only):
        segment.table.sweep()
        out.append({"segment": segment.name, **segment.table.header(), "instances": segment.table.snapshot()})
    return out


def _print_listing(listing: list[dict[str, Any]]) -> None:
    if not listing:
        print("no vmkv coordinator segments for this user")
    for entry in listing:
        page, budget, instances = entry["page_size"], entry["budget_pages"], entry["instances"]
        leased = sum(i["leased"] for i in instances)
        print(
            f"{entry['segment']}: budget {format_size(budget * page)} ({budget} pages of "
            f"{format_size(page)}), leased {format_size(leased * page)}, "
            f"free {format_size((budget - leased) * page)}"
        )
        print(
            f"  {'name':16} {'engine':8} {'pid':>7} {'leased':>8} {'held':>8} {'mapped':>8} {'reclaim.':>8} "
            f"{'fair':>8} {'min':>8} {'max':>8} {'weight':>6} {'grants':>7} {'misses':>7} {'reclaims':>8}"
        )
        for i in instances:
            sizes = [
                format_size(int(i[k]) * page) if int(i[k]) < UNLIMITED else "-"
                for k in ("leased", "held", "mapped", "reclaimable", "fair_pages", "min_pages", "max_pages")
            ]
            print(
                f"  {i['name']:16.16} {i['engine']:8.8} {i['pid']:>7} "
                + " ".join(f"{v:>8}" for v in sizes)
                + f" {i['weight']:>6} {i['grants']:>7} {i['misses']:>7} {i['reclaims']:>8}"
            )


def cmd_ls(args: argparse.Namespace) -> int:
    if args.prom:
        print(render(lambda: _segments(args.segment)), end="")
    elif args.json:
        print(json.dumps({"segments": _listing(args.segment), "spill_tiers": _spill_listing()}))
    else:
        _print_listing(_listing(args.segment))
        _print_spill_listing(_spill_listing())
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    shown = 0
    while args.iterations == 0 or shown < args.iterations:
        print("\033[H\033[J", end="")  # home + clear: a plain redraw, no curses needed
        print(time.strftime("%H:%M:%S"), "vmkv top (Ctrl-C to quit)")
        _print_listing(_listing(args.segment))
        shown += 1
        if args.iterations == 0 or shown < args.iterations:
            time.sleep(args.interval)
    return 0


def cmd_limit(args: argparse.Namespace) -> int:
    if args.min is None and args.max is None and args.weight is None:
        raise SystemExit("vmkv limit: give at least one of --min, --max, --weight")
    for segment in _segments(args.segment):
        rows = [r for r in segment.table.snapshot() if r["name"] == args.name]
        if not rows:
            continue
        header = segment.table.header()
        page, total = header["page_size"], header["budget_pages"] * header["page_size"]
        new_min, new_max = (
            -1 if text is None else -(-parse_size(text, total) // page) for text in (args.min, args.max)
        )
        slot = segment.table.set_limits(
            args.name, new_min, new_max, -1 if args.weight is None else args.weight
        )
        ring(segment, slot)
        print(f"{args.name}: limits updated in {segment.name}")
        return 0
    print(f"vmkv limit: no live instance named {args.name!r}", file=sys.stderr)
    return 1


def cmd_budget(args: argparse.Namespace) -> int:
    for segment in _segments(args.segment):
        header = segment.table.header()
        page, total = header["page_size"], header["budget_pages"] * header["page_size"]
        if (pages := parse_size(args.size, total) // page) == 0:
            raise ValueError(f"a budget of {args.size} is less than one page ({page} bytes)")
        segment.table.set_budget(pages)
        print(f"{segment.name}: budget set to {args.size}")
    return 0


def _spill_listing() -> list[dict[str, Any]]:
    from vmkv.spill import SegmentError as SpillSegmentError
    from vmkv.spill import tier_stats, user_tiers

    out: list[dict[str, Any]] = []
    for name in user_tiers():
        try:
            out.append({"segment": name, **tier_stats(name)})
        except SpillSegmentError as error:
            out.append({"segment": name, "error": str(error)})
    return out


def _print_spill_listing(tiers: list[dict[str, Any]]) -> None:
    for tier in tiers:
        if "error" in tier:
            print(f"{tier['segment']}: unusable spill tier ({tier['error']})")
            continue
        print(
            f"{tier['segment']}: spill tier, {tier['valid']}/{tier['slot_count']} blocks of "
            f"{format_size(tier['slot_bytes'])}, {tier['attached']} processes, hits {tier['hits']}, "
            f"misses {tier['misses']}, evictions {tier['evictions']}"
        )


def _reset_spill_tiers() -> int:
    """Remove spill tiers no live process has attached; refuse the others."""
    from vmkv.spill.host_tier import remove_tier

    status = 0
    for tier in _spill_listing():
        if tier.get("attached", 0) > 0:
            in_use = f"spill tier in use by {tier['attached']} processes; not removed"
            print(f"{tier['segment']}: {in_use}", file=sys.stderr)
            status = 1
            continue
        remove_tier(tier["segment"])
        print(f"{tier['segment']}: removed")
    return status


def cmd_reset(args: argparse.Namespace) -> int:
    """Remove this user's segments and spill tiers that no live process uses; refuse the
    others."""
    status = 0 if args.segment else _reset_spill_tiers()
    for name in [args.segment] if args.segment else user_segments():
        if not (SHM_DIR / check_segment_name(name).lstrip("/")).is_file():
            print(f"vmkv reset: no coordinator segment {name!r}", file=sys.stderr)
            status = 1
            continue
        try:
            segment = Segment.attach(name)
            segment.table.sweep()
            live = [r for r in segment.table.snapshot() if r["alive"]]
        except SegmentError as error:
            print(f"{name}: unusable ({error}); removing it")
            live = []
        if live:
            pids = ", ".join(f"{r['name']} (pid {r['pid']})" for r in live)
            print(f"{name}: in use by {pids}; not removed", file=sys.stderr)
            status = 1
            continue
        remove_segment(name)
        print(f"{name}: removed")
    return status


def cmd_metrics(args: argparse.Namespace) -> int:
    serve(args.port, lambda: _segments(args.segment), args.address)
    print(f"serving Prometheus metrics on http://{args.address}:{args.port}/metrics (Ctrl-C to stop)")
    while True:
        time.sleep(3600)


def _bounded(kind: type, low: float, high: float, what: str) -> Any:
    """An argparse type: a ``kind`` number in [low, high], else a usage error naming it."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:  # NaN fails too
            raise argparse.ArgumentTypeError(f"{what}, not {text!r}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vmkv", description="Elastic KV-cache memory for co-located engines"
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    info = verbs.add_parser("info", help="backends on this machine, granularity and device count")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=cmd_info)
    ls = verbs.add_parser("ls", help="instances, leases, usage, reclaimable pages and quotas")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.add_argument("--prom", action="store_true", help="print Prometheus text format")
    top = verbs.add_parser("top", help="a live view of `vmkv ls`")
    top.add_argument("--interval", type=_bounded(float, 0.01, 3600, "seconds from 0.01 to 3600"), default=1.0)
    top.add_argument(
        "--iterations",
        type=_bounded(int, 0, 2**31, "a count >= 0"),
        default=0,
        help="stop after N screens (0: run until Ctrl-C)",
    )
    limit = verbs.add_parser("limit", help="change an instance's min, max or weight (applied at once)")
    limit.add_argument("name")
    limit.add_argument("--min", help="guaranteed size: 512M, 4G, 10%% (of the budget)")
    limit.add_argument("--max", help="maximum size: 512M, 4G, 10%% (of the budget)")
    limit.add_argument(
        "--weight",
        type=_bounded(int, 1, 1_000_000, "a weight from 1 to 1000000"),
        help="share weight, 1 to 1000000",
    )
    budget = verbs.add_parser("budget", help="change the device budget: 40G or 80%% (of the current budget)")
    budget.add_argument("size")
    reset = verbs.add_parser("reset", help="remove stale segments (refused while live instances use them)")
    metrics = verbs.add_parser("metrics", help="serve Prometheus metrics over HTTP")
    metrics.add_argument("--port", type=_bounded(int, 1, 65535, "a port from 1 to 65535"), required=True)
    metrics.add_argument("--address", default="127.0.0.1")
    for verb, handler in (
        (ls, cmd_ls),
        (top, cmd_top),
        (limit, cmd_limit),
        (budget, cmd_budget),
        (reset, cmd_reset),
        (metrics, cmd_metrics),
    ):
        verb.add_argument("--segment", help="one segment, e.g. /vmkv-1000-cuda0 (default: all of yours)")
        verb.set_defaults(handler=handler)
    demo = verbs.add_parser("demo", help="two processes grow and shrink KV spaces on the host backend")
    demo.add_argument(
        "--seconds",
        type=_bounded(float, 0.5, 3600, "seconds from 0.5 to 3600"),
        default=6.0,
        help="length of the run",
    )
    demo.set_defaults(handler=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (SegmentError, ValueError) as error:
        print(f"vmkv {args.verb}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
