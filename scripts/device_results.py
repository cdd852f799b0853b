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


def peak_vs_plan(out: Path) -> str:
    """Each runner process's peak (nvidia-smi's used_memory samples, MiB) beside the study's plan."""
    samples, plan = out / "gpu_mem_samples.csv", out / "study" / "plan.json"
    peaks: dict[str, int] = {}
    for fields in (line.split(",") for line in (samples.read_text().splitlines() if samples.exists() else ())):
        if len(fields) == 3 and fields[2].strip().isdigit():
            peaks[fields[1].strip()] = max(peaks.get(fields[1].strip(), 0), int(fields[2]))
    planned = max((e["bytes"] for e in json.loads(plan.read_text())["entries"]), default=0) if plan.exists() else 0
    if not peaks:
        return f"not sampled (plan: {planned / 2**30:.2f} GiB)"
    top = max(peaks.values()) * 2**20
    return (f"largest peak {top / 2**30:.2f} GiB over {len(peaks)} processes; planned {planned / 2**30:.2f} GiB "
            f"({'within' if top <= planned else 'OVER'} the plan)")


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
    rows.append(("peak memory per runner (nvidia-smi) against the plan's largest need", peak_vs_plan(out)))
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
