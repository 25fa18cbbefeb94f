"""The GPU suite's figures as text: one line per bench, the targets of bench/README.md beside their figures, and
the markdown table of a run (or of several runs' JSON files, merged: one device call may not hold every step).

    python bench/gpu_report.py gpu_suite.json [more.json ...] > table.md
"""
from __future__ import annotations

import json
import sys

GB = 1000**3 / 2**20  # MiB in a GB, as the targets are written


def _overhead_lines(rows: list[dict]) -> list[str]:
    return [f"{r['family']} {r['shape']} {r['resolution']}² ckpt {'on' if r['checkpointing'] else 'off'}: kiln "
            f"{r['kiln_it_s']:.2f} vs raw {r['raw_it_s']:.2f} it/s ({100 * r['overhead']:+.1f} %), peak "
            f"{r['kiln_peak_mib']:.0f} / raw {r['raw_peak_mib']:.0f} MiB" for r in rows]


def _memory_lines(rows: list[dict]) -> list[str]:
    return [f"{r['family']} {r['shape']} swap {r['blocks_to_swap']}/{r['blocks']}: {r['s_step']:.3f} s/step "
            f"(×{r['ratio']:.2f}), peak {r['peak_mib']:.0f} MiB" for r in rows]


def _native_lines(res: dict) -> list[str]:
    k, n = res["runs"]["kiln"], res["runs"]["native"]
    line = (f"batch {res['args']['batch']}: kiln {k['seconds_per_step']:.4f} vs native {n['seconds_per_step']:.4f} "
            f"s/step (×{res['ratio_kiln_over_native']:.2f})")
    if "vram_peak_steps" in k:
        line += f", peak VRAM {k['vram_peak_steps'] / 2**20:.0f} vs {n['vram_peak_steps'] / 2**20:.0f} MiB"
    else:
        line += f", peak RSS {k['rss_peak_steps'] / 2**20:.0f} vs {n['rss_peak_steps'] / 2**20:.0f} MiB"
    return [line]


def _copy_lines(res: dict) -> list[str]:
    return [f"delegate re-load {res['copy_seconds']} s, {res['host_bytes_per_weight_byte']} host bytes per weight "
            f"byte, step ×{res['step_ratio_copy_vs_in_place']}"]


LINES = {"train_overhead": _overhead_lines, "memory": _memory_lines, "compare_native": _native_lines,
         "private_copy_cost": _copy_lines}


def bench_summary(figures: dict) -> str:
    """One line per bench output (figures: {command label: its JSON}); a missing output says so."""
    lines = []
    for label, res in figures.items():
        kind = label.split("-", 1)[0]
        lines += [f"{label}: no result"] if res is None else LINES[kind](res)
    return "; ".join(lines)


def targets(step: dict) -> list[dict]:
    """bench/README.md's targets for a GPU run at real shapes: [{target, figure, met}]."""
    out = []

    def add(target, figure, met):
        out.append({"step": step["step"], "comfyui": step["comfyui"], "target": target, "figure": figure,
                    "met": bool(met)})

    for label, res in (step.get("figures") or {}).items():
        if not res or not isinstance(res, (list, dict)):
            continue
        if label.startswith("train_overhead"):
            for r in (x for x in res if x["shape"] == "real"):
                ck = "on" if r["checkpointing"] else "off"
                add(f"{r['family']} ckpt {ck}: overhead ≤ 10 %", f"{100 * r['overhead']:+.1f} %", r["overhead"] <= 0.10)
                if r["family"] == "sdxl" and not r["checkpointing"]:
                    add("SDXL 1024² bs1 r32 bf16, no ckpt: ≥ 3.3 it/s", f"{r['kiln_it_s']:.2f} it/s", r["kiln_it_s"] >= 3.3)
                if r["family"] == "sdxl" and r["checkpointing"]:
                    add("SDXL with ckpt: peak ≤ 8 GB", f"{r['kiln_peak_mib'] / GB:.2f} GB", r["kiln_peak_mib"] <= 8 * GB)
        elif label.startswith("memory"):
            for r in (x for x in res if x["shape"] == "real"):
                if r["family"] == "sd35l" and r["blocks_to_swap"] == r["blocks"]:
                    add("SD3.5-Large LoRA 1024², every block swapped: peak < 12 GB", f"{r['peak_mib'] / GB:.2f} GB",
                        r["peak_mib"] < 12 * GB)
                if r["blocks_to_swap"] and r["ratio"] == r["ratio"]:  # NaN: N = 0 did not fit
                    add(f"{r['family']} {r['params_m']:.0f}M swap {r['blocks_to_swap']}: s/step ≤ 1.5× N = 0",
                        f"×{r['ratio']:.2f}", r["ratio"] <= 1.5)
        elif label.startswith("compare_native") and res["info"].get("shape") == "real":
            add(f"SD1 512² batch {res['args']['batch']}: kiln/native s/step ≤ 0.6",
                f"{res['ratio_kiln_over_native']:.3f}", res["ratio_kiln_over_native"] <= 0.6)
    return out


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(*results: dict) -> str:
    """The table of one run, or of several runs merged (each step as its latest run reported it)."""
    env = results[-1]["environment"]
    steps: dict[tuple, dict] = {}
    for r in results:
        for s in r["steps"]:
            if s["status"] != "not_run" or (s["step"], s["comfyui"]) not in steps:
                steps[(s["step"], s["comfyui"])] = s
    gpu = env.get("gpu") or "none (CPU)"
    if env.get("gpu_memory_mib"):
        gpu += f" ({env['gpu_memory_mib']} MiB)"
    runs = ", ".join(f"{r['started']}: {r.get('seconds', '?')} s of {r['budget_s']:.0f}" for r in results)
    lines = [f"# Kiln GPU suite{' (dry run, CPU)' if any(r['dry_run'] for r in results) else ''}", "",
             "| | |", "|---|---|",
             f"| GPU | {_cell(gpu)}, driver {env.get('driver') or '-'} |",
             f"| torch | {env.get('torch')} (CUDA {env.get('cuda_runtime') or '-'}), Python {env.get('python')} |",
             f"| ComfyUI | {', '.join(env.get('comfyui', {}))} |",
             f"| Kiln | commit {env.get('kiln_commit') or '-'} |",
             f"| runs | {runs} |",
             "", "| step | ComfyUI | status | s (budget) | result |", "|---|---|---|---|---|"]
    for s in steps.values():
        lines.append(f"| {s['step']} | {s['comfyui']} | {s['status']} | {s.get('seconds', '-')} ({s['budget_s']}) | "
                     f"{_cell(s.get('summary', ''))} |")
    checks = [t for s in steps.values() for t in s.get("targets", [])]
    if checks:
        lines += ["", "| target | ComfyUI | figure | met |", "|---|---|---|---|"]
        lines += [f"| {_cell(t['target'])} | {t['comfyui']} | {t['figure']} | {'yes' if t['met'] else 'NO'} |"
                  for t in checks]
    again = [f"{s['step']}@{s['comfyui']}" for s in steps.values() if s["status"] != "ok"]
    if again:
        lines += ["", f"Not passed: `bash bench/gpu_suite.sh --only {','.join(again)}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(*(json.load(open(p)) for p in sys.argv[1:])), end="")
