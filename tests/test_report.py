"""jobs.report: the page opened in a real headless Chromium loads with no console error and no
broken image, its counts equal DuckDB's over the same Parquet, its gallery shows the sampled
images linked to their full-size overlays; the same from an `s3://` output served by the (moto)
bucket itself. Bad input exits 2 with one line.

Screenshots are kept in `test-artifacts/` at the repository's root.
"""

from __future__ import annotations

import io
import json
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import boto3
import duckdb
import pytest
from browser import chromium
from hand_made_output import HOSTILE_PATH, make_output
from PIL import Image

from jobs import report as report_job
from mrcnn import storage

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
PAGE_FACTS = """(() => {
  const all = selector => [...document.querySelectorAll(selector)];
  const number = element => Number(element.textContent.replace(/,/g, ""));
  return JSON.stringify({
    images: all("img").map(i => ({src: i.getAttribute("src"), complete: i.complete, width: i.naturalWidth})),
    counts: Object.fromEntries(all("[data-count]").filter(e => e.dataset.count !== "reason")
      .map(e => [e.dataset.count, number(e)])),
    categories: Object.fromEntries(all("[data-category]").map(e => [e.dataset.category, number(e.cells[1])])),
    reasons: Object.fromEntries(all("[data-reason]").map(e => [e.dataset.reason, number(e.cells[1])])),
    tiles: all(".tile").map(t => ({path: t.dataset.path, href: t.querySelector("a").href})),
    codes: all("code").map(c => c.textContent),
    sizes: document.querySelector('img[src="plots/sizes.svg"]').alt,
  });
})()"""


def run(*argv: str) -> int:
    return report_job.main(list(argv))


def duckdb_facts(parquet_glob: str) -> dict:
    """What the page should say, by DuckDB alone."""
    db = duckdb.connect()
    source = f"read_parquet('{parquet_glob}')"
    rows, errors, instances = db.execute(
        f"select count(*), count(error), coalesce(sum(len(scores)), 0) from {source}"
    ).fetchone()
    categories = dict(
        db.execute(
            f"select c, count(*) from (select unnest(categories) c from {source}) group by c"
        ).fetchall()
    )
    reasons = dict(
        db.execute(
            f"select regexp_replace(error, '\\d+', '#', 'g') r, count(*) from {source} "
            "where error is not null group by r"
        ).fetchall()
    )
    small, medium, large = db.execute(
        "select count(*) filter (a < 1024), count(*) filter (a >= 1024 and a < 9216), "
        "count(*) filter (a >= 9216) "
        f"from (select (b[3] - b[1]) * (b[4] - b[2]) a from (select unnest(boxes) b from {source}))"
    ).fetchone()
    segmented = [path for (path,) in db.execute(f"select path from {source} where error is null").fetchall()]
    return {
        "counts": {"rows": rows, "errors": errors, "segmented": rows - errors, "instances": instances},
        "categories": categories,
        "reasons": reasons,
        "sizes": f"Instance sizes: {small:,} small, {medium:,} medium, {large:,} large",
        "segmented": segmented,
    }


def open_report(url: str, profile: Path, screenshot: str) -> tuple[dict, list[str]]:
    """The page's facts and errors in Chromium; its screenshot kept in `test-artifacts/`."""
    with chromium(profile) as page:
        page.open(url)
        facts = json.loads(page.evaluate(PAGE_FACTS))
        kept = page.screenshot(ARTIFACTS / screenshot)
        print(f"screenshot: {kept}")
        return facts, page.errors()


def check_page(facts: dict, errors: list[str], expected: dict, sample: int) -> None:
    assert errors == []
    broken = [image["src"] for image in facts["images"] if not (image["complete"] and image["width"] > 0)]
    assert broken == []
    assert len(facts["images"]) == 4 + sample  # the figures and the thumbnails, nothing injected
    assert {key: facts["counts"][key] for key in expected["counts"]} == expected["counts"]
    assert facts["categories"] == expected["categories"]
    assert facts["reasons"] == expected["reasons"]
    assert facts["sizes"] == expected["sizes"]
    assert HOSTILE_PATH in facts["codes"]  # shown as text, not parsed as HTML
    paths = [tile["path"] for tile in facts["tiles"]]
    assert len(set(paths)) == len(paths) == sample
    assert set(paths) <= set(expected["segmented"])


