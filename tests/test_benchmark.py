"""`ptxray benchmark`: a tiny real benchmark on CPU (two architectures, 64 px, a few steps) writes
every output, and its numbers agree across the table, CSV, JSON and Markdown and with the models;
the Ray Tune path runs once; `train.batch_size: auto` trains through the runner."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ptxray import benchmark
from ptxray.benchmark import ArchSpec, BenchmarkSettings, arch_config, parse_archs
from ptxray.cache import Cache
from ptxray.cli import main
from ptxray.config import load_config
from ptxray.models import build_model

TWO = "unet_vanilla,fcn:resnet18"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cache64(ray_local, synth_dataset, tmp_path_factory):
    from ptxray import ray_data

    root = tmp_path_factory.mktemp("bench-cache")
    summary = ray_data.prepare(
        load_config("smoke"),  # 64 px, raw/clahe/beasf, 2 folds
        images=str(synth_dataset / "dicom-images-train"),
        labels=str(synth_dataset / "train-rle.csv"),
        cache=str(root),
    )
    return summary["cache"]


def test_parse_archs_presets_pairs_and_errors():
    names = [s.name for s in parse_archs("paper")]
    assert names == list(benchmark.PAPER_SET)
    assert {"unet_vanilla", "unet_densenet121", "deeplabv3", "maskrcnn", "fcn"} <= set(names)
    assert [s.name for s in parse_archs("all")][-6:] == list(benchmark.OTHER_DECODERS)
    spec = parse_archs("fpn:resnet18, unet_resnet34,fpn:resnet18")
    assert spec == [ArchSpec("fpn:resnet18", "fpn", "resnet18"), ArchSpec("unet_resnet34", "unet", "resnet34")]
    with pytest.raises(ValueError, match="unknown architecture 'resunet'"):
        parse_archs("unet_vanilla,resunet")
    cfg = load_config("smoke")
    chex = arch_config(cfg, ArchSpec("unet_densenet121", "unet", "densenet121"), chexnet="/w/model.pth.tar")
    assert chex.model.encoder_weights == "chexnet:/w/model.pth.tar" and chex.model.arch == "unet"
    assert arch_config(cfg, ArchSpec("fpn", "fpn"), chexnet="/w/model.pth.tar").model.encoder_weights == "none"
    with pytest.raises(ValueError, match="exactly one of epochs"):
        BenchmarkSettings(epochs=1, seconds=2.0)
    with pytest.raises(ValueError, match="'auto' needs the batch-size search"):
        BenchmarkSettings(epochs=1, batch_search=False)


def _rows_from_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_local_benchmark_writes_every_output_and_they_agree(cache64, tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["benchmark", "--config", "smoke", "--cache", cache64, "--archs", TWO, "--epochs", "1", "--local",
            "--out", str(out), "--batch-size", "auto", "--max-batch-size", "4", "--warmup-steps", "1",
            "--timing-steps", "1", "--repeats", "2", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out

    files = {p.name for p in out.iterdir()}
    assert files == {"benchmark.json", "benchmark.csv", "benchmark.md", "quality_vs_throughput.png",
                     "throughput_memory.png", "learning_curves.png"}  # fmt: skip
    for png in ("quality_vs_throughput.png", "throughput_memory.png", "learning_curves.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

    report = json.loads((out / "benchmark.json").read_text())
    rows = report["results"]
    assert [r["name"] for r in rows] == ["unet_vanilla", "fcn:resnet18"] and all(r["status"] == "ok" for r in rows)
    assert report["command"] == "ptxray " + " ".join(args)
    assert report["environment"]["device"] == "cpu" and report["environment"]["versions"]["torch"] == torch.__version__
    assert report["settings"]["epochs"] == 1 and report["image_size_px"] == 64

    # Parameter counts are those of the models the benchmark builds.
    cfg = load_config("smoke")
    for r, spec in zip(rows, parse_archs(TWO)):
        model = build_model(arch_config(cfg, spec).model)
        assert r["params_total"] == sum(p.numel() for p in model.parameters())
        assert r["params_trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert r["gflops_per_image"] > 0

    # Quality on the real validation fold: the empty baseline is the fraction of empty masks there.
    cache = Cache.open(cache64)
    _, val_ids = cache.split_ids(0)
    _, val_masks, _ = cache.load_arrays(val_ids)
    empty_fraction = float(np.mean(~val_masks.reshape(len(val_masks), -1).any(1)))
    for r in rows:
        assert r["val_empty_dice"] == pytest.approx(empty_fraction)
        assert r["val_n_images"] == len(val_ids) and 0.0 <= r["val_dice"] <= 1.0
        assert r["max_batch_size"] == 4 and r["max_batch_limit"] == "cap" and r["batch_size"] == 4  # auto = the max
        assert r["train_images_per_s_min"] <= r["train_images_per_s"] <= r["train_images_per_s_max"]
        assert r["infer_images_per_s_min"] <= r["infer_images_per_s"] <= r["infer_images_per_s_max"]
        assert len(r["train_images_per_s_repeats"]) == 2
        assert r["peak_memory_kind"] == "cpu_rss_peak" and r["peak_memory_bytes"] > 0
        assert len(r["history"]) == 1 and r["epochs_completed"] == 1.0
        assert [a["batch_size"] for a in r["batch_search"]["attempts"]] == [2, 4]

    # The CSV holds the same numbers, plus the device and versions on every row.
    csv_rows = _rows_from_csv(out / "benchmark.csv")
    assert [c["name"] for c in csv_rows] == [r["name"] for r in rows]
    for c, r in zip(csv_rows, rows):
        for key in ("params_trainable", "gflops_per_image", "max_batch_size", "train_images_per_s",
                    "infer_images_per_s", "peak_memory_bytes", "val_dice", "val_iou", "val_empty_dice"):  # fmt: skip
            assert float(c[key]) == pytest.approx(r[key], rel=1e-12), key
        assert c["device"] == "cpu" and c["torch"] == torch.__version__ and c["image_size_px"] == "64"

    # The Markdown report and the terminal show the same table cells, computed from these rows.
    md = (out / "benchmark.md").read_text()
    assert "Device" in md and "CPU run" in md and report["command"] in md
    for png in ("quality_vs_throughput.png", "throughput_memory.png", "learning_curves.png"):
        assert f"({png})" in md
    for cells in benchmark.table_rows(rows):
        assert "| " + " | ".join(cells) + " |" in md
        for cell in (cells[0], cells[1], cells[9]):  # name, params (M), Dice
            assert cell in printed
    assert benchmark.table_rows(rows)[0][1] == f"{rows[0]['params_trainable'] / 1e6:.2f}"


def test_benchmark_out_to_s3_uploads_every_output(cache64, moto_s3, capsys):
    s3 = moto_s3.client()
    s3.create_bucket(Bucket="ptxray-bench")
    out = "s3://ptxray-bench/reports/tiny"
    args = ["benchmark", "--config", "smoke", "--cache", cache64, "--archs", "unet_vanilla", "--epochs", "1", "--local",
            "--out", out, "--batch-size", "2", "--no-batch-search", "--warmup-steps", "0", "--timing-steps", "1",
            "--repeats", "1", "--threads", "1"]  # fmt: skip
    assert main(args) == 0
    names = {"benchmark.json", "benchmark.csv", "benchmark.md", "quality_vs_throughput.png", "throughput_memory.png",
             "learning_curves.png"}  # fmt: skip
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="ptxray-bench", Prefix="reports/tiny/")["Contents"]}
    assert keys == {f"reports/tiny/{n}" for n in names}

    def get(name: str) -> bytes:
        return s3.get_object(Bucket="ptxray-bench", Key=f"reports/tiny/{name}")["Body"].read()

    report = json.loads(get("benchmark.json"))
    assert [r["name"] for r in report["results"]] == ["unet_vanilla"] and report["results"][0]["status"] == "ok"
    # The report names where its files are, not the temporary folder they were written in first.
    assert set(report["files"].values()) == {f"{out}/{n}" for n in names}
    assert [r["name"] for r in csv.DictReader(io.StringIO(get("benchmark.csv").decode()))] == ["unet_vanilla"]
    assert all(get(png)[:8] == b"\x89PNG\r\n\x1a\n" for png in names if png.endswith(".png"))
    assert "(learning_curves.png)" in get("benchmark.md").decode()
    printed = capsys.readouterr().out
    assert f"json: {out}/benchmark.json" in printed


def test_seconds_budget_fixed_batch_and_a_failing_architecture(cache64):
    n_train = len(Cache.open(cache64).split_ids(0)[0])
    batch = n_train - 1  # each epoch ends with a batch of one image, which deeplabv3 cannot train on
    settings = BenchmarkSettings(seconds=1.0, batch_size=batch, batch_search=False, warmup_steps=0, timing_steps=1, repeats=1)
    specs = parse_archs("pan,deeplabv3:resnet18")  # pan needs >= 128 px: it fails, the benchmark goes on
    rows = benchmark.run_local(load_config("smoke"), cache64, specs, settings)
    assert rows[0]["status"] == "error" and "pan" in rows[0]["error"] and "128" in rows[0]["error"]
    ok = rows[1]
    assert ok["status"] == "ok", ok["error"]
    assert ok["batch_size"] == batch and "max_batch_size" not in ok
    assert all(h["train_images_seen"] % batch == 0 for h in ok["history"])  # the one-image batches were left out
    assert ok["train_seconds"] >= 1.0 and ok["train_seconds"] < 30
    assert [h["epoch"] for h in ok["history"]] == list(range(len(ok["history"])))
    seen = [h["train_images_seen"] for h in ok["history"]]
    assert seen == sorted(seen) and seen[-1] == ok["train_images_seen"]
    cells = benchmark.table_rows(rows)
    assert cells[0][0] == "pan" and set(cells[0][1:]) == {"-"}


@pytest.mark.parametrize("where", ["host", "device"])
def test_benchmark_trains_on_the_augmentation_path_training_takes(cache64, where):
    # augment.where=auto is the device path on CUDA; `device` forces it here on CPU.
    cfg = load_config("smoke", {"augment.where": where, "model.vanilla.base_filters": 4, "model.vanilla.depth": 2})
    settings = BenchmarkSettings(epochs=1, batch_size=4, batch_search=False, warmup_steps=0, timing_steps=1, repeats=1)
    (row,) = benchmark.run_local(cfg, cache64, parse_archs("unet_vanilla"), settings)
    assert row["status"] == "ok", row["error"]
    assert [h["augment_where"] for h in row["history"]] == [where]
    assert row["history"][0]["train_images_seen"] > 0 and math.isfinite(row["history"][0]["train_loss"])


def test_ray_tune_trials_one_per_architecture(ray_local, cache64, tmp_path):
    from ptxray import ray_benchmark

    settings = BenchmarkSettings(epochs=1, batch_size=2, batch_search=False, warmup_steps=0, timing_steps=1, repeats=1, threads=1)
    rows, mode = ray_benchmark.run_trials(
        load_config("smoke"), cache64, parse_archs(TWO), settings, storage_path=str(tmp_path / "tune"), cpus_per_trial=1
    )
    assert [r["name"] for r in rows] == ["unet_vanilla", "fcn:resnet18"]
    assert all(r["status"] == "ok" and r["device"] == "cpu" and r["torch_threads"] == 1 for r in rows)
    assert all(math.isfinite(r["train_images_per_s"]) and 0.0 <= r["val_dice"] <= 1.0 for r in rows)
    assert "Ray Tune" in mode and "up to 1 at a time" in mode
    report = benchmark.write_report(rows, cfg=load_config("smoke"), cache_uri=cache64, settings=settings, out_dir=tmp_path / "out", mode=mode)
    assert "Ray trial process" in report["memory_kind_text"]


def test_train_batch_size_auto_trains_at_the_largest_batch(cache64, tmp_path):
    from ptxray.runner import train_fold

    cfg = load_config("smoke", {"train.batch_size": "auto", "model.vanilla.base_filters": 4, "model.vanilla.depth": 2})
    train_fold(cfg, cache64, tmp_path / "run", device="cpu")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    n_train = len(Cache.open(cache64).split_ids(0)[0])
    assert saved["train"]["batch_size"] == min(64, n_train)  # CPU: capped by the training images


def test_train_batch_size_auto_on_ray_train_agrees_over_workers(cache64, tmp_path):
    from ptxray import ray_train

    overrides = {"train.batch_size": "auto", "model.vanilla.base_filters": 4, "model.vanilla.depth": 2,
                 "compute.num_workers": 2, "compute.cpus_per_worker": 0}  # fmt: skip
    result = ray_train.run_fold(load_config("smoke", overrides), cache64, run_name="auto", storage_path=str(tmp_path))
    with result.checkpoint.as_directory() as checkpoint:
        saved = yaml.safe_load((Path(checkpoint) / "config.yaml").read_text())
    n_train_per_rank = len(Cache.open(cache64).split_ids(0)[0]) // 2
    assert saved["train"]["batch_size"] == min(64, n_train_per_rank)  # each rank's search, capped by its rows


def test_cli_errors_are_named(cache64, tmp_path, capsys):
    base = ["benchmark", "--cache", cache64, "--local", "--epochs", "1", "--out", str(tmp_path)]
    assert main(base + ["--archs", "nope"]) == 2
    assert "unknown architecture 'nope'" in capsys.readouterr().err
    assert main(base + ["--archs", "unet_vanilla", "--image-size", "128"]) == 2
    assert "holds 64 px images, not 128 px" in capsys.readouterr().err
    assert main(base + ["--archs", "unet_vanilla", "--batch-size", "lots"]) == 2
    assert "--batch-size 'lots'" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_benchmark_uses_bf16_channels_last_and_cuda_memory(cache64):
    settings = BenchmarkSettings(epochs=1, max_batch_size=64, warmup_steps=1, timing_steps=2, repeats=2, device="cuda")
    rows = benchmark.run_local(load_config("smoke"), cache64, parse_archs("unet_resnet34,maskrcnn"), settings)
    for r in rows:
        assert r["status"] == "ok", r.get("error")
        assert r["device"] == "cuda" and r["peak_memory_kind"] == "cuda_max_allocated" and r["peak_memory_bytes"] > 0


# ---- the plots -------------------------------------------------------------------------------
RECORDED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "architectures" / "benchmark.json"


def _drawn(fig):
    """The figure drawn on an Agg canvas (what savefig rendered), and its renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _text_boxes(fig) -> list[tuple[str, object]]:
    """Every text the figure draws, with its box in pixels (tick labels outside an axis's view
    limits exist as objects but are not drawn, so they are left out)."""
    from matplotlib.text import Text

    renderer = _drawn(fig)
    off_view = set()
    for ax in fig.axes:
        for axis, labels, limits, i in ((ax.xaxis, ax.get_xticklabels(), ax.get_xlim(), 0), (ax.yaxis, ax.get_yticklabels(), ax.get_ylim(), 1)):
            lo, hi = sorted(limits)
            off_view |= {id(t) for t in labels if not (axis.get_visible() and lo <= t.get_position()[i] <= hi)}
    out, seen = [], set()
    for t in fig.findobj(Text):
        if id(t) in seen or id(t) in off_view:
            continue
        seen.add(id(t))
        if t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes.get_visible()):
            out.append((t.get_text(), t.get_window_extent(renderer)))
    return out


