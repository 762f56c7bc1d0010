"""Capacity per GPU: the CPU-seconds per image of decode and of the RLE post-process, through the
job's own functions, and from them the CPUs per GPU that keep a GPU segmenting at 30 images/s
(an A10G) and at 100 images/s (an H100/H200) busy, checked against the node types of
`cluster.yaml` and `deploy/kuberay/`.

    .venv/bin/python benchmarks/capacity.py [--small 200] [--large 16] [--post 24] [--rounds 2]
        [--ray-images 1200]

In one run, single-threaded as a Ray task of one CPU runs them (Ray sets `OMP_NUM_THREADS` to a
task's CPUs: torch runs on one thread), CPU time by `time.process_time()`:
(a) Decode: `pipeline.segment.decode.decode_batch` over JPEGs (quality 90) written from
    `benchmarks/photos.py`'s photos, in batches of the job's default `--batch-size`, to the
    default preset's input size (r50-fpn-v2: `min_size` 800, `max_size` 1333): 800x600 photos
    (smaller than the input: they travel as decoded), 4000x3000 ones (shrunk to 800x1066 on the
    task), and 4000x3000 ones stored with EXIF orientation 6, as a phone stores a portrait (turned
    to 3000x4000 first). The 4000x3000 photos are crops of scikit-image's photos enlarged several
    times, smoother than a camera's; `--grain` adds sensor-like noise so that their files weigh
    what a phone's 12-megapixel JPEGs do (3.3 MB at the default 8).
(b) Post-process: `pipeline.segment.postprocess.finish_batch` (the masks' RLE at the displayed
    size by `mrcnn.rle.masks_to_rle`, the rows, a zstd Parquet file committed to a local folder)
    on batches of `--post` rows shaped as the inference actor returns them, at 10, 50 and 100
    detections per image, for 800x600 and 4000x3000 displayed images: the actor's boxes are in
    pixels of the displayed image, and the masks are encoded at that size. Detections as in
    `benchmarks/mask_postprocess.py` (realistic boxes: side 2-60 % of the short side).
(c) Ray Data's own CPU per image (`--ray-images`; 0 skips it): the job's stages on a local Ray of
    3 CPUs (decode tasks, an actor pool of one stand-in actor that returns 50 detections per
    image instead of running a model, `finish_batch` tasks) over the 800x600 photos, run over a
    quarter of `--ray-images` and over all of them; the CPU time of this process and every
    process it started (Ray's GCS, raylet, workers: read from /proc), less Ray's idle CPU over
    the same time; the difference of the two runs per image, less the decode of (a) and the
    post-process of the stand-in's detections measured as in (b). That figure is added to every
    case below.
Each figure of (a) and (b) is the best of `--rounds` rounds. Then: CPUs per GPU = images/s x
(decode + post-process + Ray Data per image) + the inference actor's own CPU, for every case at
30 and 100 images/s, and how many images/s the CPUs of each node type feed. The last line is the
headline: the CPUs per GPU of the easiest and the worst case at 30 and at 100 images/s.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from mask_postprocess import BOX_SIDES, make_detections  # noqa: E402
from photos import photos  # noqa: E402
from PIL import Image  # noqa: E402
from proc_cpu import processes  # noqa: E402

from jobs.cli import OneLineParser, bounded  # noqa: E402
from mrcnn.categories import Category  # noqa: E402
from mrcnn.presets import R50_FPN_V2  # noqa: E402
from pipeline.segment.decode import decode_batch, shrink_to_model_size  # noqa: E402
from pipeline.segment.job import SegmentConfig  # noqa: E402
from pipeline.segment.postprocess import finish_batch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RATES = (30, 100)  # images/s of one GPU: an A10G, an H100/H200 (BENCHMARKS.md: ~100 on an H200)
DETECTIONS = (10, 50, 100)
DISPLAYED = {"800x600": (600, 800), "4000x3000": (3000, 4000)}
# A COCO-sized label set: the names go into every row.
CATEGORIES = tuple(Category(i, f"category-{i}") for i in range(1, 81))
# The inference actor of a GPU asks for one CPU (`pipeline.segment.actor_sizing.actor_cpus`).
ACTOR_CPUS = 1.0
# vCPUs and GPUs of the AWS instance types that cluster.yaml and README name (AWS's spec sheets).
INSTANCES = {
    "g5.xlarge": (4, 1, "A10G"), "g5.2xlarge": (8, 1, "A10G"), "g5.4xlarge": (16, 1, "A10G"),
    "g5.8xlarge": (32, 1, "A10G"), "g5.12xlarge": (48, 4, "A10G"), "g6e.xlarge": (4, 1, "L40S"),
    "g6e.2xlarge": (8, 1, "L40S"), "g6e.4xlarge": (16, 1, "L40S"), "p4d.24xlarge": (96, 8, "A100"),
    "p5.48xlarge": (192, 8, "H100"),
}  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="capacity.py", description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=bounded(int, 4), default=200, help="800x600 photos decoded per round")
    parser.add_argument(
        "--large", type=bounded(int, 4), default=16, help="4000x3000 photos per round, each kind"
    )
    parser.add_argument(
        "--post", type=bounded(int, 4), default=24, help="images post-processed per case and round"
    )
    parser.add_argument("--rounds", type=bounded(int, 1), default=2)
    parser.add_argument(
        "--grain", type=bounded(float, 0), default=8.0, help="noise std of the 4000x3000 photos"
    )
    parser.add_argument("--ray-images", type=bounded(int, 0), default=1200, help="images of (c); 0: skip it")
    parser.add_argument(
        "--workdir", default=None, help="where the JPEGs and Parquet files go (default: a temp dir)"
    )
    return parser


def write_jpegs(
    folder: Path, count: int, height: int, width: int, grain: float, orientations: tuple[int, ...]
) -> dict[int, list[str]]:
    """`count` landscape photos cut to `height x width`, as JPEG quality 90 files, the same pixels
    once per EXIF orientation of `orientations` (1: no tag); their paths by orientation."""
    rng = np.random.default_rng(1)
    paths: dict[int, list[str]] = {orientation: [] for orientation in orientations}
    for orientation in orientations:
        (folder / f"orientation-{orientation}").mkdir(parents=True, exist_ok=True)
    for index, pixels in enumerate(photos(count, short_side=height, portrait_fraction=0.0, seed=height)):
        pixels = pixels[:, :width]
        if grain:
            noise = rng.standard_normal(pixels.shape, dtype=np.float32) * grain
            pixels = np.clip(pixels + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        for orientation in orientations:
            exif = Image.Exif()
            if orientation != 1:
                exif[0x0112] = orientation
            path = folder / f"orientation-{orientation}" / f"photo-{index:04d}.jpg"
            image.save(path, format="JPEG", quality=90, exif=exif.tobytes())
            paths[orientation].append(str(path))
    return paths


def decode_cost(paths: list[str], batch_size: int, rounds: int) -> dict:
    """CPU-s per image of `decode_batch` (best round), of which the shrink, and the decoded size."""
    best, shrink, size = math.inf, math.inf, None
    spec = R50_FPN_V2
    for _ in range(rounds):
        start = time.process_time()
        for lo in range(0, len(paths), batch_size):
            batch = {"path": np.array(paths[lo : lo + batch_size], dtype=object)}
            out = decode_batch(
                batch, max_pixels=SegmentConfig.max_pixels, min_size=spec.min_size, max_size=spec.max_size
            )
            assert not any(out["error"]), out["error"]
        best = min(best, (time.process_time() - start) / len(paths))
        size = (int(out["height"][0]), int(out["width"][0]), out["image"][0].shape[:2])
        # The shrink alone, on one displayed image of the batch.
        pixels = np.array(Image.open(paths[0]).convert("RGB"))
        if size[0] != pixels.shape[0]:
            pixels = np.ascontiguousarray(pixels.transpose(1, 0, 2))
        start = time.process_time()
        for _ in range(3):
            shrink_to_model_size(pixels, spec.min_size, spec.max_size)
        shrink = min(shrink, (time.process_time() - start) / 3)
    megabytes = sum(os.path.getsize(p) for p in paths) / len(paths) / 1e6
    return {"cpu": best, "shrink": shrink, "size": size, "mb": megabytes}


def detections_batch(count: int, detections: int, height: int, width: int, seed: int) -> dict:
    """A batch as `pipeline.segment.inference.Segmenter` returns it: `count` rows of `detections`."""
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    rows: dict[str, list] = {"boxes": [], "scores": [], "labels": [], "mask_probs": []}
    for _ in range(count):
        mask_probs, boxes = make_detections(detections, height, width, BOX_SIDES["realistic"], generator)
        rows["boxes"].append(boxes.numpy())
        rows["scores"].append(np.sort(rng.uniform(0.5, 1.0, detections).astype(np.float32))[::-1].copy())
        rows["labels"].append(rng.integers(1, len(CATEGORIES) + 1, detections).astype(np.int32))
        rows["mask_probs"].append(mask_probs[:, 0].numpy())
    return {
        "path": np.array([f"s3://bucket/photos/{seed}-{i:05d}.jpg" for i in range(count)], dtype=object),
        "width": np.full(count, width, np.int32),
        "height": np.full(count, height, np.int32),
        "error": np.full(count, "", dtype=object),
        **rows,
    }


def post_cost(batch: dict, output_uri: str, rounds: int) -> float:
    """CPU-s per image of `finish_batch` on `batch` (best round)."""
    best = math.inf
    for _ in range(rounds):
        start = time.process_time()
        counts = finish_batch(
            batch, categories=CATEGORIES, model_uri="s3://bucket/model", output_uri=output_uri
        )
        best = min(best, (time.process_time() - start) / len(batch["path"]))
        assert int(counts["images"][0]) == len(batch["path"])
    return best


def tree_cpu_seconds() -> float:
    """CPU seconds (user and system) of this process and all its live descendants, with the
    children each of them has reaped: every process a local Ray started, whatever else runs."""
    table = processes()
    mine, frontier = {os.getpid()}, [os.getpid()]
    children: dict[int, list[int]] = {}
    for pid, process in table.items():
        children.setdefault(process.parent, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in mine:
                mine.add(child)
                frontier.append(child)
    return sum(table[pid].seconds + table[pid].reaped_seconds for pid in mine if pid in table)


class StandIn:
    """The inference actor's stand-in: the detections of `template` for every row, no model."""

    def __init__(self, template: dict):
        self.template = template

    def __call__(self, batch: dict) -> dict:
        count = len(batch["path"])
        rows = {
            name: [self.template[name][0]] * count for name in ("boxes", "scores", "labels", "mask_probs")
        }
        return {name: batch[name] for name in ("path", "width", "height", "error")} | rows