def full_size(href: str) -> tuple[int, int]:
    with urllib.request.urlopen(href) as answer:
        return Image.open(io.BytesIO(answer.read())).size


@pytest.fixture
def local_output(tmp_path):
    return make_output(str(tmp_path / "data"))


def test_report_opens_cleanly_in_chromium_with_duckdbs_counts_and_the_sample(local_output, tmp_path, capsys):
    out = tmp_path / "report"
    assert (
        run("--predictions", local_output.predictions, "--output", str(out), "--sample", "6", "--seed", "3")
        == 0
    )
    assert f"open {out}/index.html" in capsys.readouterr().out
    facts, errors = open_report((out / "index.html").as_uri(), tmp_path / "profile", "report-local.png")
    check_page(facts, errors, duckdb_facts(f"{local_output.predictions}/*.parquet"), sample=6)
    sizes = {row["path"]: (row["width"], row["height"]) for row in local_output.rows}
    assert [full_size(tile["href"]) for tile in facts["tiles"]] == [
        sizes[tile["path"]] for tile in facts["tiles"]
    ]

    again = tmp_path / "again"
    assert (
        run("--predictions", local_output.predictions, "--output", str(again), "--sample", "6", "--seed", "3")
        == 0
    )
    assert gallery_paths(again) == [tile["path"] for tile in facts["tiles"]]


def test_report_of_an_s3_output_is_served_by_the_bucket(s3_bucket, s3_server, tmp_path):
    made = make_output(s3_bucket)
    bucket = s3_bucket.removeprefix("s3://")
    assert run("--predictions", made.predictions, "--output", f"{s3_bucket}/report", "--sample", "4") == 0
    # What a bucket serving a website needs: anyone may read its objects.
    policy = {
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/*",
            }
        ]
    }
    boto3.client("s3", endpoint_url=s3_server).put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
    local = tmp_path / "parts"
    local.mkdir()
    for uri in storage.iter_files(made.predictions):
        if uri.endswith(".parquet"):
            (local / uri.rsplit("/", 1)[1]).write_bytes(storage.read_bytes(uri))

    facts, errors = open_report(
        f"{s3_server}/{bucket}/report/index.html", tmp_path / "profile", "report-s3.png"
    )
    check_page(facts, errors, duckdb_facts(f"{local}/*.parquet"), sample=4)
    assert all(tile["href"].startswith(f"{s3_server}/{bucket}/report/gallery/") for tile in facts["tiles"])


class _Tiles(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.paths: list[str] = []
        self.drawn: list[str] = []

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        if tag == "figure" and attributes.get("class") == "tile":
            self.paths.append(attributes["data-path"])

    def handle_data(self, data):
        if "instances drawn" in data:
            self.drawn.append(data)


def gallery_paths(folder: Path) -> list[str]:
    parser = _Tiles()
    parser.feed((folder / "index.html").read_text())
    return parser.paths


def test_min_score_and_categories_choose_the_rows_and_the_instances_drawn(local_output, tmp_path):
    out = tmp_path / "report"
    argv = ["--predictions", local_output.predictions, "--output", str(out), "--sample", "50"]
    assert run(*argv, "--min-score", "0.6", "--categories", "square, triangle") == 0
    parser = _Tiles()
    parser.feed((out / "index.html").read_text())
    kept = "lambda x: x[1] >= 0.6 and x[2] in ('square', 'triangle')"
    wanted = duckdb.execute(
        f"select path, len(list_filter(list_zip(scores, categories), {kept})), len(scores) "
        f"from read_parquet('{local_output.predictions}/*.parquet') where error is null order by path"
    ).fetchall()
    wanted = [(path, kept, total) for path, kept, total in wanted if kept]
    assert parser.paths == [path for path, _, _ in wanted]
    assert parser.drawn == [
        f"{path.rsplit('/', 1)[1]}: {kept} of {total} instances drawn" for path, kept, total in wanted
    ]


def test_a_folder_without_parquet_and_an_unwritable_output_exit_2_with_one_line(
    local_output, tmp_path, capsys
):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run("--predictions", str(empty), "--output", str(tmp_path / "r")) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "no Parquet part files" in message and str(empty) in message

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert run("--predictions", local_output.predictions, "--output", str(blocker / "report")) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and "cannot write there" in message
    assert not (tmp_path / "r").exists()