def _overlaps(fig) -> list[tuple[str, str]]:
    """Pairs of drawn texts that overlap, and texts cut off by the figure's edge."""
    boxes = _text_boxes(fig)
    page = fig.bbox
    cut = [(a, "figure edge") for a, b in boxes if b.x0 < page.x0 or b.x1 > page.x1 or b.y0 < page.y0 or b.y1 > page.y1]
    return cut + [(a, b) for i, (a, ba) in enumerate(boxes) for b, bb in boxes[i + 1:] if ba.overlaps(bb) and ba.width and bb.width]


def test_plots_of_a_recorded_run_have_no_overlapping_labels_a_chexnet_marker_and_the_cap(tmp_path):
    """The recorded CPU run (benchmarks/results/architectures: five architectures on one spot at the
    empty baseline) with its DenseNet-121 marked as CheXNet-initialised: every label stays apart, the
    CheXNet point is a star named in the legend, and batches stopped at the cap read as a cap."""
    from matplotlib.legend import Legend

    report = json.loads(RECORDED.read_text())
    densenet = next(r for r in report["results"] if r["name"] == "unet_densenet121")
    densenet["encoder_weights"] = "chexnet:/models/chexnet/model.pth.tar"
    fig = benchmark.plot_quality_vs_throughput(report, tmp_path / "quality_vs_throughput.png")
    assert _overlaps(fig) == []
    (legend,) = [a for a in fig.findobj(Legend) if a.get_title().get_text() == "architecture"]
    # The panel's own legend names the baseline only (the architectures are in the shared one).
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["all-empty baseline (same images)"]
    names = [t.get_text() for t in legend.get_texts()]
    assert names[1] == "unet_densenet121 ★ CheXNet-initialised encoder"
    assert {n.split(" ")[0] for n in names} == {r["name"] for r in report["results"] if r["status"] == "ok"}
    for ax in fig.axes:  # the CheXNet encoder's point is a star, and no other point is
        markers = {c.get_label(): c.lines[0].get_marker() for c in ax.containers}
        assert [n for n, m in markers.items() if m == "*"] == ["unet_densenet121 ★ CheXNet-initialised encoder"]
    # The legend sits beside the plots, not over them.
    renderer = _drawn(fig)
    assert not any(legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)

    fig = benchmark.plot_cost_bars(report, tmp_path / "throughput_memory.png")
    assert _overlaps(fig) == []
    batch_ax = fig.axes[3]
    labels = [t.get_text() for t in batch_ax.texts]
    assert labels == [" ≥ 8 (cap)"] * 9  # every architecture fitted the cap of 8 on this CPU run
    assert [line.get_xdata()[0] for line in batch_ax.get_lines()] == [8]  # the cap, drawn once
    assert all(p.get_hatch() == "//" for p in batch_ax.patches)
    assert "unet_densenet121 ★" in [t.get_text() for t in fig.axes[0].get_yticklabels()]
    # A limit found by running out of memory is a plain bar with its number.
    report["results"][0].update(max_batch_limit="out of memory", max_batch_size=6)
    fig = benchmark.plot_cost_bars(report, tmp_path / "throughput_memory_oom.png")
    assert [t.get_text() for t in fig.axes[3].texts][0] == " 6 (OOM above)"
    assert [p.get_hatch() for p in fig.axes[3].patches].count("//") == 8

    fig = benchmark.plot_learning_curves(report, tmp_path / "learning_curves.png")
    assert _overlaps(fig) == []
    assert "unet_densenet121 ★ CheXNet (batch 4)" in [ax.get_title() for ax in fig.axes]
    for png in ("quality_vs_throughput.png", "throughput_memory.png", "learning_curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The Markdown table names the CheXNet encoder too.
    assert benchmark.table_rows(report["results"])[1][0] == "unet_densenet121 ★ CheXNet"
