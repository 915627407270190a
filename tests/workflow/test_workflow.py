"""The Snakemake workflow, run for real: outputs, counts, and what a change replans."""

import base64
import hashlib
import json
import re
import shutil
from pathlib import Path

import cv2
import pandas as pd
import pytest
import yaml
from helpers import COCO_MINI, DEMO_DATASET, REPO
from helpers.workflow import main_config, planned_jobs, snakemake
from pycocotools.coco import COCO

pytestmark = pytest.mark.slow

TWO_SUBSETS = {
    "datasets": {"demo": DEMO_DATASET},
    "subsets": {
        "ball": {"dataset": "demo", "categories": ["person", "sports ball"], "masks": True},
        "car": {"dataset": "demo", "categories": ["car", "person"], "balance": "none"},
    },
}


def planned(workdir: Path, config: dict) -> set[str]:
    """Output files of the jobs a dry run plans (the `all` target excluded)."""
    text = snakemake(workdir, config, "--dry-run", "data")
    return {path for line in re.findall(r"^\s+output: (.*)$", text, re.M) for path in line.split(", ")}


def counts_by_pycocotools(path: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    coco = COCO(str(path))
    result = {}
    for name in names:
        (category_id,) = coco.getCatIds(catNms=[name])
        result[name] = (len(coco.getAnnIds(catIds=[category_id])), len(coco.getImgIds(catIds=[category_id])))
    return result


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    snakemake(workdir, TWO_SUBSETS, "data")
    return workdir


def test_demo_workflow_writes_every_output_with_counts_pycocotools_agrees_with(demo_run):
    results = demo_run / "results"
    for subset, names in (("ball", ["person", "sports ball"]), ("car", ["car", "person"])):
        table = pd.read_csv(results / subset / "stats" / "counts.csv")
        assert (results / subset / "stats" / "counts.png").stat().st_size > 10_000
        for split in ("train", "val"):
            expected = counts_by_pycocotools(results / subset / "data" / f"{split}.json", names)
            last_step = table[table.split == split].step.iloc[-1]
            got = table[(table.split == split) & (table.step == last_step)].set_index("category")
            assert {n: (got.instances[n], got.images[n]) for n in names} == expected
    source_counts = counts_by_pycocotools(
        demo_run / "resources/demo/annotations/instances_train.json", ["person"]
    )
    assert source_counts["person"][1] > len(list((results / "ball" / "images" / "train").glob("*.jpg")))
    masks = sorted((results / "ball" / "masks" / "val").glob("*.png"))
    assert len(masks) == 2 * len(list((results / "ball" / "images" / "val").glob("*.jpg"))) > 0
    assert not (results / "car" / "masks").exists()


def test_after_a_full_run_a_dry_run_plans_nothing(demo_run):
    assert planned(demo_run, TWO_SUBSETS) == set()
    assert "Nothing to be done" in snakemake(demo_run, TWO_SUBSETS, "--dry-run", "data")


def test_changing_one_subsets_categories_replans_that_subset_only(demo_run):
    changed = {**TWO_SUBSETS, "subsets": {**TWO_SUBSETS["subsets"]}}
    changed["subsets"]["car"] = {**changed["subsets"]["car"], "categories": ["car", "sports ball"]}
    outputs = planned(demo_run, changed)
    assert outputs == {
        f"results/car/data/{name}.json" for name in ("train_filtered", "train", "val_filtered", "val")
    } | {"results/car/stats/counts.csv", "results/car/stats/counts.png", "results/car/stats/data_checks.html"}


def test_editing_an_input_json_replans_what_depends_on_it(demo_run):
    source = demo_run / "resources/demo/annotations/instances_val.json"
    source.write_bytes(source.read_bytes().replace(b'"year":2026', b'"year":2027', 1))
    outputs = planned(demo_run, TWO_SUBSETS)
    assert {p for p in outputs if "train" in p} == set()
    assert {"results/ball/data/val.json", "results/car/data/val.json", "results/ball/masks/val"} <= outputs
    snakemake(demo_run, TWO_SUBSETS, "data")
    assert planned(demo_run, TWO_SUBSETS) == set()


def test_coco_mini_workflow_matches_pycocotools(tmp_path):
    names = ["person", "sports ball"]
    config = {
        "datasets": {
            "mini": {
                split: {
                    "images": str(COCO_MINI / f"{split}2017"),
                    "annotations": str(COCO_MINI / "annotations" / f"instances_{split}2017.json"),
                }
                for split in ("train", "val")
            }
        },
        "subsets": {"pb": {"dataset": "mini", "categories": names, "masks": True}},
    }
    snakemake(tmp_path, config, "data")
    for split in ("train", "val"):
        path = COCO_MINI / "annotations" / f"instances_{split}2017.json"
        coco = COCO(str(path))
        both = coco.getImgIds(catIds=coco.getCatIds(catNms=names))
        output = tmp_path / "results" / "pb" / "data" / f"{split}.json"
        kept = counts_by_pycocotools(output, names)
        if split == "train":
            assert sorted(p.name for p in (tmp_path / "results/pb/images/train").glob("*.jpg")) == sorted(
                img["file_name"] for img in coco.loadImgs(both)
            )
            assert kept["sports ball"][1] == len(both) == 3
        else:
            assert kept == counts_by_pycocotools(path, names)


def test_the_default_main_job_trains_a_model_reaching_segm_ap_060(main_run):
    """The embedded default, as the README runs it (plus the opt-in export): data, training on the
    CPU, evaluation, inference, model card, exports verified against the evaluation."""
    workdir, config = main_run, main_config()
    metrics = json.loads((workdir / "results/person_ball/eval/metrics.json").read_text())["retrained"]
    assert metrics["segm"]["AP"] >= 0.60, metrics["segm"]  # 0.670 on 2 cores (README)
    assert metrics["bbox"]["AP"] >= 0.60, metrics["bbox"]
    model = workdir / "results/person_ball/model"
    assert json.loads((model / "classes.json").read_text())["classes"] == ["person", "sports ball"]
    records = [json.loads(line) for line in (model / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if "total_loss" in r]) == config.get("train", {}).get("iterations", 400)
    assert [r["iteration"] for r in records if "segm_AP" in r] == [200, 400]  # train.eval_period 200
    assert list((model / "tensorboard").glob("events.out.tfevents.*"))  # test_training.py reads them
    # the served weights are the best evaluation's, and evaluating them reproduces its AP
    best = json.loads((model / "best.json").read_text())
    logged = max((r for r in records if "segm_AP" in r), key=lambda r: r["segm_AP"])
    assert (best["iteration"], best["value"]) == (logged["iteration"], logged["segm_AP"])
    assert json.loads((model / "classes.json").read_text())["model_file"] == best["kept"] == "model_best.pth"
    assert (model / "model.pth").read_bytes() == (model / "model_best.pth").read_bytes()  # served
    assert abs(metrics["segm"]["AP"] - best["value"]) <= 1e-6
    assert metrics["weights"] == {"file": "model_best.pth", "iteration": best["iteration"], "best": True}
    summary = pd.read_csv(workdir / "results/person_ball/inference/summary.csv")
    assert len(summary) == 24 + 1 and set(summary.status) == {"ok"}  # demo val images + demo video
    assert summary[summary.kind == "video"].frames.item() == 60
    # the demo video's tracks: each object keeps its id through crossings and a 14-frame occlusion
    # (IDF1 0.92, MOTA 0.93, 3 ID switches with a main job's model on 2 cores; benchmarks/README.md)
    (tracking,) = pd.read_csv(workdir / "results/person_ball/inference/tracking.csv").to_dict("records")
    assert tracking["video"] == "demo" and tracking["gt_tracks"] == 6, tracking
    assert tracking["IDF1"] >= 0.8 and tracking["MOTA"] >= 0.7, tracking
    assert summary[summary.kind == "video"].tracks.item().startswith("person ")
    assert summary.instances.sum() > 24  # a trained model finds the demo's objects at score 0.5
    predictions = COCO(str(workdir / "results/person_ball/inference/predictions_coco.json"))
    assert len(predictions.imgs) == 24  # the images, not the video
    assert len(predictions.anns) == summary[summary.kind == "image"].instances.sum()
    categories = [(c["name"], c["source_id"]) for c in predictions.cats.values()]
    assert categories == [("person", 1), ("sports ball", 37)]
    for export_format in ("onnx", "torchscript"):
        verify = json.loads((workdir / f"results/person_ball/export/{export_format}/verify.json").read_text())
        val_images = len(json.loads((workdir / "results/person_ball/data/val.json").read_text())["images"])
        assert verify["passed"] and verify["images"] == val_images >= 20 and verify["same_share"] >= 0.95
        assert verify["ap"]["reference"] == {kind: metrics[kind]["AP"] for kind in ("bbox", "segm")}
        assert max(verify["ap_difference"].values()) <= 0.005
    check_model_card(workdir / "results/person_ball")
    assert "Nothing to be done" in snakemake(workdir, config, "--dry-run")
    check_report(workdir, config)


def markdown_rows(text: str, heading: str) -> list[list[str]]:
    """The cells of the Markdown table rows in a section of the card, separator rows left out."""
    section = re.split(r"\n(?:## |\*\*)", text.split(f"\n{heading}\n", 1)[1], maxsplit=1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row] for row in rows if not set(row[0].strip()) <= {"-", ":"}]


