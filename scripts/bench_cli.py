"""CLI benchmark: whole-process seconds of the commands a user types, against `python -c "import torch"`.

Runs, interleaved (`--repeats` rounds; best and median kept, since a busy machine only ever adds time), each as a
fresh process of this interpreter on the embedded SynthFaces default, offline:
- `import torch`: the floor every command that computes pays;
- `hyperdiff --help` and a bad argument (exit 2): they import neither torch nor diffusers;
- `hyperdiff personalize` zero-shot: the hypernet and the base's layer table from its weights' header, no base;
- the same prediction with the base loaded first (`defer_base=False`: what zero-shot cost before it was deferred);
- `hyperdiff personalize --finetune-steps N` (`--finetune_steps`, 0 skips): the base loads for the fine-tune.
Prints the table with ratios to `import torch` and writes JSON.
Usage: python scripts/bench_cli.py --out bench/cli.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import checked_out, positive_int, write_json

ROOT = Path(__file__).resolve().parent.parent
EAGER = (
    "import sys; from hyperdiff.personalize.pipeline import HyperDreamBoothPipeline as P\n"
    "P.from_pretrained(defer_base=False).personalize([sys.argv[1]]).save(sys.argv[2])"
)


def timed(argv: list[str], env: dict, ok: tuple[int, ...] = (0,)) -> float:
    start = time.perf_counter()
    res = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    seconds = time.perf_counter() - start
    if res.returncode not in ok:
        raise SystemExit(f"bench_cli.py: {' '.join(argv[1:4])} ... exited {res.returncode}: {res.stderr.strip()[-300:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/cli.json", help="JSON output path")
    parser.add_argument("--repeats", type=positive_int, default=5, help="interleaved rounds (default: %(default)s)")
    parser.add_argument("--finetune_steps", type=int, default=40, help="steps of the fine-tune row, 0 skips it")
    args = parser.parse_args()
    if args.finetune_steps < 0:
        parser.error(f"--finetune_steps: must be 0 or a positive integer, got {args.finetune_steps}")
    out = checked_out(parser, args.out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    py = sys.executable
    cli = [py, "-m", "hyperdiff.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        ref, adapter = Path(tmp) / "me.png", str(Path(tmp) / "me.safetensors")
        subprocess.run([py, "-c", "import sys; from hyperdiff.synthfaces import Identity, Scene, render; "
                        "render(Identity.from_seed(1_000_000), Scene('green', False, 'neutral')).save(sys.argv[1])",
                        str(ref)], check=True, env=env, cwd=ROOT)
        commands = {
            "import_torch": ([py, "-c", "import torch"], (0,)),
            "help": ([*cli, "--help"], (0,)),
            "bad_argument": ([*cli, "personalize", "--image", str(ref), "--out", adapter, "--seed", "-1"], (2,)),
            "personalize_zero_shot": ([*cli, "personalize", "--image", str(ref), "--out", adapter], (0,)),
            "zero_shot_base_loaded": ([py, "-c", EAGER, str(ref), adapter], (0,)),
        }
        if args.finetune_steps:
            commands["personalize_finetune"] = ([*cli, "personalize", "--image", str(ref), "--out", adapter,
                                                 "--finetune-steps", str(args.finetune_steps)], (0,))
        for argv, ok in commands.values():  # warm the file cache once
            timed(argv, env, ok)
        runs: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(args.repeats):
            for name, (argv, ok) in commands.items():
                runs[name].append(timed(argv, env, ok))
    best = {k: min(v) for k, v in runs.items()}
    floor = best["import_torch"]
    result = {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "base": "synthfaces (embedded)",
        "finetune_steps": args.finetune_steps,
        "seconds": runs,
        "best_s": best,
        "median_s": {k: statistics.median(v) for k, v in runs.items()},
        "over_import_torch": {k: v / floor for k, v in best.items()},
    }
    write_json(out, result)
    print(f"whole processes on the embedded default (best of {args.repeats}, interleaved):")
    for name, seconds in best.items():
        print(f"  {name:<26} {seconds:7.2f} s   {seconds / floor:.2f}x import torch")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
