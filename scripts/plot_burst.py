"""Draw bench/burst.png from bench/burst.csv (written by orderflow-bench).

    python3 scripts/plot_burst.py bench/burst.csv bench/burst.png
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(source: str, target: str) -> None:
    with open(source, newline="") as f:
        rows = list(csv.DictReader(f))
    if len(rows) < 2:
        sys.exit(f"{source}: not enough samples to draw")
    t = [float(r["t_s"]) for r in rows]
    accepted = [int(r["accepted"]) for r in rows]
    finished = [int(r["finished"]) for r in rows]
    depth = [int(r["queue_depth"]) for r in rows]
    rss_columns = [c for c in rows[0] if c.startswith("rss_mib_")]

    def rate(counts):
        out = [0.0]
        for i in range(1, len(counts)):
            dt = t[i] - t[i - 1]
            out.append((counts[i] - counts[i - 1]) / dt if dt > 0 else 0.0)
        return out

    fig, (ax_count, ax_rate, ax_rss) = plt.subplots(
        3, 1, figsize=(10, 10), sharex=True, gridspec_kw={"height_ratios": [3, 2, 2]}
    )
    fig.suptitle(f"Load levelling: a burst of {accepted[-1]:,} orders")

    ax_count.plot(t, accepted, label="accepted by order-api (cumulative)", color="tab:blue")
    ax_count.plot(t, finished, label="final status (cumulative)", color="tab:green")
    ax_count.plot(t, depth, label="orders.standard queue depth", color="tab:red", linewidth=2)
    ax_count.set_ylabel("orders")
    ax_count.legend(loc="upper left")
    ax_count.grid(alpha=0.3)

    ax_rate.plot(t, rate(accepted), label="accepted / s", color="tab:blue")
    ax_rate.plot(t, rate(finished), label="completed / s", color="tab:green")
    ax_rate.set_ylabel("orders per second")
    ax_rate.legend(loc="upper right")
    ax_rate.grid(alpha=0.3)

    for column in rss_columns:
        ax_rss.plot(t, [float(r[column]) for r in rows], label=column.removeprefix("rss_mib_"))
    ax_rss.set_ylabel("RSS (MiB)")
    ax_rss.set_xlabel("seconds since the services were ready")
    ax_rss.legend(loc="upper left", fontsize="small", ncol=2)
    ax_rss.grid(alpha=0.3)

    fig.tight_layout()
    fig.savefig(target, dpi=100)
    print(f"wrote {target}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
