"""The evidence study's protocol (dpeq_utils.study) on a tiny profile, and the shipped-record lookup."""

import math
import shutil

import pytest
import yaml

from dpeq_utils.config import config_from_profile
from dpeq_utils.paths import profiles_dir, reference_dir
from dpeq_utils.records import RecordError, config_key, find_record, read_record, record_path
from dpeq_utils.runs import load_or_run
from dpeq_utils.shipped import write_manifest
from dpeq_utils.study import FIELDS, OPTIONAL_SECTIONS, Study


@pytest.fixture
def tiny_profile(tmp_path):
    """The smoke profile with a study of 2-step runs: every part, as few runs as the protocol allows."""
    content = yaml.safe_load((profiles_dir() / "smoke.yaml").read_text())
    content["study"].update(
        run={**content["study"]["run"], "train_size": 96, "test_size": 32, "validation_size": 32, "batch_size": 32,
             "physical_batch_size": 32, "update_steps": 2, "device": "cpu"},
        models=["eq_resnet9", "resnet9_matched"], seeds=[0, 1], epsilon_seeds=[0], groups=["C4"], lengths=[4],
        baselines=["modelmix"],
        noise_limited={"steps": 4, "lr_grid": [0.2, 0.5], "seeds": [0, 1], "lr_grid_non_private": [0.05, 0.2],
                       "non_private_seeds": [0]},
        augmentation={"steps": 4, "aug_mult": 2, "seeds": [0]},
        sparsity={"model": "resnet9", "lr_grid": [0.2, 0.5], "seeds": [0, 1], "lr_grid_non_private": [0.05, 0.2],
                  "non_private_seeds": [0]},
        baseline_seeds={"baselines": ["modelmix"], "seeds": [0, 1]})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(content))
    return str(path)


