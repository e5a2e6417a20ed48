"""`fuyou-ray probe [--ssd DIR ...] [--out P.yaml]`: measure this machine into a hardware profile."""

from __future__ import annotations

import argparse
from typing import Any

EPILOG = """examples:
  fuyou-ray probe --ssd /mnt/nvme0/fuyou --ssd /mnt/nvme1/fuyou --out profile.yaml
  fuyou-ray probe --config configs/demo.yaml --out profile.yaml     # the config's ssd.paths
  python -m fuyou_ray probe --ssd /data/probe --out h100.yaml        # where only torch is installed (no Ray)
then: fuyou-ray plan CONFIG --profile profile.yaml
It takes about a minute: GPT-block TFLOPS by shape, host<->device copies, SSD read/write by queue depth
(through the project's O_DIRECT store, files of --ssd-file-mib in each directory, removed afterwards) and
CPU AdamW by thread count, and the host cache's copies between /dev/shm files and ring slots
(--cache-mib per measurement; 0 skips it: plans then assume the default rate)."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "probe",
        help="measure GPU, PCIe, SSD and CPU-optimizer rates into a hardware profile (YAML)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--ssd", action="append", default=[], metavar="DIR", help="an SSD directory (repeatable)")
    p.add_argument("--config", default=None, help="take the SSD directories from this run config's ssd.paths")
    p.add_argument("--out", default="profile.yaml", help="where to write the profile (default: profile.yaml)")
    p.add_argument("--name", default="", help="the profile's name (default: host and device)")
    p.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    p.add_argument("--ssd-file-mib", type=int, default=256, help="MiB per SSD measurement (default 256)")
    p.add_argument(
        "--queue-depths", default="1,4,16,32", help="SSD requests in flight to try (default 1,4,16,32)"
    )
    p.add_argument("--copy-mib", type=int, default=512, help="MiB per host<->device copy (default 512)")
    p.add_argument(
        "--adam-melements", type=int, default=16, help="million elements per AdamW run (default 16)"
    )
    p.add_argument(
        "--cache-mib",
        type=int,
        default=4096,
        help="MiB per host-cache copy measurement, 4 records (default 4096: 1 GiB records, the size of a "
        "13B-width unit's; 0 = skip, the plan assumes a rate)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from fuyou_ray.config import ConfigError, load_config
    from fuyou_ray.probe import ProbeOptions, run_probe

    dirs = list(args.ssd)
    if args.config:
        dirs += [d for d in load_config(args.config).ssd.paths if d not in dirs]
    try:
        depths = tuple(sorted({int(x) for x in args.queue_depths.split(",") if x.strip()}))
    except ValueError:
        raise ConfigError(f"--queue-depths {args.queue_depths!r}: expected integers like 1,4,16,32") from None
    if not depths or min(depths) < 1:
        raise ConfigError("--queue-depths: give one or more integers >= 1")
    for key in ("ssd_file_mib", "copy_mib", "adam_melements"):
        if getattr(args, key) < 1:
            raise ConfigError(f"--{key.replace('_', '-')} must be >= 1")
    if args.cache_mib < 0:
        raise ConfigError("--cache-mib must be >= 0 (0 skips the host-cache measurement)")
    options = ProbeOptions(
        ssd_dirs=tuple(dirs),
        ssd_file_mib=args.ssd_file_mib,
        queue_depths=depths,
        device=args.device,
        copy_mib=args.copy_mib,
        adam_melements=args.adam_melements,
        cache_mib=args.cache_mib,
        name=args.name,
    )
    profile = run_probe(options, log=lambda line: print(line, flush=True))
    profile.save(args.out)
    print(f"wrote {args.out}")
    return 0
