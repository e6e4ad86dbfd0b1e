"""The benchmark's table grows over runs (a run's rows replace the same lines' rows, others are kept), and the
README and the shipped model's card show its rows as it holds them."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from reports import benchmark
from reports.benchmark import CLASSES, merged_table, paired_markdown, table_markdown, table_rows

ROOT = Path(__file__).resolve().parents[1]


def row(line: str, mean: float) -> dict:
    return {
        "line": line,
        "description": f"the {line} line",
        "folds": 10,
        "mean": mean,
        "std": 0.04,
        "val_mean": mean + 0.02,
        "crossfit_mean": mean + 0.01,
        "per_class": dict.fromkeys(CLASSES, mean),
        "minutes": 1.0,
    }


def test_a_run_replaces_its_lines_and_keeps_the_others_in_order() -> None:
    first = "Command: `run one`\n\n" + table_markdown([row("a", 0.80), row("b", 0.81), row("c", 0.82)])
    text = merged_table(first, "Command: `run two`", [row("b", 0.90), row("d", 0.70)])
    lines = text.splitlines()
    commands = [line for line in lines if line.startswith("Command: ")]
    assert commands == ["Command: `run one`", "Command: `run two`"]
    body = [line for line in lines if line.startswith("| the ")]
    assert [line.split("(`")[1].split("`)")[0] for line in body] == ["a", "b", "c", "d"]
    assert "0.900 ± 0.040" in body[1] and "0.810" not in body[1]
    assert "0.800 ± 0.040" in body[0] and "0.700 ± 0.040" in body[3]
    # merging again keeps both commands and adds the third
    again = merged_table(text, "Command: `run three`", [row("a", 0.85)])
    assert sum(line.startswith("Command: ") for line in again.splitlines()) == 3


def test_rows_written_before_the_cross_fit_column_keep_their_figures_under_the_right_heads() -> None:
    old_head = "| line | folds | test macro AUROC (mean ± sd) | val mean | " + " | ".join(CLASSES)
    old_head += " | min |"
    old = "\n".join([
        "Command: `an old run`", "", old_head, "|" + "---|" * 10,
        "| the a line (`a`) | 10 | 0.800 ± 0.040 | 0.820 | 0.1 | 0.2 | 0.3 | 0.4 | 0.5 | 1.0 |",
        "| the k line (`k`) | 10 | 0.790 ± 0.030 |  | 0.1 | 0.2 | 0.3 | 0.4 | 0.5 | 0.2 |",
    ])  # fmt: skip
    text = merged_table(old, "Command: `a new run`", [row("b", 0.90)])
    head, _, *body = [line for line in text.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in [head, *body]]
    assert all(len(c) == len(cells[0]) for c in cells)
    by_head = [dict(zip(cells[0], c, strict=True)) for c in cells[1:]]
    assert [r["val mean"] for r in by_head] == ["0.820", "", "0.920"]
    assert [r["val cross-fit"] for r in by_head] == ["", "", "0.910"]
    assert [r["NORM"] for r in by_head] == ["0.1", "0.1", "0.900"] and by_head[1]["min"] == "0.2"


def test_the_readme_shows_the_benchmark_table_as_reports_benchmark_md_holds_it() -> None:
    benchmark = table_rows((ROOT / "reports" / "benchmark.md").read_text())
    text = (ROOT / "README.md").read_text()
    quality = text[text.index(table_markdown([]).splitlines()[0]) :].split("\n\n", 1)[0]  # its quality table
    readme = table_rows(quality)
    assert len(benchmark) >= 10
    assert list(readme.items()) == list(benchmark.items())  # same lines, same order, same figures


def test_the_shipped_model_card_carries_the_current_benchmark_rows_of_its_lines() -> None:
    from reports.default_model import CARD_LINES, benchmark_table, card

    benchmark = table_rows((ROOT / "reports" / "benchmark.md").read_text())
    rows = table_rows(benchmark_table() or "")
    assert list(rows.items()) == [(k, v) for k, v in benchmark.items() if k in CARD_LINES] and "best" in rows
    folder = ROOT / "models" / "default"
    provenance = json.loads((folder / "version.json").read_text())["provenance"]
    # what `reports/default_model.py --card-only` writes: a card left behind by a benchmark run fails here
    assert (folder / "MODEL_CARD.md").read_text() == card(provenance, benchmark_table())


def test_a_default_run_has_the_baselines_and_every_method_and_leaves_the_recipe_searches_out() -> None:
    from reports.benchmark import RANDOM, SSL, core_lines, lines

    core, every = core_lines(), lines()
    assert set(core) <= set(every) and len(set(core)) == len(core)
    assert {"supervised", "supervised-tiny", "ensemble-tiny", "clinical", "best"} <= set(core)
    assert {f"random-{family}" for family in RANDOM} <= set(core)
    for method in SSL:
        assert {f"{method}-probe", f"{method}-knn", f"{method}-finetune"} <= set(core), method
    assert not [name for name in core if "search" in every[name][0] or "probe40" in name or "-base" in name]
    assert [name for name in every if "search" in every[name][0]]  # the searches exist, run by --lines all


def test_each_simclr_size_has_the_moving_average_search_on_its_own_fine_tune() -> None:
    from reports.benchmark import EMA_SEARCH, lines

    every = lines()
    for name in ("simclr-finetune", "simclr-base-finetune"):
        for decay in EMA_SEARCH:
            description, line = every[f"{name}-ema{decay}"]
            assert line.fields == {**every[name][1].fields, "ema_decay": decay}, name
            assert "search" in description


def test_each_searched_change_is_its_line_with_that_one_change() -> None:
    from reports.benchmark import PRETRAINED_SEARCH, SCRATCH_SEARCH, lines

    every = lines()
    for base, search in (("supervised-tiny", SCRATCH_SEARCH), ("simclr-finetune", PRETRAINED_SEARCH)):
        assert search, base
        for suffix, (change, given) in search.items():
            description, line = every[f"{base}-{suffix}"]
            assert line.fields == {**every[base][1].fields, **given}, suffix
            assert not set(given) & set(every[base][1].fields)  # a change, not a repeat
            assert change in description and "search" in description


def test_paired_differences_are_fold_by_fold_with_their_standard_error() -> None:
    def runs(test: list[float], crossfit: list[float | None]) -> list[dict]:
        return [
            {"macro_auroc": t, "crossfit_val_macro_auroc": c} for t, c in zip(test, crossfit, strict=True)
        ]

    table = paired_markdown(
        "scratch",
        {
            "scratch": runs([0.80, 0.90, 0.70, 0.85], [0.8, 0.8, 0.8, 0.8]),
            "pretrained": runs([0.82, 0.91, 0.69, 0.87], [0.81, 0.83, 0.80, 0.84]),
            "probe": runs([0.76, 0.96, 0.70, 0.87], [None] * 4),  # a line without the validation figure
            "short": runs([0.9], [0.9]),  # fewer folds: no pairs
        },
    )
    rows = {
        line.split("`")[1]: [c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()[2:]
    }
    assert set(rows) == {"pretrained", "probe"}
    # differences 0.02, 0.01, -0.01, 0.02: mean 0.01, sd 0.01414, se 0.00707
    assert rows["pretrained"][1:] == ["+0.010 ± 0.007", "3 of 4", "+0.020 ± 0.009"]
    assert rows["probe"][1:] == ["+0.010 ± 0.021", "2 of 4", ""]  # -0.04, 0.06, 0, 0.02


def test_several_seeds_run_each_line_at_each_and_each_fold_reads_their_mean(monkeypatch) -> None:
    """``--seed 0,1``: every line runs on every fold at both fine-tuning seeds (the seed reaches the line),
    and a fold's figures are the two runs' means, a figure missing at one seed missing, their seconds
    summed; one seed reads its run as it is."""
    ran: list[tuple[str, int, int]] = []

    def line(name: str, crossfit: bool):  # noqa: ANN202
        def run(fold: int, args: argparse.Namespace) -> dict:
            ran.append((name, fold, args.seed))
            score = 0.8 + 0.01 * fold + 0.02 * args.seed
            return {
                "macro_auroc": score,
                "per_class": dict.fromkeys(CLASSES, score - 0.1),
                "val_macro_auroc": score + 0.05,
                "crossfit_val_macro_auroc": score + 0.03 if crossfit or args.seed == 0 else None,
                "seconds": 10.0 + args.seed,
                "recipe": {"seed": args.seed},
            }

        return run

    monkeypatch.setattr(
        benchmark, "lines", lambda: {"a": ("line a", line("a", True)), "b": ("line b", line("b", False))}
    )
    args = argparse.Namespace(seeds=[0, 1], seed="0,1", pretrain_seeds=[0], processes=1)
    runs = benchmark.run_all(["a", "b"], [3, 4], args)

    assert sorted(ran) == sorted((n, f, s) for n in "ab" for f in (3, 4) for s in (0, 1))
    a3 = runs["a"][0]  # fold 3: 0.83 at seed 0, 0.85 at seed 1
    assert a3["macro_auroc"] == pytest.approx(0.84)
    assert a3["per_class"] == pytest.approx(dict.fromkeys(CLASSES, 0.74))
    assert (a3["val_macro_auroc"], a3["crossfit_val_macro_auroc"]) == pytest.approx((0.89, 0.87))
    assert a3["seconds"] == 21.0
    assert runs["a"][1]["macro_auroc"] == pytest.approx(0.85)  # fold 4
    assert runs["b"][0]["crossfit_val_macro_auroc"] is None  # missing at seed 1

    one = benchmark.run_all(
        ["a"], [3], argparse.Namespace(seeds=[1], seed="1", pretrain_seeds=[0], processes=1)
    )
    assert one["a"][0]["macro_auroc"] == pytest.approx(0.85) and one["a"][0]["recipe"] == {"seed": 1}


def test_several_pretraining_seeds_average_a_pretrained_line_and_run_a_line_from_scratch_once(
    monkeypatch,
) -> None:
    """``--pretrain-seed 0,2``: a line that starts from a pretrained encoder runs on every fold from the
    encoder of each pretraining seed and reads their mean; a line without one runs once per fold."""
    ran: list[tuple[str, int, int]] = []

    class Line:
        def __init__(self, name: str, encoder: str | None):
            self.name, self.encoder = name, encoder

        def __call__(self, fold: int, args: argparse.Namespace) -> dict:
            ran.append((self.name, fold, args.pretrain_seed))
            score = 0.8 + 0.01 * fold + 0.01 * args.pretrain_seed
            return {"macro_auroc": score, "per_class": dict.fromkeys(CLASSES, score), "seconds": 1.0}

    table = {
        "pretrained": ("from an encoder", Line("pretrained", "simclr")),
        "scratch": ("", Line("scratch", None)),
    }
    monkeypatch.setattr(benchmark, "lines", lambda: table)
    args = argparse.Namespace(seeds=[0], seed="0", pretrain_seeds=[0, 2], processes=1)
    runs = benchmark.run_all(["pretrained", "scratch"], [3, 4], args)

    assert sorted(ran) == sorted(
        [("pretrained", f, p) for f in (3, 4) for p in (0, 2)] + [("scratch", 3, 0), ("scratch", 4, 0)]
    )
    assert [r["macro_auroc"] for r in runs["pretrained"]] == pytest.approx([0.84, 0.85])  # (0.83 + 0.85) / 2
    assert [r["macro_auroc"] for r in runs["scratch"]] == pytest.approx([0.83, 0.84])
    assert runs["pretrained"][0]["seconds"] == 2.0
    assert benchmark.pretraining_seeds([0]) == ""
    assert "pretraining seeds [0, 2]" in benchmark.pretraining_seeds([0, 2])


@pytest.mark.parametrize(("flag", "given"), [("--seed", "0,x"), ("--pretrain-seed", "1,,2")])
def test_a_seed_that_is_not_a_number_is_refused_naming_what_was_expected(flag: str, given: str) -> None:
    done = subprocess.run(
        [sys.executable, "reports/benchmark.py", "--lines", "clinical", flag, given],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode != 0 and f"{flag} {given}: a seed or comma-separated seeds" in done.stderr


def test_a_cached_job_runs_again_when_the_recipe_its_parameters_resolve_to_has_changed(
    tmp_path: Path, monkeypatch
) -> None:
    """A family's default recipe changed since the job ran (its parameters, which leave the default out, did
    not): the cached result is stale and the job runs again; an unchanged recipe reads the cache."""
    import reports.benchmark as benchmark
    from services.jobs.params import FinetuneParams

    ran: list[float] = []

    def run_job(kind: str, params: FinetuneParams) -> dict:
        recipe = params.recipe("resnet1d", "tiny") | {"learning_rate": current["learning_rate"]}
        ran.append(recipe["learning_rate"])
        return {"result": {"recipe": {**recipe, "amp": None}}, "version": "v@1", "seconds": 1.0}

    monkeypatch.setattr(benchmark, "run_job", run_job)
    params = FinetuneParams(dataset="ptbxl-500", method="finetune", model="simclr@1", test_fold=3)
    current = params.recipe("resnet1d", "tiny")
    assert benchmark.shared_job(params, tmp_path, current)["result"]["recipe"]["learning_rate"] == 1e-3
    assert benchmark.shared_job(params, tmp_path, current) and ran == [1e-3]  # cached
    current = current | {"learning_rate": 1e-2}  # the default moved
    assert benchmark.shared_job(params, tmp_path, current)["result"]["recipe"]["learning_rate"] == 1e-2
    assert ran == [1e-3, 1e-2] and len(list(tmp_path.glob("job-*.json"))) == 1


def test_two_processes_of_a_run_never_make_one_thing_at_once(tmp_path: Path) -> None:
    """A job's output (or an encoder) is made under its lock: another process finds it Busy, and tries it
    again later (reports.benchmark.run_all) instead of making it twice; the lock goes with its holder."""
    from reports.benchmark import Busy, claimed

    made = tmp_path / "job-0123.json"
    holder = "from pathlib import Path; from reports.benchmark import claimed\n"
    holder += f"with claimed(Path({str(made)!r})): print('held', flush=True); input()"
    other = subprocess.Popen([sys.executable, "-c", holder], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert other.stdout.readline().strip() == "held"
        with pytest.raises(Busy, match="job-0123.json"), claimed(made):
            pass
    finally:
        other.communicate("\n", timeout=60)
    # released when its holder let go; and one process holding it finds it busy too
    with claimed(made), pytest.raises(Busy), claimed(made):
        pass


def test_the_clinical_line_runs_first_on_a_new_work_folder(tmp_path: Path) -> None:
    """The clinical line builds the labelled cache itself when no job of the run has (it polled the cancel
    flag of a job row that does not exist, and failed); its test fold reads a real macro AUROC."""
    done = subprocess.run(
        [sys.executable, "reports/benchmark.py", "--lines", "clinical", "--folds", "1", "--processes", "1",
         "--work", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    kept = json.loads((tmp_path / "clinical-fold1.json").read_text())
    assert 0.55 < kept["macro_auroc"] < 1.0 and set(kept["per_class"]) == set(CLASSES)


def test_a_line_without_an_encoder_runs_in_processes_whatever_the_pretraining_seeds(tmp_path: Path) -> None:
    """With ``--pretrain-seed 1,2`` a line that needs no encoder (clinical) starts in the process pool at
    once: it waits for no pretraining (it waited forever for a seed-0 encoder before)."""
    done = subprocess.run(
        [sys.executable, "reports/benchmark.py", "--lines", "clinical", "--folds", "1", "--processes", "2",
         "--threads", "1", "--pretrain-seed", "1,2", "--work", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "pretraining seeds [1, 2]" in done.stdout and (tmp_path / "clinical-fold1.json").is_file()