def test_study_chooses_rates_on_validation_and_completes_every_part(tiny_profile, tmp_path):
    study = Study(tiny_profile, runs_dir=tmp_path / "runs")
    planned, waiting = study.plan({})
    assert {p.stage for p in planned} == {"grid", ""} and waiting, "nothing but grids before a rate is chosen"
    assert all(p.config.validation_size == 32 for p in planned)

    trained = study.complete(max_runs=60)
    records = study.records()
    assert trained == len(records) and study.missing(records=records) == []
    _, waiting = study.plan(records)
    assert waiting == []
    for model in ("eq_resnet9", "resnet9_matched"):
        grid = [records[config_key(c)] for c in study.grid(model)]
        best = max(grid, key=lambda r: (r["val_accuracy_ema"], -r["config"]["lr"]))
        assert study.chosen_lr(records, model) == best["config"]["lr"]
        seed1 = study.table("A", records).query("model == @model and seed == 1")
        assert list(seed1["lr"]) == [best["config"]["lr"]], "later seeds run at the rate chosen on validation"
    # the test set chooses nothing: changing a test accuracy does not change any choice
    altered = {k: {**r, "test_accuracy": 1.0 - r["test_accuracy"], "test_accuracy_ema": 0.0} for k, r in records.items()}
    assert study.plan(altered)[0] == study.plan(records)[0]
    parts = {part: study.table(part, records) for part in "ABCDEFGH"}
    assert set(parts["B"]["non_private"]) == {True, False}
    assert sorted(parts["D"]["update_steps"]) == [2, 2, 4, 4]
    longer = [records[key] for key in parts["D"].query("update_steps == 4")["key"]]
    assert [[h["step"] for h in r["history"]] for r in longer] == [[0, 1, 2, 3, 4]] * 2, "learning curves from step 0"
    assert all(set(r["history"][-1]["test_accuracy_ema_horizons"]) == {"0.9", "0.999"} for r in longer)
    assert list(parts["E"]["label"]) == ["equivariant (this paper)", "modelmix", "modelmix seed 1"]
    assert list(parts["E"]["seed"]) == [0, 0, 1], "baseline_seeds adds paired seeds of the baselines it names"
    # F: rates re-chosen at the longer length, on validation, for each model with and without privacy;
    # part D's run at that length is F's grid candidate at the part-A rate when the rates coincide
    for model in ("eq_resnet9", "resnet9_matched"):
        for non_private in (False, True):
            grid = [records[config_key(c)] for c in study.grid(model, non_private, steps=4)]
            assert all(r["steps"] == 4 and r["config"]["non_private"] == non_private for r in grid)
            best = max(grid, key=lambda r: (r["val_accuracy_ema"], -r["config"]["lr"]))
            seeds = parts["F"].query("model == @model and non_private == @non_private and stage == 'seeds'")
            assert set(seeds["lr"]) == {best["config"]["lr"]} and list(seeds["seed"]) == ([0] if non_private else [0, 1])
    assert set(parts["D"]["key"]) & set(parts["F"]["key"]), "part D's 4-step run at the part-A rate is an F candidate"
    # H: part H's model at part F's length with its own grids (not F's), chosen on validation, then its seeds
    assert set(parts["H"]["model"]) == {"resnet9"} and set(parts["H"]["update_steps"]) == {4}
    for non_private, rates, seeds in ((False, [0.2, 0.5], [0, 1]), (True, [0.05, 0.2], [0])):
        grid = [records[config_key(c)] for c in study.grid("resnet9", non_private, steps=4)]
        assert sorted(r["config"]["lr"] for r in grid) == rates
        best = max(grid, key=lambda r: (r["val_accuracy_ema"], -r["config"]["lr"]))
        assert study.chosen_lr(records, "resnet9", non_private, steps=4) == best["config"]["lr"]
        runs = parts["H"].query("non_private == @non_private and stage == 'seeds'")
        assert set(runs["lr"]) == {best["config"]["lr"]} and list(runs["seed"]) == seeds
    assert [g["part"] for g in study.grids(records)].count("H") == 2
    # G: one view against two at the longer length, seed 0; one view at seed 0 is part D's run
    assert sorted(parts["G"]["aug_mult"]) == [1, 1, 2, 2] and set(parts["G"]["update_steps"]) == {4}
    assert len(set(parts["G"]["key"]) & set(parts["D"]["key"])) == 2


def test_study_hands_its_waves_to_a_sweep_executor(tiny_profile, tmp_path):
    """The same study through dpeq_utils.sweep (the debug executor runs the jobs in this process):
    wave after wave as rates get chosen, the same records as training in-process."""
    waves = []
    study = Study(tiny_profile, runs_dir=tmp_path / "runs")
    trained = study.complete(("A",), executor="debug", echo=waves.append)
    records = study.records()
    assert trained == len(records) == 6 and study.missing(("A",), records) == []  # 2 models × (2 rates + seed 1)
    assert waves[0].startswith("[study tiny] 4 runs of part(s) A have no record (no shipped records for this profile")
    assert "train_missing=False" in waves[0], "training is announced before it starts, with the way out"
    assert waves[1:] == ["[study tiny] submitting 4 runs to debug", "[study tiny] submitting 2 runs to debug"]
    again = Study(tiny_profile, runs_dir=tmp_path / "in-process")
    again.complete(("A",))
    assert {k: r["test_accuracy"] for k, r in again.records().items()} == {k: r["test_accuracy"] for k, r in records.items()}