def check_model_card(results: Path) -> None:
    """MODEL_CARD.md holds the run's own numbers: the AP of eval/metrics.json and per_class.csv, the
    counts of stats/counts.csv, the weights' SHA-256."""
    card = (results / "model" / "MODEL_CARD.md").read_text()
    metrics = json.loads((results / "eval" / "metrics.json").read_text())["retrained"]
    ap = {(kind, name): value for kind, name, value in markdown_rows(card, "## Evaluation")[1:]}
    for kind in ("bbox", "segm"):
        assert ap[(kind, "all classes")] == f"{100 * metrics[kind]['AP']:.1f}"
        for name, value in metrics["per_class"][kind].items():
            assert ap[(kind, name)] == f"{100 * value:.1f}"
    counts = pd.read_csv(results / "stats" / "counts.csv")
    table = markdown_rows(card, "**train**")
    steps = table[0][1:]
    for name, *cells in table[1:]:
        for step, cell in zip(steps, cells, strict=True):
            row = counts[(counts.split == "train") & (counts.step == step) & (counts.category == name)].iloc[
                0
            ]
            assert cell == f"{row.instances} ({row.images})"
    assert steps == ["input", "filtered", "balanced"] and len(table) == 3
    weights = hashlib.sha256((results / "model" / "model.pth").read_bytes()).hexdigest()
    assert ["weights", "model.pth", weights] in markdown_rows(card, "## Hashes")
    assert markdown_rows(card, "## Classes")[1:] == [
        ["0", "person", "1", "1"],
        ["1", "sports ball", "37", "37"],
    ]


