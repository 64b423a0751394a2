"""Draw bench/burst.png from bench/burst.csv (written by orderflow-bench):
both transports' bursts on one plot.

    python3 crates/bench/plot_burst.py bench/burst.csv bench/burst.png
"""
import csv
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLOURS = {"rabbitmq": "tab:orange", "postgres": "tab:blue"}
BACKLOG = {
    "rabbitmq": "rabbitmq: messages ready on the work queues",
    "postgres": "postgres: jobs rows not dead",
}


def rate(t, counts):
    out = [0.0]
    for i in range(1, len(counts)):
        dt = t[i] - t[i - 1]
        out.append((counts[i] - counts[i - 1]) / dt if dt > 0 else 0.0)
    return out


def main(source: str, target: str) -> None:
    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))
    by_transport = defaultdict(list)
    for row in rows:
        by_transport[row["transport"]].append(row)
    if not rows or any(len(samples) < 2 for samples in by_transport.values()):
        sys.exit(f"{source}: not enough samples to draw")
    rss_columns = [c for c in rows[0] if c.startswith("rss_mib_")]
    orders = max(int(r["accepted"]) for r in rows)

    fig, (ax_count, ax_rate, ax_rss) = plt.subplots(
        3, 1, figsize=(10, 11), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2]}
    )
    fig.suptitle(f"Load levelling: a burst of {orders:,} orders, on each transport")
    styles = ["-", "--", ":", "-."]
    for transport, samples in by_transport.items():
        colour = COLOURS.get(transport)
        t = [float(r["t_s"]) for r in samples]
        finished = [int(r["finished"]) for r in samples]
        ax_count.plot(
            t,
            [int(r["backlog"]) for r in samples],
            label=f"backlog, {BACKLOG.get(transport, transport)}",
            color=colour,
            linewidth=2,
        )
        ax_count.plot(
            t, finished, label=f"{transport}: final status (cumulative)", color=colour, linestyle="--"
        )
        ax_rate.plot(t, rate(t, finished), label=f"{transport}: completed / s", color=colour)
        ax_rate.plot(
            t,
            rate(t, [int(r["accepted"]) for r in samples]),
            label=f"{transport}: accepted / s",
            color=colour,
            linestyle=":",
        )
        for i, column in enumerate(rss_columns):
            ax_rss.plot(
                t,
                [float(r[column]) for r in samples],
                label=f"{transport}: {column.removeprefix('rss_mib_')}",
                color=colour,
                linestyle=styles[i % len(styles)],
                linewidth=1,
            )

    ax_count.set_ylabel("orders")
    ax_count.legend(loc="upper right", fontsize="small")
    ax_count.grid(alpha=0.3)
    ax_rate.set_ylabel("orders per second")
    ax_rate.legend(loc="upper right", fontsize="small")
    ax_rate.grid(alpha=0.3)
    ax_rss.set_ylabel("RSS (MiB)")
    ax_rss.set_xlabel("seconds since the services were ready")
    ax_rss.legend(loc="upper left", fontsize="x-small", ncol=2)
    ax_rss.grid(alpha=0.3)

    fig.tight_layout()
    fig.savefig(target, dpi=100)
    print(f"wrote {target}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
