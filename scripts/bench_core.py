"""Core benchmark: injection overhead and adapter swap cost on the SD1.5 UNet shape (random init).

Measures, side by side in one run (interleaved repeats; the best of N is the figure, the median is kept too, since
a busy 2-core machine only ever adds time):
- one UNet step (batch 2 = one CFG step) for the base UNet, the injected (processor) path, the fused path, and the
  same adapter's diffusers export loaded by diffusers (peft LoRA layers) and left unfused, the reference for injection;
- one UNet step of a batch of different identities (`--batches`, e.g. 2,8: one per sample, the web UI's and a
  service's case) through the processors' per-sample deltas, against the base at the same batch;
  on a GPU also the base, injected and diffusers steps' kernel counts, GPU busy time and the CPU's time to launch it;
- swapping an identity in and out: hyperdiff's fuse+unfuse and applied() enter+exit, against diffusers'
  load_lora_weights + fuse_lora + unfuse_lora + unload_lora_weights of the same adapter exported to diffusers format;
- file sizes of the native LiDB adapter and its exports.
Runs on the CPU in float32 by default; `--device cuda --dtype float16` measures a GPU (times are taken after the
device has finished: synchronised). Prints a table with ratios and writes JSON.
Usage: python scripts/bench_core.py --out bench/core.json [--latent 64] [--batches 2,8] [--device cuda --dtype float16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")  # before diffusers is imported
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from hyperdiff import Adapter, LayerTable  # noqa: E402
from hyperdiff.core.processors import hyper_lora_processors  # noqa: E402
from hyperdiff.core.random_adapters import random_lidb  # noqa: E402
from hyperdiff.models import tiny_pipeline  # noqa: E402
from hyperdiff.models.configs import build_unet  # noqa: E402

from _bench import checked_out, describe_device, device_and_dtype, positive_int, sync, time_calls, write_json  # noqa: E402


def batch_list(text: str) -> list[int]:
    """'2,8' -> [2, 8]: UNet batch sizes, each a positive integer."""
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(b < 1 for b in sizes):
        raise argparse.ArgumentTypeError(f"must be positive integers separated by commas, got {text!r}")
    return sizes


def launch_profile(step, device: torch.device, repeats: int = 5) -> dict:
    """One step's CUDA kernels, the time they keep the GPU busy (torch.profiler) and the CPU's time to launch them
    (best of `repeats`, from an idle device): a step whose launch time exceeds its busy time is bound by the CPU."""
    from torch.profiler import ProfilerActivity, profile

    launch = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        step()
        launch.append(time.perf_counter() - start)
    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        sync(device)
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return {"kernels": len(kernels), "gpu_busy_s": sum(e.device_time for e in kernels) / 1e6, "cpu_launch_s": min(launch)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/core.json", help="JSON output path")
    parser.add_argument("--latent", type=positive_int, default=32, help="latent side (64 = 512 px images)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="interleaved repeats per measurement")
    parser.add_argument("--swaps", type=positive_int, default=3, help="repeats of each swap path")
    parser.add_argument("--batches", type=batch_list, default=[2],
                        help="UNet batches of different identities for the per-sample rows (default: 2)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: %(default)s)")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float32 on cpu, float16 on a GPU)")
    args = parser.parse_args()
    torch.manual_seed(0)
    device, dtype = device_and_dtype(parser, args.device, args.dtype)
    out = checked_out(parser, args.out)

    print(f"building SD1.5-shaped UNet (random init, {dtype}, {device})...", flush=True)
    unet = build_unet("sd15", device=device, seed=0).to(dtype).eval()
    table = LayerTable.from_unet(unet)
    adapter = random_lidb(table, seed=1)
    adapter.lora_factors()  # compose LiDB once (aux bases are cached), as a loaded adapter would before use
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, args.latent, args.latent, generator=gen).to(device, dtype)
    t = torch.tensor([500, 500], device=device)
    text = torch.randn(2, 77, 768, generator=gen).to(device, dtype)

    def step():
        with torch.no_grad():
            unet(x, t, text)

    with tempfile.TemporaryDirectory() as tmp:
        native = adapter.save(Path(tmp) / "id.safetensors")
        diffusers_file = adapter.export(Path(tmp) / "id.diffusers.safetensors", "diffusers")
        kohya_file = adapter.export(Path(tmp) / "id.kohya.safetensors", "kohya")
        sizes = {k: p.stat().st_size for k, p in (("native", native), ("diffusers", diffusers_file), ("kohya", kohya_file))}
        pipe = tiny_pipeline(seed=0)
        pipe.unet = unet  # diffusers' loader path on the same SD1.5-shaped UNet

        step()  # warm-up
        times = {"base": [], "injected": [], "fused": [], "diffusers_unfused": []}
        for _ in range(args.repeats):  # interleaved so drift hits every path alike
            times["base"] += time_calls(step, 1, device)
            with adapter.applied(unet):
                times["injected"] += time_calls(step, 1, device)
            adapter.fuse(unet)
            times["fused"] += time_calls(step, 1, device)
            adapter.unfuse(unet)
            pipe.load_lora_weights(str(diffusers_file), adapter_name="identity")  # peft LoRA layers, not fused
            times["diffusers_unfused"] += time_calls(step, 1, device)
            pipe.unload_lora_weights()
        step_s = {k: min(v) for k, v in times.items()}
        step_median_s = {k: statistics.median(v) for k, v in times.items()}
        per_sample = {}
        for batch in args.batches:  # a batch of different identities: one delta per sample, one bmm per projection
            identities = [random_lidb(table, seed=10 + i) for i in range(batch)]
            deltas = Adapter.stack(identities, table).to(device, dtype)
            xb, tb, textb = (v[:1].expand(batch, *v.shape[1:]).contiguous() for v in (x, t, text))

            def base_b():
                with torch.no_grad():
                    unet(xb, tb, textb)

            def per_sample_b():
                with torch.no_grad(), hyper_lora_processors(unet, table):
                    unet(xb, tb, textb, cross_attention_kwargs={"hyper_lora": deltas})

            base_b(), per_sample_b()  # warm-up
            runs = {"base": [], "per_sample": []}
            for _ in range(args.repeats):
                runs["base"] += time_calls(base_b, 1, device)
                runs["per_sample"] += time_calls(per_sample_b, 1, device)
            best = {k: min(v) for k, v in runs.items()}
            per_sample[str(batch)] = {"step_s": best, "step_median_s": {k: statistics.median(v) for k, v in runs.items()},
                                      "per_sample_over_base": best["per_sample"] / best["base"]}
            if device.type == "cuda":
                per_sample[str(batch)]["launches"] = {"base": launch_profile(base_b, device),
                                                      "per_sample": launch_profile(per_sample_b, device)}
        launches = {}
        if device.type == "cuda":  # what bounds a step: the GPU's work, or the CPU launching it
            launches["base"] = launch_profile(step, device)
            with adapter.applied(unet):
                launches["injected"] = launch_profile(step, device)
            pipe.load_lora_weights(str(diffusers_file), adapter_name="identity")
            launches["diffusers_unfused"] = launch_profile(step, device)
            pipe.unload_lora_weights()

        def ours_fuse():
            adapter.fuse(unet)
            adapter.unfuse(unet)

        def ours_processors():
            with adapter.applied(unet):
                pass

        def diffusers_swap():
            pipe.load_lora_weights(str(diffusers_file), adapter_name="identity")
            pipe.fuse_lora()
            pipe.unfuse_lora()
            pipe.unload_lora_weights()

        ours_fuse()  # the first fuse copies the base weights once; later swaps reuse the copy
        swap_runs = {
            "hyperdiff_fuse_unfuse": time_calls(ours_fuse, args.swaps, device),
            "hyperdiff_applied_enter_exit": time_calls(ours_processors, args.swaps, device),
            "diffusers_load_fuse_unfuse_unload": time_calls(diffusers_swap, args.swaps, device),
        }
        swap_s = {k: min(v) for k, v in swap_runs.items()}

    result = {
        **describe_device(device),
        "torch": torch.__version__,
        "shape": f"sd15 UNet, {str(dtype).replace('torch.', '')}, random init",
        "latent": args.latent,
        "batch": 2,
        "layers": len(table),
        "adapter_values": adapter.num_values,
        "unet_step_s": step_s,
        "unet_step_median_s": step_median_s,
        "unet_step_launches": launches,
        "injected_over_base": step_s["injected"] / step_s["base"],
        "fused_over_base": step_s["fused"] / step_s["base"],
        "diffusers_unfused_over_base": step_s["diffusers_unfused"] / step_s["base"],
        "per_sample": per_sample,
        "swap_s": swap_s,
        "swap_median_s": {k: statistics.median(v) for k, v in swap_runs.items()},
        "fuse_swap_over_diffusers": swap_s["hyperdiff_fuse_unfuse"] / swap_s["diffusers_load_fuse_unfuse_unload"],
        "applied_swap_over_diffusers": swap_s["hyperdiff_applied_enter_exit"] / swap_s["diffusers_load_fuse_unfuse_unload"],
        "file_bytes": sizes,
    }
    write_json(out, result)

    where = result.get("gpu") or f"{result['threads']} CPU threads"
    print(f"\nSD1.5 UNet step (batch 2, latent {args.latent}x{args.latent}, {result['shape']}, {where}, best of {args.repeats}):")
    for k, v in step_s.items():
        print(f"  {k:<17} {v * 1000:9.1f} ms   {v / step_s['base']:.3f}x base")
    for batch, row in per_sample.items():
        print(f"  batch {batch} of different identities: base {row['step_s']['base'] * 1000:.1f} ms, per-sample deltas "
              f"{row['step_s']['per_sample'] * 1000:.1f} ms   {row['per_sample_over_base']:.3f}x base")
        for k, v in row.get("launches", {}).items():
            print(f"    {k}: {v['kernels']} kernels, GPU busy {v['gpu_busy_s'] * 1000:.1f} ms, launched in "
                  f"{v['cpu_launch_s'] * 1000:.1f} ms")
    print(f"swap one identity in and out (best of {args.swaps}):")
    for k, v in swap_s.items():
        print(f"  {k:<36} {v * 1000:9.1f} ms   {v / swap_s['diffusers_load_fuse_unfuse_unload']:.3f}x diffusers")
    for k, v in launches.items():
        print(f"  {k} step: {v['kernels']} kernels keep the GPU busy {v['gpu_busy_s'] * 1000:.1f} ms of the "
              f"{v['cpu_launch_s'] * 1000:.1f} ms the CPU takes to launch them")
    print(f"files: native LiDB {sizes['native']:,} B, diffusers {sizes['diffusers']:,} B, kohya {sizes['kohya']:,} B")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
