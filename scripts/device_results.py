"""The device check's results as markdown rows for benchmarks/RESULTS.md:

    python scripts/device_results.py OUT

OUT is scripts/device_check.sh's output folder: the card (nvidia_smi.txt), the study's summary
(study/study_summary.json: trials, wall, programs compiled, useful fraction) and the GPU
utilisation samples (nvidia_smi_gpu_samples.csv), each row saying where it came from.
"""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path


def card(out: Path) -> str:
    text = (out / "nvidia_smi.txt").read_text() if (out / "nvidia_smi.txt").exists() else ""
    names = [part.strip() for line in text.splitlines() for part in line.split("|")
             if "NVIDIA" in part and ("H100" in part or "H200" in part)]
    return names[0] if names else "no NVIDIA card seen (a dry run?)"


def utilisation(out: Path) -> str:
    path = out / "nvidia_smi_gpu_samples.csv"
    if not path.exists():
        return "not sampled"
    values = [int(fields[3].split()[0]) for fields in (line.split(",") for line in path.read_text().splitlines())
              if len(fields) == 4 and fields[3].split() and fields[3].split()[0].isdigit()]
    if not values:
        return "no samples"
    busy = [v for v in values if v > 0]
    return (f"mean {sum(values) / len(values):.0f} % over {len(values)} one-second samples of the study; "
            f"{sum(busy) / max(len(busy), 1):.0f} % over the {len(busy)} with any work")


def main(out: Path) -> None:
    rows = [("card", card(out))]
    summary = out / "study" / "study_summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        states = collections.Counter(t["state"].lower() for t in s["trials"])
        runs = s.get("throughput") or s.get("runs") or []
        run = runs[-1] if isinstance(runs, list) and runs else (runs if isinstance(runs, dict) else {})
        rows += [("trials", f"{sum(states.values())} ({', '.join(f'{n} {k}' for k, n in sorted(states.items()))})"),
                 ("study wall", f"{run.get('wall_seconds')} s"),
                 ("programs compiled (persistent-cache hits)",
                  f"{run.get('programs_compiled')} ({run.get('compile_cache_hits')})"),
                 ("useful fraction (training / (n_jobs × wall))", str(run.get("useful_fraction"))),
                 ("best val R@1", str(s.get("best_value")))]
    else:
        rows.append(("study", "no study_summary.json"))
    rows.append(("GPU busy (nvidia-smi utilization.gpu)", utilisation(out)))
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