def test_study_section_is_checked(tmp_path):
    content = yaml.safe_load((profiles_dir() / "smoke.yaml").read_text())
    del content["study"]["lengths"]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match="lacks \\['lengths'\\]"):
        Study(str(path))
    assert set(yaml.safe_load((profiles_dir() / "teach.yaml").read_text())["study"]) == {*FIELDS, *OPTIONAL_SECTIONS}
    content["study"]["lengths"] = [8]
    content["study"]["augmentation"] = {"steps": 8, "aug_mult": 4}
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match="study.augmentation must set exactly steps, aug_mult, seeds"):
        Study(str(path))
    content["study"]["augmentation"] = {"steps": 8, "aug_mult": 4, "seeds": [0]}
    content["study"]["sparsity"] = {"model": "resnet9", "lr_grid": [1.0], "seeds": [0], "lr_grid_non_private": [0.1],
                                    "non_private_seeds": [0]}
    path.write_text(yaml.safe_dump(content))
    with pytest.raises(ValueError, match="study.sparsity .* needs study.noise_limited"):
        Study(str(path))


def test_shipped_records_are_found_first_and_verified(tmp_path):
    config = config_from_profile("smoke", train_size=64, test_size=16, batch_size=16, physical_batch_size=16,
                                 update_steps=1, eval_every=0, aug_mult=1)
    record = load_or_run(config, progress=False)  # trained into data/runs/smoke
    user_file = record_path(config)
    shipped = reference_dir("smoke") / user_file.name
    shipped.parent.mkdir(parents=True)
    shutil.copy(user_file, shipped)
    user_file.unlink()

    def bless():  # a lab's own reference folder: its manifest vouches for what it holds (checked in test_shipped)
        write_manifest(reference_dir(), accept=True)
    bless()
    assert find_record(config) == shipped
    assert load_or_run(config)["source"] == str(shipped), "a shipped record is used, nothing is trained"

    # a record copied under another config's name is refused, naming the file
    other = config.replace(lr=0.123)
    impostor = reference_dir("smoke") / record_path(other).name
    shutil.copy(shipped, impostor)
    bless()
    with pytest.raises(RecordError, match=impostor.name):
        load_or_run(other)
    impostor.unlink()
    # an edited ε is refused (even in the manifest); a truncated file names itself
    text = shipped.read_text()
    shipped.write_text(text.replace(f'"epsilon_spent": {record["epsilon_spent"]}', '"epsilon_spent": 50.0'))
    bless()
    with pytest.raises(RecordError, match="not within the target"):
        read_record(shipped)
    shipped.write_text(text[: len(text) // 2])
    bless()
    with pytest.raises(RecordError, match=shipped.name):
        read_record(shipped)


def test_readme_results_are_generated_from_the_shipped_records(monkeypatch):
    """The README's results block is what dpeq_utils.report generates from data/reference/teach/ (every
    shipped record is read, so verified, on the way)."""
    from dpeq_utils import report

    monkeypatch.delenv("DPEQ_REFERENCE_DIR")
    assert report.main(["--check"]) == 0, "run python -m dpeq_utils report after adding shipped records"


def test_the_papers_claims_come_from_the_sourced_docs_not_from_code():
    """docs/fidelity.md holds the paper's claims and the published numbers with their sources; the
    report prints them from there, and no module of the package types them."""
    import re

    from dpeq_utils import report
    from dpeq_utils.paths import REPO_ROOT
    from dpeq_utils.reference import paper_claims, published_table

    claims = paper_claims()
    assert set(claims) == {"accuracy", "parameters", "compute"} and all(c["source"] for c in claims.values())
    assert {"Klause et al. 2022", "De et al. 2022"} <= set(published_table()["source"])
    lines = report.verdicts(Study("teach"))
    assert any(f"~{claims['parameters']['value']:g}× fewer" in line for line in lines)
    for path in (REPO_ROOT / "dpeq_utils").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r">\s*85\s*%|85 % less|~35×|0\.825|0\.814", text), path


def test_the_part_f_intervals_are_the_preregistered_ones():
    """F2 and F3 use Welch intervals (docs/study.md): a two-group contrast equals scipy's Welch test,
    and the four-group difference of privacy costs has Welch–Satterthwaite degrees of freedom."""
    import math

    from scipy import stats

    from dpeq_utils.report import contrast_interval, welch_interval

    a, b = [0.55, 0.57, 0.54, 0.56], [0.50, 0.58, 0.53]
    welch = welch_interval(a, b)
    va, vb = stats.tvar(a) / 4, stats.tvar(b) / 3
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 2)
    assert math.isclose(welch["df"], df) and math.isclose(welch["mean"], sum(a) / 4 - sum(b) / 3)
    assert math.isclose(welch["ci95"], stats.t.ppf(0.975, df) * math.sqrt(va + vb))
    two = contrast_interval([(1, a), (-1, b)])
    assert math.isclose(two["mean"], welch["mean"]) and math.isclose(two["ci95"], welch["ci95"])
    c, d = [0.60, 0.62], [0.41, 0.40, 0.45]
    four = contrast_interval([(1, c), (-1, a), (-1, d), (1, b)])
    assert math.isclose(four["mean"], (sum(c) / 2 - sum(a) / 4) - (sum(d) / 3 - sum(b) / 3))
    v = [stats.tvar(g) / len(g) for g in (c, a, d, b)]
    df4 = sum(v) ** 2 / sum(x ** 2 / (len(g) - 1) for x, g in zip(v, (c, a, d, b)))
    assert math.isclose(four["df"], df4) and math.isclose(four["ci95"], stats.t.ppf(0.975, df4) * math.sqrt(sum(v)))


