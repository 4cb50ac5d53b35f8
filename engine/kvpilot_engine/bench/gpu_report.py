"""One markdown table from a `scripts/gpu-check.sh` run: the `gpu` tests, batch-1 latency per
quantization and offline throughput, each figure beside its target, so a session with a GPU for
a few minutes leaves a record that can be pasted into docs/benchmarks.md as it is.

Reads what the script left in its folder (env.txt, steps.txt, tests.xml, latency.json,
throughput.json); a step that failed or ran out of time shows as such instead of a figure.
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

# The GPU targets (docs/benchmarks.md): share of HBM bandwidth at batch 1 in bf16, speed-ups of
# the weight-only quantizations over bf16, and the offline throughput workload's figures.
BF16_SHARE_OF_PEAK = 0.75
QUANT_SPEEDUP = {"int8": 1.6, "int4": 2.5, "fp8": 1.6}
THROUGHPUT_TOK_S = 10_000.0
THROUGHPUT_SPEEDUP = 5.0
SPEC_EDIT_SPEEDUP = 2.0


def _load(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _verdict(value: float | None, target: float) -> str:
    if value is None:
        return "—"
    return "met" if value >= target else "not met"


def _steps(folder: Path) -> dict[str, tuple[int, int]]:
    """step name -> (exit status, seconds), as the script recorded them."""
    steps = {}
    path = folder / "steps.txt"
    if path.exists():
        for line in path.read_text().splitlines():
            name, rc, secs = line.split()
            steps[name] = (int(rc), int(secs))
    return steps


def _step_note(steps: dict[str, tuple[int, int]], name: str) -> str:
    if name not in steps:
        return "not run"
    rc, secs = steps[name]
    if rc in (124, 137):
        return f"timed out after {secs} s"
    return f"exit {rc}, {secs} s"


def tests_section(folder: Path, steps: dict[str, tuple[int, int]]) -> list[str]:
    lines = ["### `gpu` tests", ""]
    path = folder / "tests.xml"
    if not path.exists():
        return [*lines, f"No results ({_step_note(steps, 'tests')}).", ""]
    suite = ET.parse(path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    assert suite is not None
    lines += ["| test | result |", "| --- | --- |"]
    for case in suite.iter("testcase"):
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        result = "passed"
        for tag in ("failure", "error", "skipped"):
            found = case.find(tag)
            if found is not None:
                message = (found.get("message") or "").splitlines()[:1]
                result = f"{tag}: {message[0][:120] if message else ''}".rstrip(": ")
        lines.append(f"| `{name}` | {result} |")
    return [*lines, "", f"({_step_note(steps, 'tests')})", ""]


def latency_section(folder: Path, steps: dict[str, tuple[int, int]]) -> list[str]:
    lines = ["### Batch-1 decode latency", ""]
    data = _load(folder / "latency.json")
    if data is None:
        return [*lines, f"No figures ({_step_note(steps, 'latency')}).", ""]
    lines += [
        f"{data['model']}, {data['device']}, {data['dtype']}, prompt {data['input_len']}, "
        f"{data['output_len']} tokens x {data['num_iters']} runs, peak "
        f"{data['peak_bandwidth_gbs']} GB/s.",
        "",
        "| quantization | tok/s | ms/token p50 / p90 | weights GiB | GB/s | of peak | speed-up | "
        "target | verdict |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in data["results"]:
        method, share = r["quantization"], r["share_of_peak"]
        if method == "none":
            target, verdict = (
                f">= {BF16_SHARE_OF_PEAK:.0%} of peak",
                _verdict(share, BF16_SHARE_OF_PEAK),
            )
        elif method in QUANT_SPEEDUP:
            target = f">= {QUANT_SPEEDUP[method]}x"
            verdict = _verdict(r["speedup"], QUANT_SPEEDUP[method])
        else:
            target, verdict = "—", "—"
        lines.append(
            f"| {method} | {r['tokens_per_s']:.1f} | {r['decode_ms_p50']:.2f} / "
            f"{r['decode_ms_p90']:.2f} | {r['weight_bytes'] / 2**30:.2f} | "
            f"{r['bandwidth_gbs']:.0f} | {'' if share is None else f'{share:.1%}'} | "
            f"{r['speedup']:.2f}x | {target} | {verdict} |"
        )
    return [*lines, "", f"({_step_note(steps, 'latency')})", ""]


def throughput_section(folder: Path, steps: dict[str, tuple[int, int]]) -> list[str]:
    lines = ["### Offline throughput", ""]
    d = _load(folder / "throughput.json")
    if d is None:
        return [*lines, f"No figures ({_step_note(steps, 'throughput')}).", ""]
    speedup = d.get("speedup")
    lines += [
        f"{d['model']}, {d['device']}, {d['dtype']}, {d['num_prompts']} prompts, "
        f"{d['total_input_tokens']} input and {d['total_output_tokens']} output tokens.",
        "",
        "| engine | seconds | output tok/s | target | verdict |",
        "| --- | --- | --- | --- | --- |",
        f"| kvpilot | {d['kvpilot_seconds']} | {d['kvpilot_output_tokens_per_s']:,.0f} | "
        f">= {THROUGHPUT_TOK_S:,.0f} tok/s | "
        f"{_verdict(d['kvpilot_output_tokens_per_s'], THROUGHPUT_TOK_S)} |",
    ]
    if speedup is not None:
        lines.append(
            f"| transformers (static batches of {d['transformers_batch_size']}) | "
            f"{d['transformers_seconds']} | {d['transformers_output_tokens_per_s']:,.0f} | "
            f"kvpilot >= {THROUGHPUT_SPEEDUP}x | {speedup}x: "
            f"{_verdict(speedup, THROUGHPUT_SPEEDUP)} |"
        )
    return [*lines, "", f"({_step_note(steps, 'throughput')})", ""]


def spec_section(folder: Path, steps: dict[str, tuple[int, int]]) -> list[str]:
    """Speculative against plain decoding (`bench spec`): the opt-in step, shown when it ran."""
    if "spec" not in steps:
        return []
    lines = ["### Speculative decoding", ""]
    rows = _load(folder / "spec.json")
    if not rows:
        return [*lines, f"No figures ({_step_note(steps, 'spec')}).", ""]
    lines += [
        "| workload | in flight | plain tok/s | speculative tok/s | speed-up | accepted | target |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        # At one in flight code editing should double; nowhere may speculation cost throughput.
        target = SPEC_EDIT_SPEEDUP if (r["workload"], r["in_flight"]) == ("edit", 1) else 1.0
        acc = r.get("acceptance")
        lines.append(
            f"| {r['workload']} | {r['in_flight']} | {r['plain_tokens_per_s']:,.1f} | "
            f"{r['spec_tokens_per_s']:,.1f} | {r['speedup']}x | "
            f"{'-' if acc is None else f'{acc:.0%}'} | >= {target}x: "
            f"{_verdict(r['speedup'], target)} |"
        )
    return [*lines, "", f"({_step_note(steps, 'spec')})", ""]


def report(folder: Path) -> str:
    steps = _steps(folder)
    env = (folder / "env.txt").read_text().strip() if (folder / "env.txt").exists() else ""
    lines = ["## GPU check", ""]
    if env:
        lines += ["```", env, "```", ""]
    lines += tests_section(folder, steps)
    lines += latency_section(folder, steps)
    lines += throughput_section(folder, steps)
    lines += spec_section(folder, steps)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    print(report(Path(args[0] if args else "gpu-check")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
