"""Side by side: a static-split run and a vmkv run of the co-location benchmark (the two
summary.json files colocation_client.py wrote for the same traffic).

Draws TTFT CDFs (ttft_cdf.png) and throughput per instance (throughput.png), prints a
table with the ratios the goals are stated in (p99 TTFT of static ÷ vmkv; throughput of
vmkv ÷ static), a Markdown row for benchmarks/RESULTS.md, and one JSON line last.

  python colocation_report.py STATIC/summary.json VMKV/summary.json --out DIR [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import emit


def load(path: Path, mode: str) -> dict:
    summary = json.loads(path.read_text())
    if summary["mode"] != mode:
        raise SystemExit(f"{path} is a {summary['mode']} run, expected {mode}")
    return summary


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def plot(static: dict, vmkv: dict, out: Path) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(matplotlib not installed: no plots)"]
    names = list(vmkv["instances"])
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, name in enumerate([*names, "all"]):
        for summary, style in ((static, "--"), (vmkv, "-")):
            row = summary["all"] if name == "all" else summary["instances"][name]
            values = row["ttft_s"]
            color = "k" if name == "all" else f"C{i}"
            share = [(k + 1) / len(values) for k in range(len(values))]
            ax.step(
                values, share, where="post", linestyle=style, color=color, label=f"{name} {summary['mode']}"
            )
    ax.set_xscale("log")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("share of requests")
    ax.set_title("TTFT: vmkv (solid) vs static equal split (dashed)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "ttft_cdf.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for k, summary in enumerate((static, vmkv)):
        values = [summary["instances"][n]["throughput_tok_s"] for n in names] + [
            summary["all"]["throughput_tok_s"]
        ]
        ax.bar([i + (k - 0.5) * width for i in range(len(values))], values, width, label=summary["mode"])
    ax.set_xticks(range(len(names) + 1), [*names, "all"])
    ax.set_ylabel("output tokens/s")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=120)
    plt.close(fig)
    return [str(out / "ttft_cdf.png"), str(out / "throughput.png")]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("static", type=Path)
    parser.add_argument("vmkv", type=Path)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    static, vmkv = load(args.static, "static"), load(args.vmkv, "vmkv")
    if static["traffic"] != vmkv["traffic"]:
        raise SystemExit("the two runs saw different traffic; compare runs of the same client arguments")
    args.out.mkdir(parents=True, exist_ok=True)
    pictures = plot(static, vmkv, args.out)
    header = f"{'':>8} {'p99 TTFT static':>15} {'vmkv':>8} {'gain':>6} {'tok/s static':>12} {'vmkv':>8}"
    print(f"{header} {'errors s/v':>10}")
    for name in [*vmkv["instances"], "all"]:
        s = static["all"] if name == "all" else static["instances"][name]
        v = vmkv["all"] if name == "all" else vmkv["instances"][name]
        gain = ratio(s["ttft_p99_s"], v["ttft_p99_s"])
        print(
            f"{name:>8} {s['ttft_p99_s'] or 0:>15.3f} {v['ttft_p99_s'] or 0:>8.3f} {gain or 0:>6.2f} "
            f"{s['throughput_tok_s']:>12} {v['throughput_tok_s']:>8} {s['errors']:>5}/{v['errors']}"
        )
    s, v = static["all"], vmkv["all"]
    result = {
        "bench": "colocation", "device": vmkv["device"], "instances": len(vmkv["instances"]),
        "budget_mib": vmkv["budget_bytes"] >> 20, "requests": v["requests"],
        "p99_ttft_static_s": s["ttft_p99_s"], "p99_ttft_vmkv_s": v["ttft_p99_s"],
        "p99_ttft_gain": ratio(s["ttft_p99_s"], v["ttft_p99_s"]),
        "p50_ttft_gain": ratio(s["ttft_p50_s"], v["ttft_p50_s"]),
        "throughput_vmkv_over_static": ratio(v["throughput_tok_s"], s["throughput_tok_s"]),
        "errors_static": s["errors"], "errors_vmkv": v["errors"],
    }  # fmt: skip
    print(f"plots: {', '.join(pictures)}")
    print(
        f"| {result['device']} | {result['instances']} | {result['budget_mib']} MiB | {v['requests']} | "
        f"{s['ttft_p99_s']:.2f} / {v['ttft_p99_s']:.2f} s (×{result['p99_ttft_gain']}) | "
        f"{s['ttft_p50_s']:.2f} / {v['ttft_p50_s']:.2f} s | "
        f"{s['throughput_tok_s']} / {v['throughput_tok_s']} | "
        f"{s['errors']} / {v['errors']} |"
    )
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