def test_long_training_is_asked_for_not_started(tiny_profile, tmp_path, monkeypatch):
    """train_missing=None (the notebooks' default) trains only what takes a few minutes; above that it
    says how long and how to ask, and trains nothing. False trains nothing."""
    from dpeq_utils import estimate

    study = Study(tiny_profile, runs_dir=tmp_path / "runs")
    todo = [p.config for p in study.missing(("A",))]
    assert estimate.minutes_to_train(todo, study.profile, study.runs_dir, measure_unknown=False)[0] is None
    minutes, basis = estimate.minutes_to_train(todo, study.profile, study.runs_dir)  # its kinds of step timed here
    doubled, _ = estimate.minutes_to_train([c.replace(update_steps=4) for c in todo], study.profile, study.runs_dir)
    assert 0 < minutes and "timed here" in basis and doubled == pytest.approx(2 * minutes, rel=0.5)
    said = []
    monkeypatch.setattr(estimate, "ASK_ABOVE_MINUTES", 0.0)
    assert study.complete(("A",), train_missing=None, echo=said.append) == 0
    assert len(said) == 1 and said[0].startswith("[tiny] not training the 4 runs of part(s) A that have no record")
    assert "train_missing=True" in said[0] and "study run --profile" in said[0]
    assert study.complete(("A",), train_missing=False, echo=said.append) == 0 and len(said) == 1
    assert study.records() == {}


def test_the_estimate_keeps_kinds_of_step_apart():
    """A DP step of one model says nothing about a non-private step or another group's: an estimate
    needs a record of the same kind of step."""
    from dpeq_utils.sweep import estimate_hours

    base = config_from_profile("smoke", update_steps=10, batch_size=64, aug_mult=2)
    record = {"config": base.to_dict(), "steps": 10, "mean_batch_size": 64.0, "train_time_s": 64.0, "device": "cpu"}
    hours, basis = estimate_hours([base.replace(update_steps=20)], None, [record])
    assert hours == pytest.approx(2 * 64 / 3600)  # twice the steps of the recorded 64 s
    for other in (base.replace(non_private=True), base.replace(group="C4"), base.replace(model="resnet9")):
        hours, basis = estimate_hours([other], None, [record])
        assert hours is None and "no record measures a run like" in basis