def report_contents(html: str, name: str) -> dict:
    """A JSON object the Snakemake report page defines as ``var NAME = {...};``."""
    match = re.search(rf"var {name} = (\{{.*?\}});\n", html, re.S)
    assert match, f"no {name} in the report"
    return json.loads(match.group(1))


def embedded(result: dict) -> bytes:
    """The bytes of a result embedded in the report (a base64 data URI)."""
    return base64.b64decode(result["data_uri"].split("base64,", 1)[1])


def check_report(workdir: Path, config: dict) -> None:
    """`snakemake --report` of the demo run: one page with counts, curves, AP table, prediction
    grid and every inference output, each file embedded."""
    snakemake(workdir, config, "--report", "report.html")
    html = (workdir / "report.html").read_text()
    results, categories = report_contents(html, "results"), report_contents(html, "categories")
    base = "results/person_ball"
    assert categories["1. Data"]["person_ball"] == [
        f"{base}/stats/counts.png",
        f"{base}/stats/data_checks.html",
    ]
    assert categories["2. Training"]["person_ball"] == [f"{base}/model/loss.png"]
    assert categories["5. Model card"]["person_ball"] == [f"{base}/model/model_card.html"]
    card = embedded(results[f"{base}/model/model_card.html"]).decode()
    assert "<h2>Intended use and known limits</h2>" in card and "<table>" in card
    assert set(categories["3. Evaluation"]["person_ball"]) == {
        f"{base}/eval/ap_table.html",
        f"{base}/eval/predictions.png",
    }
    inference = set(categories["4. Inference"]["person_ball"])
    drawn = {f"{base}/inference/drawn/image/demo_val_{index:04d}.png" for index in range(24)}
    video = f"{base}/inference/drawn/video/demo.mp4"
    assert inference == drawn | {video, f"{base}/inference/summary.csv", f"{base}/inference/tracking.csv"}
    assert b"IDF1" in embedded(results[f"{base}/inference/tracking.csv"])
    for path in (f"{base}/stats/counts.png", f"{base}/model/loss.png", f"{base}/eval/predictions.png"):
        assert embedded(results[path]) == (workdir / path).read_bytes(), path
    for path in (f"{base}/inference/drawn/image/demo_val_0003.png", video):  # the inference outputs
        kind_folder = path.replace("/drawn/image/", "/images/").replace("/drawn/video/", "/videos/")
        assert embedded(results[path]) == (workdir / kind_folder).read_bytes(), path
    assert results[f"{base}/inference/drawn/image/demo_val_0003.png"]["labels"] == {
        "file": "demo_val_0003",
        "kind": "image",
    }
    table = embedded(results[f"{base}/eval/ap_table.html"]).decode()
    retrained = json.loads((workdir / base / "eval/metrics.json").read_text())["retrained"]
    assert f"<td>{100 * retrained['segm']['AP']:.1f}</td>" in table and "sports ball" in table
    assert results[video]["mime_type"] == "video/mp4"
    assert results[video]["labels"] == {"file": "demo", "kind": "video"}
    assert "Instances and images per category" in results[f"{base}/stats/counts.png"]["caption"]


