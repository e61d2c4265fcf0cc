"""Memory bound of the combines: a master from many big frames, and a final stack from many aligned frames,
never need all the frames in memory at once. Prints one JSON object: peak RSS of each combine (in its own
process) against the size of its inputs.

    python bench/memory.py --size 4096 --frames 50            # master bias of 50 frames of 4k
    python bench/memory.py --size 4096 --frames 50 --stack 100  # and a final stack of 100 aligned 4k frames
    python bench/memory.py --frames 0 --colour-stack 100        # a final colour stack of 100 aligned 4144x2822
                                                                # colour frames (3 planes, one MASK each)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _child(kind: str, folder: Path, mem_mb: int) -> None:
    sys.path.insert(0, str(REPO))
    paths = sorted(folder.glob("*.fits"))
    t = time.perf_counter()
    if kind == "master":
        from nightshift.service.masters import make_master_bias

        img = make_master_bias(paths, mem_limit_bytes=mem_mb * 2**20)
    else:
        from astropy.io import fits
        from nightshift.service.stack import final_combine

        img = final_combine(paths, header=fits.Header(), mem_limit_bytes=mem_mb * 2**20)
    if kind == "colour":
        assert img.data.shape[0] == 3, img.data.shape
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": round(seconds, 2), "peak_rss_mb": round(peak, 1), "shape": list(img.data.shape)}))


def _run(kind: str, folder: Path, mem_mb: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(folder), "--mem-mb", str(mem_mb)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--frames", type=int, default=50, help="bias frames combined into one master (0: skip)")
    ap.add_argument("--stack", type=int, default=0, help="aligned float32 frames in one final stack (0: skip)")
    ap.add_argument(
        "--colour-stack", type=int, default=0, help="aligned 3-plane colour frames in one final stack (0: skip)"
    )
    ap.add_argument("--colour-size", default="4144x2822", help="width x height of the colour frames")
    ap.add_argument("--mem-mb", type=int, default=512, help="[calibration]/[stacking] mem_limit_mb")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        _child(args.child[0], Path(args.child[1]), args.mem_mb)
        return 0
    sys.path.insert(0, str(REPO))
    import numpy as np
    from astropy.io import fits
    from nightshift.service.fitsio import write_fits_atomic
    from nightshift.service.frame import Image
    from nightshift.service.simulate import SimConfig, plan_night, write_frame

    work = Path(tempfile.mkdtemp(prefix="nightshift-mem-"))
    result: dict = {"size": args.size, "mem_limit_mb": args.mem_mb}
    try:
        if args.frames:
            plan = plan_night(
                SimConfig(
                    size=args.size,
                    n_bias=args.frames,
                    n_dark=0,
                    n_flat=0,
                    n_light=0,
                    dark_exptimes=(),
                    light_exptimes=(),
                    filters=(),
                    dialect="nina",
                )
            )
            bias_dir = work / "bias"
            for f in plan.frames:
                write_frame(plan, f, bias_dir)
            inputs = sum(p.stat().st_size for p in bias_dir.rglob("*.fits"))
            flat_dir = work / "bias-flat"
            flat_dir.mkdir()
            for p in bias_dir.rglob("*.fits"):
                os.replace(p, flat_dir / p.name)
            as_float = args.frames * args.size * args.size * 4 / 2**20
            result["master"] = {
                "frames": args.frames,
                "inputs_mb_on_disk": round(inputs / 2**20, 1),
                "inputs_mb_as_float32": round(as_float, 1),
                **_run("master", flat_dir, args.mem_mb),
            }
            shutil.rmtree(work / "bias", ignore_errors=True)
            shutil.rmtree(flat_dir, ignore_errors=True)
        if args.stack:
            stack_dir = work / "aligned"
            rng = np.random.default_rng(0)
            base = rng.normal(100.0, 10.0, (args.size, args.size)).astype(np.float32)
            for i in range(args.stack):
                noise = rng.normal(0.0, 5.0, base.shape).astype(np.float32)
                write_fits_atomic(stack_dir / f"a{i:04d}.fits", Image(base + noise, fits.Header()))
            as_float = args.stack * args.size * args.size * 4 / 2**20
            result["stack"] = {
                "frames": args.stack,
                "inputs_mb_as_float32": round(as_float, 1),
                **_run("stack", stack_dir, args.mem_mb),
            }
        if args.colour_stack:
            width, height = (int(v) for v in args.colour_size.lower().split("x"))
            colour_dir = work / "aligned-colour"
            rng = np.random.default_rng(1)
            base = rng.normal(100.0, 10.0, (3, height, width)).astype(np.float32)
            mask = np.zeros((height, width), dtype=bool)
            mask[:, :8] = True  # an uncovered strip, as aligned frames have
            for i in range(args.colour_stack):
                noise = rng.normal(0.0, 5.0, base.shape).astype(np.float32)
                write_fits_atomic(colour_dir / f"c{i:04d}.fits", Image(base + noise, fits.Header(), mask=mask))
            as_float = args.colour_stack * 3 * width * height * 4 / 2**20
            result["colour_stack"] = {
                "frames": args.colour_stack,
                "shape": [3, height, width],
                "inputs_mb_as_float32": round(as_float, 1),
                **_run("colour", colour_dir, args.mem_mb),
            }
            shutil.rmtree(colour_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
