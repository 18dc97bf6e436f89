"""Reports: the CLI and the API agree (same query code), options are validated, and the HTML page renders
with its plots in headless Chromium."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import struct
import subprocess
import zlib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.errors import install_error_handlers
from api.routes_reports import router as reports_router
from energy.ledger import Ledger
from energy.records import AttributionRow, RunInfo, RunKind, Source, TurnRecord
from energy.reports import GroupBy, build_report, row_totals
from orchestrator.cli import app as cli_app

T0 = datetime(2025, 3, 1, 12, tzinfo=UTC)


def populate(url: str) -> None:
    """Two runs (two policies), two engines on two tiers, measured and modelled rows, idle rows."""
    for run, policy, source, scale in (
        ("r1", "conserve", Source.MEASURED, 1.0),
        ("r2", "colocated", Source.MODELLED, 1.5),
    ):
        lg = Ledger(url, run_id=run, policy=policy)
        lg.upgrade()
        lg.start_run(RunInfo(run, RunKind.SERVE, policy, started_at=T0))
        turns, rows = [], []
        for c in range(6):
            cid = f"{run}-c{c}"
            for k in (1, 2):
                at = T0 + timedelta(seconds=10 * c + 4 * k)
                turns.append(
                    TurnRecord(
                        cid,
                        k,
                        f"{cid}-{k}",
                        "d0",
                        arrival_at=at,
                        first_token_at=at + timedelta(seconds=1),
                        last_token_at=at + timedelta(seconds=3),
                        prompt_tokens=1000 * k,
                        output_tokens=50,
                        is_final=k == 2,
                        tier="a40@200W/tp1",
                        prefill_instance_id="p0",
                        remote_prefill=k == 1,
                    )
                )
                rows.append(
                    AttributionRow(
                        at,
                        at + timedelta(seconds=1),
                        "p0" if k == 1 else "d0",
                        cid,
                        k,
                        scale * (100.0 + c),
                        0.5,
                        source,
                        "h100" if k == 1 else "a40@200W/tp1",
                    )
                )
                rows.append(
                    AttributionRow(
                        at,
                        at + timedelta(seconds=1),
                        "d0",
                        None,
                        None,
                        scale * 20.0,
                        0.5,
                        source,
                        "a40@200W/tp1",
                    )
                )
        lg.record_turns(turns)
        lg.record_attributions(rows)
        lg.close()


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    populate(url)
    return url


@pytest.fixture
def client(db_url: str):
    app = FastAPI()
    app.state.ledger = Ledger(db_url)
    install_error_handlers(app)
    app.include_router(reports_router)
    with TestClient(app) as c:
        yield c
    app.state.ledger.close()


def cli(*args: str):
    return CliRunner().invoke(cli_app, ["report", "energy", *args])


@pytest.mark.parametrize("by", [g.value for g in GroupBy], ids=[g.value for g in GroupBy])
def test_cli_and_api_agree(by: str, db_url: str, client: TestClient) -> None:
    since, until = (T0 + timedelta(seconds=5)).isoformat(), (T0 + timedelta(seconds=45)).isoformat()
    res = cli("--db", db_url, "--by", by, "--since", since, "--until", until, "--json")
    assert res.exit_code == 0, res.output
    from_cli = json.loads(res.stdout)
    api = client.get("/v1/reports/energy", params={"by": by, "since": since, "until": until})
    assert api.status_code == 200, api.text
    assert api.json() == from_cli
    assert from_cli["rows"], "the window should select rows"
    csv_api = client.get(
        "/v1/reports/energy", params={"by": by, "since": since, "until": until, "format": "csv"}
    )
    res_csv = cli("--db", db_url, "--by", by, "--since", since, "--until", until, "--format", "csv")
    assert csv_api.text == res_csv.stdout


def test_policy_report_counts_tokens_and_all_energy(db_url: str) -> None:
    with Ledger(db_url) as lg:
        rep = build_report(lg, GroupBy.POLICY)
    rows = {r["policy"]: r for r in rep.rows}
    tokens_per_run = 6 * (1000 + 50 + 2000 + 50)
    conserve_j = sum(100.0 + c + 20.0 for c in range(6)) * 2
    assert rows["conserve"]["tokens"] == tokens_per_run
    assert rows["conserve"]["joules"] == pytest.approx(conserve_j)
    assert rows["conserve"]["idle_j"] == pytest.approx(6 * 2 * 20.0)
    assert rows["conserve"]["tokens_per_j"] == pytest.approx(tokens_per_run / conserve_j)
    assert rows["conserve"]["measured_share"] == 1.0 and rows["colocated"]["measured_share"] == 0.0
    assert rep.totals["measured_share"] == pytest.approx(conserve_j / (conserve_j * 2.5))
    conv = {(r["run_id"], r["conversation_id"]): r for r in build_report(Ledger(db_url), "conversation").rows}
    c0 = conv[("r1", "r1-c0")]
    assert c0["joules"] == pytest.approx(200.0) and c0["tokens"] == 3100
    assert c0["j_per_token"] == pytest.approx(200.0 / 3100)
    assert c0["ttfet_s"] == pytest.approx(5.0)  # turn 1 at +4 s, final turn's first token at +9 s
    assert set(c0["tiers"]) == {"a40@200W/tp1", "h100"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--by", "tiers"],
            "--by 'tiers' is not one of conversation, tier, policy, engine. Did you mean 'tier'?",
        ),
        (["--format", "xml"], "--format 'xml' is not one of"),
        (["--since", "yesterday"], "--since 'yesterday' is not an ISO 8601 time"),
        (["--since", "2025-03-02", "--until", "2025-03-01"], "must be after --since"),
    ],
    ids=["by", "format", "since", "window"],
)
def test_cli_bad_options_fail_in_one_line(args: list[str], message: str, db_url: str) -> None:
    res = cli("--db", db_url, *args)
    assert res.exit_code == 1
    assert message in res.output.replace("\n", " ") or message in " ".join(res.output.split())
    assert "Traceback" not in res.output


def test_cli_missing_ledger_file_is_explained(tmp_path: Path) -> None:
    res = cli("--db", f"sqlite:///{tmp_path / 'nope.db'}")
    assert res.exit_code == 1 and "does not exist" in res.output
    assert not (tmp_path / "nope.db").exists()


def test_api_bad_options_are_4xx_json(client: TestClient) -> None:
    for params in (
        {"by": "tiers"},
        {"since": "yesterday"},
        {"format": "xml"},
        {"until": "0001-01-01T00:00:00+01:00"},  # valid ISO 8601, outside datetime's UTC range
        {"since": "2025-03-02", "until": "2025-03-01"},
    ):
        r = client.get("/v1/reports/energy", params=params)
        assert 400 <= r.status_code < 500, (params, r.status_code, r.text)
        assert "error" in r.json()


def test_cli_writes_table_and_out_file(db_url: str, tmp_path: Path) -> None:
    res = CliRunner().invoke(
        cli_app, ["report", "energy", "--db", db_url, "--by", "policy"], env={"COLUMNS": "250"}
    )
    assert res.exit_code == 0 and "energy by policy" in res.stdout and "conserve" in res.stdout
    out = tmp_path / "r.csv"
    res = cli("--db", db_url, "--by", "engine", "--format", "csv", "--out", str(out))
    assert res.exit_code == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert {r["engine_id"] for r in rows} == {"p0", "d0"}


# ---- HTML in headless Chromium -----------------------------------------------------------------------
def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _png_colours(path: Path) -> int:
    """Distinct RGB(A) values of an 8-bit non-interlaced PNG (tells a blank page from a report)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, ctype = 8, b"", 0, 0, 0
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        chunk = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, depth, ctype = struct.unpack(">IIBB", chunk[:10])
            assert depth == 8
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    bpp = {2: 3, 6: 4}[ctype]
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    colours: set[bytes] = set()
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1 : (y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = line
        if y % 4 == 0:
            colours.update(bytes(line[i : i + 3]) for i in range(0, stride, bpp * 4))
    return len(colours)


def test_html_report_renders_in_headless_chromium(db_url: str, tmp_path: Path, require_or_skip) -> None:
    browser = _chromium()
    if browser is None:
        require_or_skip("CONSERVE_REQUIRE_CHROMIUM", "chromium not installed (apt-get install chromium)")
    page = tmp_path / "report.html"
    res = cli("--db", db_url, "--by", "policy", "--format", "html", "--out", str(page))
    assert res.exit_code == 0, res.output
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # self-contained
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    env = {**os.environ, "HOME": str(tmp_path)}
    dom = subprocess.run(
        [browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, env=env
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    for plot_id in ("plot-conversation-energy", "plot-tier-timeline", "plot-policy-tokens-per-j"):
        assert f'id="{plot_id}"' in dom.stdout and "data:image/png;base64," in dom.stdout
    assert 'id="report-table"' in dom.stdout and "conserve" in dom.stdout
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [
            browser,
            *flags,
            f"--screenshot={shot}",
            "--window-size=1280,1600",
            "--hide-scrollbars",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    assert shot.stat().st_size > 20_000
    assert _png_colours(shot) > 50  # plots and text, not a blank single-colour page
    keep = os.environ.get("CONSERVE_KEEP_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)


def test_row_totals_weigh_the_measured_share_by_joules() -> None:
    rows = [
        {"tokens": 100, "joules": 300.0, "measured_share": 1.0},
        {"tokens": 50, "joules": 100.0, "measured_share": 0.0},
        {"tokens": 10, "joules": None, "measured_share": None},  # a conversation without energy rows yet
    ]
    t = row_totals(rows)
    assert (t["tokens"], t["joules"]) == (160, 400.0)
    assert t["measured_share"] == pytest.approx(0.75)  # 300 J of 400 J measured, not the mean of 1.0 and 0.0
    assert t["tokens_per_j"] == pytest.approx(0.4) and t["j_per_token"] == pytest.approx(2.5)
    empty = row_totals([])
    assert (empty["tokens_per_j"], empty["j_per_token"], empty["measured_share"]) == (None, None, None)