def test_the_seed_spread_of_single_runs_is_pooled_over_part_a(monkeypatch):
    """A one-seed row's interval against another comes from part A's seeds: the pooled SD of the
    paired gaps (each model's seeds at its chosen rate), which with equal seed counts is the root
    mean of the per-pair variances; the README's verdict (a) uses exactly that interval."""
    import numpy as np
    from scipy import stats

    from dpeq_utils import report

    monkeypatch.delenv("DPEQ_REFERENCE_DIR")  # the shipped records
    study = Study("teach")
    records = study.records()
    table = study.table("A", records)
    runs = {m: table[(table["model"] == m) & (table["lr"] == study.chosen_lr(records, m))].set_index("seed")["test_accuracy_ema"]
            for m in study.spec["models"]}
    first, *others = study.spec["models"]
    assert all(len(r) == 3 for r in runs.values()), "the shipped part A has three seeds of every model"
    gap_variances = [np.var((runs[first] - runs[o]).to_numpy(), ddof=1) for o in others]
    spread = report.seed_spread(study, records)
    assert spread["gap"]["df"] == 2 * len(others) and spread["run"]["df"] == 2 * len(runs)
    assert np.isclose(spread["gap"]["sd"], np.sqrt(np.mean(gap_variances)))
    assert np.isclose(spread["run"]["sd"], np.sqrt(np.mean([np.var(r.to_numpy(), ddof=1) for r in runs.values()])))
    assert np.isclose(spread["gap"]["ci95"], stats.t.ppf(0.975, spread["gap"]["df"]) * spread["gap"]["sd"])
    line = next(v for v in report.verdicts(study, records) if v.startswith("**(a)"))
    assert f"± {100 * spread['gap']['ci95']:.1f} points (one seed each" in line


def test_a_rate_chosen_at_an_end_of_its_grid_is_named(monkeypatch):
    """The report names each learning rate chosen at an end of its grid (a better rate may lie beyond
    it) and only those: moving which candidate validates best moves the sentence with it."""
    from dpeq_utils import report
    from dpeq_utils.plotting import MODEL_LABELS

    monkeypatch.delenv("DPEQ_REFERENCE_DIR")  # the shipped records
    study = Study("teach")
    records = study.records()
    grids = {(g["part"], g["model"], g["non_private"], g["steps"]): g for g in study.grids(records)}
    assert grids["A", "eq_resnet9", False, None]["rates"] == [0.5, 1.0, 2.0]
    # Study.grids and Study.plan enumerate the searches separately: every grid run the plan trains
    # belongs to a grid the report checks, and no listed grid is one the plan does not train
    searched = {config_key(c) for part, model, non_private, steps in grids for c in study.grid(model, non_private, steps)}
    assert {config_key(p.config) for p in study.plan(records)[0] if p.stage == "grid"} == searched

    def with_best(model, lr):  # part A's grid of `model` now validates best at `lr`
        key = next(config_key(c) for c in study.grid(model) if c.lr == lr)
        return {**records, key: {**records[key], "val_accuracy_ema": 1.0}}

    inside = with_best("resnet9", 1.0)
    assert study.chosen_lr(inside, "resnet9") == 1.0
    sentence = report.grid_edge_sentence(study, inside)
    assert MODEL_LABELS["resnet9"] + " in part A" not in sentence
    at_top = with_best("eq_resnet9", 2.0)
    sentence = report.grid_edge_sentence(study, at_top)
    assert f"{MODEL_LABELS['eq_resnet9']} in part A, lr 2 (the largest of 0.5, 1, 2)" in sentence
    assert f"{MODEL_LABELS['resnet9']} in part A, lr 0.5 (the smallest of 0.5, 1, 2)" in sentence


