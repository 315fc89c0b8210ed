"""QAD results table (and bar chart) from the reports of `nvfp4 convert` runs.

    .venv/bin/python bench/qad_table.py OUT1 OUT2 ... [--plot docs/qad.png]

One row per output folder: scheme, scale search, loss (QAD = kl, QAT = ce), data, lr, the learned
block scales' lr (0: fixed; reports from before the option have none), steps run,
seconds of the whole command (every stage, the held-out evaluation included: what --qad-budget-minutes
bounds since 2026-12-02; earlier runs evaluated after their budget), and the held-out metrics of PTQ (ModelOpt's rule, what `--qad-steps 0`
writes by default), of QAD's start (the same unless a scale search or GPTQ ran; older reports held only
that row as "PTQ") and of the trained student, with the trained chat KL as a fraction of PTQ's and of
QAD's own start (`--qad-mode`: global, layer or layer+global).
"""

import argparse
import json
from pathlib import Path


def row(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    results, qad = report["accuracy"]["results"], report["qad"]
    trained = "QAT" if "QAT" in results else "QAD"
    start = next((name for name in results if name.startswith("PTQ ")), "PTQ")  # QAD's start, if not ModelOpt's PTQ
    seconds = sum(report["timings_seconds"].values())
    return {
        "run": out.name,
        "scheme": report["scheme"],
        "mode": qad["config"].get("mode", "global"),
        "scales": report["quant_config"]["scale_search"],
        "loss": qad["config"]["loss"],
        "data": Path(qad["config"]["data"]).name,
        "lr": qad["config"]["lr"],
        "scale_lr": qad["config"].get("scale_lr", 0.0),
        "steps": _steps(qad),
        "seconds": seconds,
        "ptq": results["PTQ"],
        "start": results[start],
        "trained": results[trained],
    }


def _steps(qad: dict) -> str:
    """Global steps; layer-local steps (summed over the layers) as `N L`."""
    mode = qad["config"].get("mode", "global")
    layer = f"{qad['layer_local']['steps']} L" if "layer_local" in qad else ""
    return {"global": str(qad["steps"]), "layer": layer}.get(mode, f"{layer} + {qad['steps']}")


def markdown(rows: list[dict]) -> str:
    lines = [
        "| run | scheme | mode | scales | loss | data | lr | scale lr | steps | s total | PTQ chat KL | start chat KL | chat KL | / PTQ | / start | prose KL | chat top-1 | greedy@32 | prose PPL |",
        "|---|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = r["trained"]
        lines.append(
            f"| {r['run']} | {r['scheme']} | {r['mode']} | {r['scales']} | {r['loss']} | {r['data']} | {r['lr']:g} | {r['scale_lr']:g} | {r['steps']} "
            f"| {r['seconds']:.0f} | {r['ptq']['chat_kl']:.4f} | {r['start']['chat_kl']:.4f} | {t['chat_kl']:.4f} | {t['chat_kl'] / r['ptq']['chat_kl']:.2f} "
            f"| {t['chat_kl'] / r['start']['chat_kl']:.2f} "
            f"| {t['prose_kl']:.4f} | {t['chat_top1']:.3f} | {t['greedy_agreement']:.3f} | {t['prose_ppl']:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["run"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 3.6))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [r["ptq"]["chat_kl"] for r in rows], 0.4, label="PTQ", color="#bbbbbb")
    ax.bar([x + 0.2 for x in xs], [r["trained"]["chat_kl"] for r in rows], 0.4, label="after training", color="#76b900")
    ax.set_xticks(list(xs), labels, rotation=30, ha="right")
    ax.set_ylabel("held-out chat KL(teacher || student)")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outs", nargs="+", type=Path)
    parser.add_argument("--plot", type=Path)
    args = parser.parse_args()
    rows = [row(out) for out in args.outs]
    print(markdown(rows))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
