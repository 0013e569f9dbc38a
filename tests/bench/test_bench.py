"""``reformer bench``: rows, JSON, plot, timeouts, bad input and help (tiny sizes, a few seconds)."""

import json
import subprocess
import sys

import pytest
import torch

from reformer import bench, cli

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROW_FIELDS = {"impl", "length", "hashes", "layers", "ms", "peak_mib", "status"}
ENV_FIELDS = {"device_name", "torch_version", "threads"}


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    """One small attention sweep through the CLI (8 configurations, one subprocess each)."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "--lengths", "128,256", "--hashes", "1,2", "--repeats", "1", "--no-progress"]
    argv += ["--json", str(out / "rows.json"), "--plot", str(out / "plot.png")]
    argv += ["--markdown", str(out / "table.md")]
    assert cli.main(argv) == 0
    return out


def test_sweep_writes_one_row_per_configuration(tiny_sweep, capsys):
    doc = json.loads((tiny_sweep / "rows.json").read_text())
    rows = doc["rows"]
    impls = [f"{impl}@{length}" for impl in ("lsh-1", "lsh-2", "local", "full") for length in (128, 256)]
    assert sorted(f"{r['impl']}@{r['length']}" for r in rows) == sorted(impls)
    for r in rows:
        assert set(r) >= ROW_FIELDS | ENV_FIELDS, r
        assert r["status"] == "ok", r
        assert r["ms"] > 0 and r["peak_mib"] >= 0
        assert r["torch_version"] == torch.__version__ and r["threads"] >= 1
        assert r["hashes"] == (int(r["impl"][4:]) if r["impl"].startswith("lsh") else None)
        assert r["layers"] == 1 and r["batch"] == 1
    assert doc["environment"]["torch_version"] == torch.__version__


def test_sweep_writes_png_and_markdown(tiny_sweep):
    assert (tiny_sweep / "plot.png").read_bytes()[:8] == PNG_SIGNATURE
    table = (tiny_sweep / "table.md").read_text()
    assert table.startswith("| impl | L |") and table.count("\n") == 2 + 8


def test_timeout_is_recorded_and_sweep_goes_on(tmp_path, capsys):
    path = tmp_path / "rows.json"
    argv = ["bench", "--lengths", "128", "--hashes", "1", "--repeats", "1", "--timeout", "0.01"]
    assert cli.main([*argv, "--no-progress", "--json", str(path), "--plot", str(tmp_path / "p.png")]) == 0
    rows = json.loads(path.read_text())["rows"]
    assert [r["impl"] for r in rows] == ["lsh-1", "local", "full"]
    assert all(r["status"] == "timeout" and r["ms"] is None for r in rows)
    assert "timeout" in capsys.readouterr().out
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_SIGNATURE  # a plot even with no finished point


def test_out_of_memory_is_recorded():
    # An address-space cap below what torch alone maps makes the first large allocation fail.
    row = bench.run_config(bench.BenchConfig("full", 4096, repeats=1), timeout_s=60, mem_limit_gib=0.25)
    assert row["status"] == "oom" and "allocate" in row["error"], row
    assert row["impl"] == "full" and row["ms"] is None


def test_model_configuration_in_process():
    cfg = bench.BenchConfig("model", 128, hashes=2, layers=2, reversible=True, repeats=1)
    assert cfg.impl == "model-rev-2"
    result = bench.run_in_process(cfg)
    assert result["status"] == "ok", result
    assert result["ms"] > 0 and len(result["times_ms"]) == 1


def test_failing_configuration_is_recorded_not_raised():
    result = bench.run_in_process(bench.BenchConfig("nonsense", 128))
    assert result["status"] == "error" and "nonsense" in result["error"]


def test_plans():
    parser = cli.build_parser()
    plan = lambda argv: bench.plan(parser.parse_args(argv), parser)
    model = plan(["bench", "--what", "model", "--lengths", "512", "--layers", "2,6"])
    assert [c.impl for c in model] == ["model-rev-2", "model-plain-2", "model-rev-6", "model-plain-6"]
    paper = plan(["bench", "--paper-figure"])
    assert {(c.length, c.batch) for c in paper} == {(n, 32768 // n) for n in bench.PAPER_LENGTHS}
    assert {c.impl for c in paper} == {"full", "lsh-1", "lsh-2", "lsh-4", "lsh-8"}
    default = plan(["bench"])
    assert len(default) == len(bench.DEFAULT_ATTENTION_LENGTHS) * 6


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--lengths", "0"], "0 is not a positive length"),
        (["--lengths", "128,-5"], "-5"),
        (["--hashes", "abc"], "'abc' is not an integer"),
        (["--layers", "2", "--what", "attention"], "--layers 2 applies to --what model"),
        (["--hashes", "2", "--what", "model"], "--hashes 2 applies to --what attention"),
        (["--dtype", "float16"], "'float16'"),
        (["--what", "everything"], "'everything'"),
        (["--repeats", "0"], "0 must be at least 1"),
        (["--timeout", "-1"], "-1 must be more than 0"),
        (["--device", "tpu"], "--device 'tpu' is unknown"),
        (["--paper-figure", "--lengths", "65536"], "65536 is over the 32768 tokens"),
    ],
)
def test_bad_arguments_exit_nonzero_naming_the_value(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv])
    assert exc.value.code != 0
    assert needle in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_says_so(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--device", "cuda"])
    assert exc.value.code != 0
    assert "--device cuda: CUDA is not available" in capsys.readouterr().err


def test_help(capsys):
    for argv in (["--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "bench" in out and "--paper-figure" in out and "--timeout" in out
    assert cli.main([]) == 2  # no command: usage on stderr


def test_python_dash_m_reformer_help():
    proc = subprocess.run(
        [sys.executable, "-m", "reformer", "bench", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and "--lengths" in proc.stdout