def test_parts_f_and_g_recomputed_from_the_raw_json_agree_with_the_report(monkeypatch):
    """An independent path to the README's part-F and part-G numbers: the shipped JSON files read with
    ``json``, selected by their config fields, rates chosen by the rule in docs/study.md, intervals by
    hand (mean ± t·sd/√n, Welch–Satterthwaite); nothing of dpeq_utils.study or its tables is used."""
    import json
    import math

    import numpy as np
    from scipy import stats

    from dpeq_utils.report import part_f, part_g

    monkeypatch.delenv("DPEQ_REFERENCE_DIR")
    runs = [json.loads(p.read_text()) for p in sorted((reference_dir("teach")).glob("*.json"))]
    recipe = {"group": "D4", "restrict": True, "head": "pool2x2", "clip_norm": 2.0, "batch_size": 256,
              "target_epsilon": 8.0, "prune_rate": 0.0, "drop_rate": 0.0, "modelmix": False, "train_size": 10000}

    def results(model, steps, non_private=False, views=1):
        """{lr: {seed: EMA val/test accuracy}} of the runs with this recipe."""
        out = {}
        for r in runs:
            c = r["config"]
            if (c["model"], c["update_steps"], c["non_private"], c["aug_mult"]) == (model, steps, non_private, views) \
                    and all(c[k] == v for k, v in recipe.items()):
                seeds = out.setdefault(c["lr"], {})
                assert c["seed"] not in seeds, "one record per rate and seed"
                seeds[c["seed"]] = (r["val_accuracy_ema"], r["test_accuracy_ema"])
        return out

    def chosen(by_lr):  # best seed-0 EMA validation accuracy, ties to the smaller rate
        return max((lr for lr in by_lr if 0 in by_lr[lr]), key=lambda lr: (by_lr[lr][0][0], -lr))

    def test_acc(by_lr, lr=None):
        lr = chosen(by_lr) if lr is None else lr
        return {s: v[1] for s, v in by_lr[lr].items()}

    def paired(a, b):
        d = np.array([a[s] - b[s] for s in sorted(set(a) & set(b))])
        return d.mean(), stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)), d

    def contrast(groups):  # Σ w·mean over independent groups, Welch–Satterthwaite degrees of freedom
        groups = [(w, np.asarray(list(g), dtype=float)) for w, g in groups]
        var = [g.var(ddof=1) / len(g) for _, g in groups]
        df = sum(var) ** 2 / sum(v ** 2 / (len(g) - 1) for v, (_, g) in zip(var, groups))
        return sum(w * g.mean() for w, g in groups), stats.t.ppf(0.975, df) * math.sqrt(sum(var))

    def welch(a, b):
        return contrast([(1, a), (-1, b)])

    def agree(mine, theirs):
        assert math.isclose(mine[0], theirs["mean"], abs_tol=1e-12) and math.isclose(mine[1], theirs["ci95"], rel_tol=1e-9)

    eq, matched = "eq_resnet9", "resnet9_matched"
    study = Study("teach")
    records = study.records()
    f = part_f(study, records)
    dp = {m: test_acc(results(m, 640)) for m in (eq, matched)}
    public = {m: test_acc(results(m, 640, non_private=True)) for m in (eq, matched)}
    assert min(len(dp[eq]), len(dp[matched])) >= 4 and min(len(public[eq]), len(public[matched])) >= 2
    f1 = paired(dp[eq], dp[matched])
    agree(f1, f["F1"])
    at_40 = paired(*(test_acc(results(m, 40)) for m in (eq, matched)))
    agree(welch(f1[2], at_40[2]), f["F2"])
    for m in (eq, matched):
        agree(welch(public[m].values(), dp[m].values()), f["F3"][m])
    agree(contrast([(1, public[eq].values()), (-1, dp[eq].values()), (-1, public[matched].values()),
                    (1, dp[matched].values())]), f["F3_difference"])

    g = part_g(study, records)
    rate = {m: chosen(results(m, 40)) for m in (eq, matched)}  # part G runs each model at its part-A rate
    acc = {(m, k): test_acc(results(m, 160, views=k), rate[m]) for m in (eq, matched) for k in (1, 4)}
    gaps = {k: {s: acc[eq, k][s] - acc[matched, k][s] for s in acc[eq, k] if s in acc[matched, k]} for k in (1, 4)}
    assert set(gaps[1]) == set(gaps[4]) == {0, 1}, "part G: two seeds of all four arms"
    agree(paired(gaps[4], gaps[1]), g["delta_interval"])
    for m in (eq, matched):
        agree(paired(acc[m, 4], acc[m, 1]), g["own_change"][m])


