"""A two-site federation on one device: per-round local-epoch speed, data wait, aggregation cost, test table.

Why: ``local_epoch.py`` times one site alone. In a simulated federation two site processes share the GPU
(and the CPU cores that feed it), and every round adds aggregation over the loopback gloo group and a
validation pass. This runs the product's own path end to end: synthetic BIDS sites -> ``prepare_data`` into
the fp16 cache -> ``FederatedTrainer`` in one process per site (multiprocessing, spawn) -> ``test``.

Sites are started with multiprocessing rather than ``neurofed simulate`` so the script needs no LightningCLI
(jsonargparse) and gets each site's ``trainer.history`` back directly.

    python benchmarks/federated_gpu.py --device cpu --size 48 48 48 --width 0.25      # smoke test
    python benchmarks/federated_gpu.py --device cuda                                   # 160x192x160, bf16, cl
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_epoch import (  # noqa: E402
    GPU_SIZE,
    SiteSpec,
    fmt_pct,
    make_datamodule,
    prepare_site,
    scaled_channels,
)

SITES = (  # scanner-like differences: contrast and age range
    dict(name="siteA", seed=11, contrast=1.0, age_range=(20.0, 86.0)),
    dict(name="siteB", seed=23, contrast=1.3, age_range=(19.0, 80.0)),
)


def site_process(rank: int, port: int, site: str, cfg: dict, queue) -> None:
    """One site: its datamodule over the shared cache, a full FederatedTrainer fit, then the federated test."""
    import logging

    import torch

    from neurofed.federated import FederatedTrainer, Federation
    from neurofed.models import BrainAgeModule

    # The trainer logs one line per round: progress survives in the log even if the run is cut short.
    logging.basicConfig(level=logging.WARNING, format=f"[site {rank}] %(message)s", stream=sys.stdout, force=True)
    logging.getLogger("neurofed.federated").setLevel(logging.INFO)
    logging.getLogger("lightning").setLevel(logging.WARNING)
    if cfg["device"] == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    else:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        dm = make_datamodule(Path(site), Path(cfg["cache"]), cfg["size"], cfg["batch_size"], cfg["num_workers"],
                             resident=cfg["resident"])
        model = BrainAgeModule(channels=scaled_channels(cfg["width"]), channels_last=cfg["channels_last"])
        trainer = FederatedTrainer(
            rounds=cfg["rounds"], local_epochs=1, precision=cfg["precision"], accelerator=cfg["device"],
            compile=cfg["compile"], logger=False, enable_progress_bar=False, default_root_dir=cfg["root"],
            run_name="federated-gpu", federation=Federation(port=port, site_rank=rank, num_sites=2, timeout_s=600),
        )
        t0 = time.perf_counter()
        trainer.fit(model, dm)
        fit_s = time.perf_counter() - t0
        with contextlib.redirect_stdout(io.StringIO()):  # the leader prints the table; the parent prints it once
            rows = trainer.test(model, dm)
        trainer.close()
        peak = torch.cuda.max_memory_allocated() / 2**30 if cfg["device"] == "cuda" else math.nan
        queue.put((rank, dict(history=trainer.history, rows=rows, n_train=len(dm.train_records),
                              name=dm.site_names[0], fit_s=fit_s, peak_gib=peak)))
    except BaseException as exc:
        queue.put((rank, dict(error=f"{type(exc).__name__}: {exc}")))
        raise


def run(args: argparse.Namespace) -> int:
    from neurofed.federated.simulate import free_port
    from neurofed.metrics import format_table

    t0 = time.perf_counter()
    roots = [prepare_site(args.data_dir, SiteSpec(volumes=args.volumes, subjects=args.subjects, size=args.size, **s),
                          args.prep_workers) for s in SITES]
    print(f"data ready in {time.perf_counter() - t0:.1f} s", flush=True)
    if args.prepare_only:
        return 0

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="neurofed-fed-gpu-") as root:
        cfg = dict(vars(args), root=root, cache=str(args.data_dir / "cache"))
        cfg["data_dir"] = str(args.data_dir)
        t0 = time.perf_counter()
        procs = [ctx.Process(target=site_process, args=(k, port, str(r), cfg, queue)) for k, r in enumerate(roots)]
        for p in procs:
            p.start()
        results: dict[int, dict] = {}
        deadline = time.monotonic() + args.timeout
        while len(results) < len(procs) and time.monotonic() < deadline:
            try:
                rank, res = queue.get(timeout=1.0)
                results[rank] = res
            except Exception:  # queue.Empty: check that no site died without reporting
                if any(p.exitcode not in (None, 0) for p in procs) and len(results) < len(procs):
                    time.sleep(1.0)
                    while not queue.empty():
                        rank, res = queue.get()
                        results[rank] = res
                    break
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join()
        wall = time.perf_counter() - t0

    errors = {k: r["error"] for k, r in results.items() if "error" in r}
    missing = [k for k in range(len(procs)) if k not in results]
    if errors or missing:
        for k, e in sorted(errors.items()):
            print(f"site {k} failed: {e}")
        for k in missing:
            print(f"site {k} exited with code {procs[k].exitcode} without reporting")
        return 1

    print(f"\n2 sites on one {args.device} device; SFCN channels {scaled_channels(args.width)}; "
          f"{'x'.join(map(str, args.size))} @ 1 mm; {args.precision}"
          f"{', channels_last' if args.channels_last else ''}{', compile' if args.compile else ''}; batch "
          f"{args.batch_size}; "
          f"{'resident scans' if args.resident else f'{args.num_workers} loader workers per site'}; "
          f"{wall:.0f} s wall (fit + test)")
    header = ["round", "site", "train n", "train s", "vol/s", "data-wait %", "aggregate s", "validate s", "val MAE (pooled)"]
    body = []
    for r in range(args.rounds):
        for k in sorted(results):
            res = results[k]
            if r >= len(res["history"]):
                continue
            h = res["history"][r]
            vols = h.get("train/site/volumes", _trained(res["n_train"], args.batch_size))
            wait = h.get("time/data_wait_s")
            body.append([str(r), res["name"], str(int(vols)), f"{h['time/train_s']:.2f}", f"{vols / h['time/train_s']:.1f}",
                         "n/a" if wait is None else fmt_pct(wait / h["time/train_s"]),
                         f"{h['time/aggregate_s']:.3f}", f"{h['time/validate_s']:.2f}", f"{h['val/pooled/mae']:.2f}"])
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    line = lambda c: " | ".join([c[0].rjust(widths[0]), c[1].ljust(widths[1])] + [x.rjust(w) for x, w in zip(c[2:], widths[2:])])  # noqa: E731
    print(line(header))
    print("-+-".join("-" * w for w in widths))
    for row in body:
        print(line(row))
    if args.device == "cuda":
        print("peak GPU memory per site: " + ", ".join(f"{results[k]['name']} {results[k]['peak_gib']:.2f} GiB" for k in sorted(results)))
    print("round 0 includes warm-up (cuDNN / compile"
          f"{', loading the resident scans' if args.resident else ''}); aggregation time includes waiting for the "
          "slower site")
    print(f"\ntest (best global model, {len(results)} sites)")
    print(format_table(results[0]["rows"]))
    return 0


def _trained(n_train: int, batch_size: int) -> int:
    return (n_train // batch_size) * batch_size if n_train > batch_size else n_train


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 3)[-1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda", help="device both sites train on (default: cuda)")
    p.add_argument("--size", type=int, nargs=3, metavar=("D", "H", "W"), default=list(GPU_SIZE),
                   help="volume shape at 1 mm (default: 160 192 160)")
    p.add_argument("--width", type=float, default=1.0, help="SFCN channel multiplier (default: 1.0, full width)")
    p.add_argument("--rounds", type=int, default=3, help="federated rounds, one local epoch each (default: 3)")
    p.add_argument("--batch-size", type=int, default=8, help="volumes per batch (default: 8)")
    p.add_argument("--precision", choices=["32-true", "bf16-mixed", "16-mixed"], default=None,
                   help="default: bf16-mixed on cuda, 32-true on cpu (CPU bf16 3-D convolutions are very slow)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last_3d (default: on for cuda, off for cpu)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model at each site")
    p.add_argument("--resident", action=argparse.BooleanOptionalAction, default=None,
                   help="hold each site's scans in device memory, as the GPU configs do (default: on for cuda)")
    p.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader workers per site (default: 6 on cuda, two sites share the cores; 0 on cpu)")
    p.add_argument("--volumes", type=int, default=None, help="distinct scans per site (default: 48 on cuda, 8 on cpu)")
    p.add_argument("--subjects", type=int, default=None,
                   help="participants per site; extras hard-link the distinct scans (default: 2 x volumes)")
    p.add_argument("--data-dir", type=Path, default=None,
                   help="synthetic sites and cache, reused when present (default: under $TMPDIR, keyed by size)")
    p.add_argument("--prep-workers", type=int, default=os.cpu_count() or 1,
                   help="processes writing and preprocessing the synthetic scans (default: all cores)")
    p.add_argument("--prepare-only", action="store_true", help="write both sites and fill the cache, then exit")
    p.add_argument("--timeout", type=float, default=1800, help="seconds to wait for the sites (default: 1800)")
    args = p.parse_args(argv)
    gpu = args.device == "cuda"
    args.size = tuple(args.size)
    args.precision = args.precision or ("bf16-mixed" if gpu else "32-true")
    args.channels_last = args.channels_last if args.channels_last is not None else gpu
    args.resident = args.resident if args.resident is not None else gpu
    args.num_workers = args.num_workers if args.num_workers is not None else (6 if gpu else 0)
    args.volumes = args.volumes or (48 if gpu else 8)
    args.subjects = max(args.subjects or 2 * args.volumes, args.volumes)
    if args.data_dir is None:
        tag = f"{'x'.join(map(str, args.size))}-v{args.volumes}-s{args.subjects}"
        args.data_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"neurofed-fed-{tag}"
    return args


if __name__ == "__main__":
    sys.exit(run(parse_args(None)))
