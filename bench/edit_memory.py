"""One /edit's references: peak memory and CPU of preparing 16 images of 40 MP each.

    python bench/edit_memory.py           # 16 references: PNG, JPEG and 50 MP photos
    python bench/edit_memory.py --quick   # 4 references, PNG only (~20 s)

The references are what an outside review sent: 7744x5164 (40.0 MP) images of one flat
colour, so they are tiny on the wire (an RGBA PNG is ~160 KB, a JPEG ~610 KB) and huge
decoded. The full run adds ordinary use: sixteen photo-like 8160x6144 (50.1 MP) JPEGs of
~4 MB (blurred noise with grain; a phone's full-resolution mode). Each reference is a
separate bytes object, as if downloaded one by one.

Every figure comes from a fresh `python` process that loads the images from a file, imports
what it needs, records its RSS (the baseline), resets the peak mark (/proc/self/clear_refs),
makes the one call, and reports its peak RSS (VmHWM) minus the baseline, the process CPU time
(user + sys, all threads) and the wall time of the call:

  ours      `bot.images.prepare_references(images, max_count=16, max_bytes=20 MB)`: the
            provider's default limits (max edge 4096), with the default pixel budget
            (`DRAWBRIDGE_MAX_JOB_PIXELS`, 832 MP);
  baseline  the code before this change, reproduced here: every reference submitted at once
            to the default thread pool (`asyncio.gather` of `asyncio.to_thread`), each one
            decoded whole, converted (`convert` copies even an RGB image; RGBA is checked
            for opacity and converted again), resized with Lanczos to the max edge, encoded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path

from _common import MB, REPO, machine, peak_rss_bytes, reset_peak_rss, rss_bytes, table, verdict

WIDTH, HEIGHT = 7744, 5164
PHOTO_WIDTH, PHOTO_HEIGHT = 8160, 6144
MAX_EDGE = 4096
MAX_BYTES = 20 * MB
MAX_JOB_PIXELS = 832_000_000  # the default of DRAWBRIDGE_MAX_JOB_PIXELS
GOAL_MB = 300.0


# --- the images ---


def make_image(kind: str) -> bytes:
    """A 40 MP flat-colour opaque RGBA PNG or RGB JPEG, or a 50 MP photo-like JPEG."""
    import random

    from PIL import Image, ImageFilter

    buf = BytesIO()
    if kind == "PNG":
        Image.new("RGBA", (WIDTH, HEIGHT), (200, 120, 40, 255)).save(buf, "PNG")
    elif kind == "JPEG":
        Image.new("RGB", (WIDTH, HEIGHT), (200, 120, 40)).save(buf, "JPEG", quality=90)
    else:
        # Soft shapes (blurred noise, upscaled) and fine grain: entropy like a real photo's.
        rng = random.Random(3)
        w, h = PHOTO_WIDTH, PHOTO_HEIGHT
        small = Image.frombytes("RGB", (w // 8, h // 8), rng.randbytes(w // 8 * (h // 8) * 3))
        img = small.filter(ImageFilter.GaussianBlur(2)).resize((w, h), Image.Resampling.BICUBIC)
        grain = Image.frombytes("L", (w, h), rng.randbytes(w * h))
        grain = grain.point(lambda v: 128 + (v - 128) // 12)
        img = Image.merge("RGB", [Image.blend(band, grain, 0.25) for band in img.split()])
        img.save(buf, "JPEG", quality=88)
    return buf.getvalue()


# --- the child process: one measured call ---


def old_prepare(data: bytes) -> bytes:
    """What `_prepare_reference_sync` did for an image over the max edge, before the change."""
    from PIL import Image

    img = Image.open(BytesIO(data), formats=("PNG", "JPEG", "WEBP", "GIF"))
    img.load()
    has_alpha = "A" in img.getbands() or "transparency" in img.info
    out = img.convert("RGBA") if has_alpha else img.convert("RGB")
    if has_alpha and out.getchannel("A").getextrema() == (255, 255):
        out = out.convert("RGB")
    scale = MAX_EDGE / max(out.size)
    if scale < 1:
        size = (max(1, round(out.width * scale)), max(1, round(out.height * scale)))
        out = out.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    buf = BytesIO()
    if out.mode == "RGBA":
        out.save(buf, "PNG", compress_level=6)
    else:
        out.save(buf, "JPEG", quality=90, optimize=True)
    return buf.getvalue()


async def run_old(images: list[bytes]) -> list[bytes]:
    return list(await asyncio.gather(*(asyncio.to_thread(old_prepare, d) for d in images)))


async def run_ours(images: list[bytes]) -> list[bytes]:
    from bot.images import prepare_references

    refs = await prepare_references(
        images,
        max_count=16,
        max_bytes=MAX_BYTES,
        max_edge=MAX_EDGE,
        max_total_pixels=MAX_JOB_PIXELS,
    )
    return [r.data for r in refs]


def child(which: str, path: Path, count: int) -> None:
    sys.path.insert(0, str(REPO))
    import PIL.Image  # noqa: F401  (imports are part of the baseline, not of the call)

    import bot.images  # noqa: F401

    raw = path.read_bytes()
    images = [bytes(bytearray(raw)) for _ in range(count)]
    run = run_ours if which == "ours" else run_old
    asyncio.run(asyncio.sleep(0))  # the event loop machinery, also part of the baseline
    baseline = rss_bytes()
    if not reset_peak_rss():
        raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs): Linux only")
    cpu, wall = time.process_time(), time.perf_counter()
    out = asyncio.run(run(images))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    peak = peak_rss_bytes()
    print(
        json.dumps(
            {
                "baseline_mb": baseline / MB,
                "peak_mb": (peak - baseline) / MB,
                "cpu_s": cpu,
                "wall_s": wall,
                "out_kb": sum(len(o) for o in out) / 1024 / len(out),
            }
        )
    )


# --- the parent: images, processes, table ---


def measure(which: str, path: Path, count: int) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, __file__, "--child", which, str(path), "--count", str(count)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"{which} child failed:\n{done.stderr}")
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 references, PNG only")
    parser.add_argument("--count", type=int, help="references per /edit (16; 4 with --quick)")
    parser.add_argument("--child", nargs=2, metavar=("WHICH", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    count = args.count or (4 if args.quick else 16)
    if args.child:
        child(args.child[0], Path(args.child[1]), count)
        return 0

    kinds = ["PNG"] if args.quick else ["PNG", "JPEG", "photo"]
    print(machine())
    print(
        f"{count} references of {WIDTH}x{HEIGHT} ({WIDTH * HEIGHT / 1e6:.1f} MP) each; photos "
        f"{PHOTO_WIDTH}x{PHOTO_HEIGHT} ({PHOTO_WIDTH * PHOTO_HEIGHT / 1e6:.1f} MP)"
    )
    rows: list[list[object]] = []
    verdicts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="drawbridge-bench-") as tmp:
        for fmt in kinds:
            path = Path(tmp) / f"ref-{fmt.lower()}"
            path.write_bytes(make_image(fmt))
            size_kb = path.stat().st_size / 1024
            old = measure("old", path, count)
            ours = measure("ours", path, count)
            for name, r in (("baseline (all at once)", old), ("ours (one at a time)", ours)):
                rows.append(
                    [
                        f"{fmt} {size_kb:.0f} KB  {name}",
                        f"{r['baseline_mb']:.0f}",
                        f"{r['peak_mb']:.0f}",
                        f"{r['cpu_s']:.1f}",
                        f"{r['wall_s']:.1f}",
                        f"{r['out_kb']:.0f}",
                        f"{r['peak_mb'] / old['peak_mb']:.2f}" if r is ours else "-",
                        f"{r['cpu_s'] / old['cpu_s']:.2f}" if r is ours else "-",
                    ]
                )
            verdicts.append(
                f"{fmt}: ours {ours['peak_mb']:.0f} MB above baseline, "
                f"{ours['peak_mb'] / old['peak_mb']:.2f} x the old code "
                f"(goal <= {GOAL_MB:.0f} MB: {verdict(ours['peak_mb'], GOAL_MB)})"
            )
    headers = [
        "references",
        "baseline RSS MB",
        "peak above MB",
        "CPU s",
        "wall s",
        "KB/ref out",
        "memory /old",
        "CPU /old",
    ]
    print(table(headers, rows))
    print()
    print("\n".join(verdicts))
    return 0 if all(v.endswith(": ok)") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