def test_verify_retrains_shipped_records_bit_for_bit_when_code_and_cpu_match(tiny_profile, tmp_path, monkeypatch, capsys):
    """python -m dpeq_utils verify: a shipped record retrained with the same code on the same kind of CPU
    repeats bit for bit; with other code it is judged against the seed spread instead (here it still
    repeats: the arithmetic did not change), and the message says which case it is."""
    from dpeq_utils import provenance, verify
    from dpeq_utils.paths import reference_dir

    study = Study(tiny_profile, runs_dir=reference_dir("tiny"), write_reference=True)
    study.complete(("A",))
    shipped = verify.shipped_records(Study(tiny_profile))
    assert len(shipped) == 6 and all("machine" in r for r in shipped.values())
    assert verify.main(["--profile", tiny_profile, "--sample", "2", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("bit for bit, as expected") == 2 and "within the seed spread of a difference of two runs" in out
    assert "2 record(s) retrained: 2 bit for bit, 2 within the seed spread" in out
    chosen = verify.choose(study, shipped, 2, None, 1)
    assert [r["key"] for r in chosen] == [r["key"] for r in verify.choose(study, shipped, 2, None, 1)], "seeded choice"
    monkeypatch.setitem(provenance.CODE, "source_sha256", "f" * 64)  # as if the package had changed since
    key = sorted(shipped)[0]
    assert verify.main(["--profile", tiny_profile, "--keys", key]) == 0
    out = capsys.readouterr().out
    assert "other code" in out and "as expected" not in out and "1 bit for bit" in out
    with pytest.raises(SystemExit):
        verify.main(["--profile", tiny_profile, "--keys", "0000000000000000"])
    assert "no shipped record of profile tiny has key 0000000000000000" in capsys.readouterr().err


def test_findings_are_decided_from_intervals_and_say_what_is_missing(monkeypatch):
    """The closing section of notebook 05 (report.findings): each comparison is the registered
    estimator's (paired over seeds, Welch for privacy costs) with its interval, the words follow the
    interval, and a comparison without its runs says "not decided yet"."""
    from dpeq_utils.report import findings, paired_gap, part_f
    from dpeq_utils.report.stats import points, verdict_words

    monkeypatch.delenv("DPEQ_REFERENCE_DIR")  # the shipped records
    study = Study("teach")
    records = study.records()
    lines = findings.findings_lines(study, records)
    against = paired_gap(study, "eq_resnet9", "wrn16_4", records)
    assert f"**{verdict_words(against)}** WRN-16-4" in lines[0] and points(against) in lines[0]
    f = part_f(study, records)
    assert points(f["F1"]) in lines[1] and points(paired_gap(study, "eq_resnet9", "resnet9_matched", records)) in lines[1]
    costs = findings.privacy_costs(study, records)
    for model in f["models"]:  # F3's estimator, whatever part H adds
        assert costs["costs"][model] == f["F3"][model]
    assert "at this budget" in lines[3] and lines[-1].startswith("**What this scale cannot say.**")

    # without part A's WRN-16-4 seeds, parts F and H: every such comparison waits and says so
    kept = {k: r for k, r in records.items() if r["config"]["model"] != "wrn16_4" and r["config"]["update_steps"] != 640}
    lines = findings.findings_lines(study, kept)
    assert "not decided yet" in lines[0] and "at 640 steps not decided yet" in lines[1]
    assert findings.privacy_costs(study, kept)["costs"] == {m: None for m in findings.privacy_costs(study, kept)["models"]}

    # an interval that includes 0 is "not distinguishable", whatever the sign of the mean
    table = study.table("A", records)
    wrn = table[(table["model"] == "wrn16_4") & (table["lr"] == study.chosen_lr(records, "wrn16_4"))]
    eq = table[(table["model"] == "eq_resnet9") & (table["lr"] == study.chosen_lr(records, "eq_resnet9"))].set_index("seed")
    shifted = dict(records)
    for offset, (_, row) in zip((0.02, -0.03, 0.0), wrn.iterrows()):  # WRN-16-4 within a few points of each seed
        shifted[row["key"]] = {**records[row["key"]], "test_accuracy_ema": eq.loc[row["seed"], "test_accuracy_ema"] + offset}
    gap = paired_gap(study, "eq_resnet9", "wrn16_4", shifted)
    assert gap["mean"] - gap["ci95"] < 0 < gap["mean"] + gap["ci95"]
    assert "**not distinguishable from** WRN-16-4" in findings.findings_lines(study, shifted)[0]


def test_signal_along_training_is_compared_from_the_probes_intervals():
    """Four probes per point: two models whose probes overlap are 'not distinguishable' however far apart
    their means are; probes well apart decide 'more'/'less'; a point whose interval reaches 0 is unresolved,
    its ratio bounded below only."""
    from dpeq_utils.report.along_training import along_training_findings, points_table

    def record(model, probes_by_step):
        points = [{"step": step, "epsilon": 0.0, "median gradient norm": 1.0, "clipped": 1.0, "mean_cosine": 0.01,
                   "signal_norm": sum(p) / len(p), "signal_norm_probes": p, "noise_norm": 2.0,
                   "noise_to_signal": 2.0 / (sum(p) / len(p))} for step, p in probes_by_step.items()]
        return {"run_key": model, "noise_multiplier": 1.0, "steps_trained": 10, "probes": 4, "probe_size": 64,
                "points": points, "test_accuracy": 0.3, "test_accuracy_ema": 0.3, "git_commit": "abc"}

    found = {"eq_resnet9": record("eq_resnet9", {0: [0.30, 0.31, 0.29, 0.30], 10: [0.05, 0.30, 0.01, 0.20]}),
             "resnet9_matched": record("resnet9_matched", {0: [0.10, 0.11, 0.09, 0.10], 10: [0.02, 0.25, 0.0, 0.15]})}
    table = points_table(found)
    assert table.set_index(["model", "step"])["resolved"].to_dict() == {
        ("eq_resnet9", 0): True, ("eq_resnet9", 10): False, ("resnet9_matched", 0): True, ("resnet9_matched", 10): False}
    assert math.isinf(table.set_index(["model", "step"]).loc[("eq_resnet9", 10), "noise ÷ signal, to"])
    text = along_training_findings(table, found, {})
    assert "more at step 0, less at no step, not distinguishable at step 10" in text
    assert text.count("Which step's signal is longest the probes do not resolve") == 2  # step 10's interval is wide
    tight = points_table({"eq_resnet9": record("eq_resnet9", {0: [0.30, 0.31, 0.29, 0.30], 5: [0.10, 0.11, 0.09, 0.10]})})
    assert "The signal is longest at step 0, above every other step's interval." in along_training_findings(
        tight, {"eq_resnet9": found["eq_resnet9"]}, {})
    assert "at least" in text  # the unresolved end point: a lower bound only


def test_display_names_keep_the_rest_of_a_label():
    from dpeq_utils.plotting import display_name

    assert display_name("eq_resnet9 160 steps") == "equivariant ResNet-9 (paper), 160 steps"
    assert display_name("de_et_al seed 1").endswith(", seed 1") and display_name("de_et_al seed 1").startswith("De et al.")
    assert display_name("DP-SGD, ε = 8") == "DP-SGD, ε = 8" and display_name("resnet9") == "ResNet-9 (same widths)"