def ray_data_cost(paths: list[str], template: dict, output_uri: str, count: int) -> dict:
    """CPU seconds of the job's stages on a local Ray over `count` / 4 and `count` images (paths
    repeated), less Ray's idle CPU over each run's time (`idle`, CPU-s per s), measured after a
    warm-up run that starts the workers: the difference of the two is the CPU per image, with
    each run's fixed costs (its actor's start, the plan) taken out."""
    import ray

    spec = R50_FPN_V2
    batch_size = SegmentConfig.batch_size

    def run(images: int) -> None:
        items = [{"path": paths[i % len(paths)]} for i in range(images)]
        dataset = ray.data.from_items(items, override_num_blocks=max(1, images // batch_size))
        dataset = dataset.map_batches(
            decode_batch,
            fn_kwargs={
                "max_pixels": SegmentConfig.max_pixels,
                "min_size": spec.min_size,
                "max_size": spec.max_size,
            },
            batch_format="numpy",
        )
        # Memory, as the job's CPU actors ask for it: it keeps decode on tasks of its own.
        dataset = dataset.map_batches(
            StandIn, fn_constructor_kwargs={"template": template}, batch_size=batch_size,
            batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1,
            memory=256 << 20,
        )  # fmt: skip
        dataset = dataset.map_batches(
            finish_batch, batch_size=SegmentConfig.rows_per_file, batch_format="numpy",
            fn_kwargs={"categories": CATEGORIES, "model_uri": "s3://bucket/model", "output_uri": output_uri},
        )  # fmt: skip
        done = sum(int(batch["images"].sum()) for batch in dataset.iter_batches(batch_size=None))
        assert done == images, (done, images)

    ray.init(
        address="local", num_cpus=3, include_dashboard=False, log_to_driver=False, configure_logging=False
    )
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        run(4 * batch_size)
        start_cpu, start = tree_cpu_seconds(), time.perf_counter()
        time.sleep(10)
        idle = (tree_cpu_seconds() - start_cpu) / (time.perf_counter() - start)
        busy = {}
        for images in (count // 4, count):
            start_cpu, start = tree_cpu_seconds(), time.perf_counter()
            run(images)
            busy[images] = tree_cpu_seconds() - start_cpu - idle * (time.perf_counter() - start)
    finally:
        ray.shutdown()
    return {"busy": busy, "idle": idle}


def node_types() -> list[tuple[str, float, str]]:
    """(where, CPUs per GPU, GPU) of each GPU node type in cluster.yaml and of the GPU pods of the
    segmentation RayJob in deploy/kuberay/."""
    found = []
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for name, node in config["available_node_types"].items():
        instance = node["node_config"]["InstanceType"]
        vcpus, gpus, gpu = INSTANCES.get(instance, (0, 0, ""))
        if gpus:
            found.append((f"cluster.yaml {name}: {instance}", vcpus / gpus, gpu))
    for path in [REPO / "deploy" / "kuberay" / "rayjob-segment.yaml"]:
        job = yaml.safe_load(path.read_text())
        for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
            [container] = group["template"]["spec"]["containers"]
            limits = container["resources"]["limits"]
            gpus = float(limits.get("nvidia.com/gpu", 0))
            if gpus:
                found.append((f"{path.name} {group['groupName']} pod", float(limits["cpu"]) / gpus, "any"))
    return found


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}; torch threads "
        f"{torch.get_num_threads()}; preset {R50_FPN_V2.name} (min_size {R50_FPN_V2.min_size}, "
        f"max_size {R50_FPN_V2.max_size}); "
        f"batch {SegmentConfig.batch_size}; best of {args.rounds} rounds"
    )
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="capacity-"))
    large = write_jpegs(workdir / "large", args.large, 3000, 4000, args.grain, (1, 6))
    sets = {
        "800x600": write_jpegs(workdir / "small", args.small, 600, 800, 0.0, (1,))[1],
        "4000x3000": large[1],
        "4000x3000 EXIF 6": large[6],
    }
    decode = {name: decode_cost(paths, SegmentConfig.batch_size, args.rounds) for name, paths in sets.items()}
    print("\n(a) decode_batch, CPU ms per image")
    print(f"{'photos':>17} {'file MB':>8} {'to the actor':>13} {'decode ms':>10} {'of which shrink':>16}")
    for name, cost in decode.items():
        height, width, (h, w) = cost["size"]
        print(
            f"{name:>17} {cost['mb']:8.2f} {f'{h}x{w}':>13} {1e3 * cost['cpu']:10.1f}"
            f" {1e3 * cost['shrink']:16.1f}"
        )

    post = {}
    output_uri = str(workdir / "out")
    print("\n(b) finish_batch (RLE + rows + Parquet commit), CPU ms per image")
    print(f"{'displayed':>10} {'dets':>5} {'post ms':>8}")
    for displayed, (height, width) in DISPLAYED.items():
        for detections in DETECTIONS:
            batch = detections_batch(args.post, detections, height, width, seed=detections + height)
            post[displayed, detections] = post_cost(batch, output_uri, args.rounds)
            print(f"{displayed:>10} {detections:>5} {1e3 * post[displayed, detections]:8.1f}")

    overhead = 0.0
    if args.ray_images:
        template = detections_batch(1, 50, 600, 800, seed=7)
        # The post-process of the stand-in's detections, in this process: the figure to take out.
        repeated = {
            name: values * args.post if isinstance(values, list) else np.tile(values, args.post)
            for name, values in template.items()
        }
        repeated["path"] = np.array(
            [f"s3://bucket/photos/ray-{i:05d}.jpg" for i in range(args.post)], dtype=object
        )
        ray_cost = ray_data_cost(sets["800x600"], template, str(workdir / "ray-out"), args.ray_images)
        (few, few_cpu), (many, many_cpu) = ray_cost["busy"].items()
        marginal = (many_cpu - few_cpu) / (many - few)
        stages = decode["800x600"]["cpu"] + post_cost(repeated, output_uri, args.rounds)
        overhead = max(0.0, marginal - stages)
        print(
            f"\n(c) Ray Data, 800x600 images, 50 detections: {few_cpu:.2f} CPU-s for {few} images, "
            f"{many_cpu:.2f} for {many} (Ray idle {ray_cost['idle']:.3f} CPU/s, taken out): "
            f"{1e3 * marginal:.1f} ms per further image against {1e3 * stages:.1f} ms of the stages "
            f"alone: Ray Data's own {1e3 * overhead:.1f} ms per image; a run's fixed "
            f"{many_cpu - many * marginal:.2f} CPU-s"
        )
    else:
        print("\n(c) Ray Data: skipped (--ray-images 0); its own CPU counted as 0")

    print(
        f"\nCPUs per GPU = images/s x (decode + post + Ray Data {1e3 * overhead:.1f} ms) + {ACTOR_CPUS:g} "
        "(the inference actor)"
    )
    print(
        f"{'photos':>17} {'dets':>5} {'CPU ms/image':>13}" + "".join(f" {f'CPUs @{r}/s':>11}" for r in RATES)
    )
    need = {}
    for name in sets:
        displayed = name.split()[0]
        for detections in DETECTIONS:
            per_image = decode[name]["cpu"] + post[displayed, detections] + overhead
            need[name, detections] = per_image
            cpus = "".join(f" {rate * per_image + ACTOR_CPUS:11.1f}" for rate in RATES)
            print(f"{name:>17} {detections:>5} {1e3 * per_image:13.1f}{cpus}")

    easiest, worst = min(need, key=need.get), max(need, key=need.get)
    print("\nimages/s the CPUs of a GPU node feed, (CPUs per GPU - the actor's) / CPU-s per image")
    print(f"{'node type':>40} {'CPUs/GPU':>9} {'GPU':>5} {'easiest':>8} {'worst':>8}")
    for where, cpus, gpu in node_types():
        left = cpus - ACTOR_CPUS
        print(f"{where:>40} {cpus:9.1f} {gpu:>5} {left / need[easiest]:8.0f} {left / need[worst]:8.0f}")
    for instance, (vcpus, gpus, gpu) in INSTANCES.items():
        left = vcpus / gpus - ACTOR_CPUS
        print(
            f"{'AWS ' + instance:>40} {vcpus / gpus:9.1f} {gpu:>5} {left / need[easiest]:8.0f}"
            f" {left / need[worst]:8.0f}"
        )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    cpus = {case: [rate * need[case] + ACTOR_CPUS for rate in RATES] for case in (easiest, worst)}
    print(
        f"headline: CPUs per GPU at {RATES[0]} / {RATES[1]} images/s: "
        f"{cpus[easiest][0]:.1f} / {cpus[easiest][1]:.1f} "
        f"({easiest[0]}, {easiest[1]} detections) to {cpus[worst][0]:.1f} / {cpus[worst][1]:.1f} "
        f"({worst[0]}, {worst[1]} detections)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