def test_adding_an_image_reruns_only_its_shard_and_retraining_reruns_all_inference(tmp_path):
    from d2retrain.data.demo import write_demo_dataset
    from d2retrain.infer.inputs import InputFile
    from d2retrain.workflow.planning import shard_of

    pictures = write_demo_dataset(tmp_path / "pictures", train=1, val=100, video_frames=2).images("val")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["demo"] = {"root": "resources/demo", "train_images": 8, "val_images": 4, "video_frames": 2}
    config["train"] = {"iterations": 4, "eval_period": 0, "warmup_iterations": 2, "steps": []}
    config["inference"] = {"images": [str(pictures)], "videos": [], "shards": 4}
    snakemake(tmp_path, config, "--resources", "gpu=1")
    inferred = tmp_path / "results/person_ball/inference"
    assert len(list((inferred / "images").glob("*.png"))) == 100
    assert planned_jobs(tmp_path, config) == {}

    model = tmp_path / "results/person_ball/model"
    served = (model / "model.pth").read_bytes()
    (model / "model.pth").unlink()  # the served weights are declared: deleting them replans serving
    jobs = planned_jobs(tmp_path, config)
    assert "serve_model" in jobs and "train" not in jobs  # what depends on it runs again, training not
    snakemake(tmp_path, config, "--resources", "gpu=1")
    assert (model / "model.pth").read_bytes() == served and planned_jobs(tmp_path, config) == {}
    for log in (tmp_path / "logs/person_ball").glob("infer_*.log"):  # the same weights: nothing re-inferred
        assert re.search(r": 0 inferred, \d+ kept from an earlier run", log.read_text()), log

    shutil.copy(pictures / "demo_val_0007.jpg", pictures / "added one.jpg")
    shard = shard_of(InputFile.of(pictures / "added one.jpg", "image"), 4)
    assert planned_jobs(tmp_path, config) == {f"infer_{shard:02d}": 1, "inference_summary": 1, "all": 1}
    inodes = {p.name: p.stat().st_ino for p in (inferred / "images").iterdir()}
    snakemake(tmp_path, config, "--resources", "gpu=1")
    assert json.loads((inferred / "images" / "added one.json").read_text())["status"] == "ok"
    summary = pd.read_csv(inferred / "summary.csv")
    assert len(summary) == 101 and set(summary.status) == {"ok"}
    log = (tmp_path / "logs" / "person_ball" / f"infer_{shard:02d}.log").read_text()
    assert re.search(r": 1 inferred, \d+ kept from an earlier run", log), log  # the shard's other files kept
    assert all(p.stat().st_ino == inodes[p.name] for p in (inferred / "images").iterdir() if p.name in inodes)

    (inferred / "images" / "demo_val_0011.png").unlink()  # a lost output: its shard alone reruns
    lost = shard_of(InputFile.of(pictures / "demo_val_0011.jpg", "image"), 4)
    assert planned_jobs(tmp_path, config) == {f"infer_{lost:02d}": 1, "inference_summary": 1, "all": 1}
    snakemake(tmp_path, config, "--resources", "gpu=1")
    assert cv2.imread(str(inferred / "images" / "demo_val_0011.png")) is not None
    assert ": 1 inferred," in (tmp_path / "logs" / "person_ball" / f"infer_{lost:02d}.log").read_text()
    assert planned_jobs(tmp_path, config) == {}

    (pictures / "added one.jpg").unlink()  # a deleted input: its outputs go with the summary's rerun
    snakemake(tmp_path, config, "--resources", "gpu=1")
    assert (
        not list((inferred / "images").glob("added one.*"))
        and len(pd.read_csv(inferred / "summary.csv")) == 100
    )

    config["train"]["iterations"] = 5  # a retrained model replans every inference job
    jobs = planned_jobs(tmp_path, config)
    assert {f"infer_{k:02d}" for k in range(4)} | {"train", "evaluate"} <= set(jobs)


def test_train_num_gpus_2_runs_two_processes_inside_a_snakemake_job(tmp_path):
    """The job's script is imported again by each spawned process: it must not train twice."""
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    config["demo"] = {"root": "resources/demo", "train_images": 8, "val_images": 4, "video_frames": 4}
    config["train"] = {"iterations": 4, "num_gpus": 2, "eval_period": 0, "checkpoint_period": 2}
    config["inference"] = {"images": [], "videos": []}
    target = "results/person_ball/model/model.pth"
    snakemake(tmp_path, config, target, "--resources", "gpu=2")
    log = (tmp_path / "logs/person_ball/train.log").read_text()
    assert "starting 2 training processes" in log
    assert "[rank 1] d2retrain.train.distributed: weights identical on all 2 processes" in log
    assert log.count("trained 4 iterations") == 1
    lines = (tmp_path / "results/person_ball/model/metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4]
