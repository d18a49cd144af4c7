"""`tiltgen bench world`'s pieces: the stage cache, intervals, the summary against the oracle,
the headline ratio and the reports (the full run is a benchmark, not a test)."""

import json

import pytest
import torch

from tiltgen.eval.world_bench import (BenchSettings, StageCache, bootstrap_interval, headline, markdown, plot,
                                      quick_settings, summarise)


def test_stage_cache_computes_once_and_keys_by_content(tmp_path):
    cache = StageCache(tmp_path)
    calls = []

    def compute(folder):
        calls.append(folder)
        return {"value": len(calls)}

    assert cache.get("sample", {"a": 1}, compute)["value"] == 1
    assert cache.get("sample", {"a": 1}, compute)["value"] == 1  # a rerun (e.g. after a kill) reuses it
    assert cache.get("sample", {"a": 2}, compute)["value"] == 2
    assert len(calls) == 2 and calls[0] != calls[1]
    assert not list(tmp_path.glob(".*.tmp"))


def test_stage_cache_leaves_no_result_when_a_stage_dies(tmp_path):
    cache = StageCache(tmp_path)

    def dies(folder):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get("finetune", {"a": 1}, dies)
    assert cache.get("finetune", {"a": 1}, lambda folder: {"ok": True})["ok"] is True


def test_fresh_run_wall_sums_each_used_stage_once_from_what_it_recorded(tmp_path):
    settings = BenchSettings()
    first = StageCache(tmp_path)
    first.get("oracle", {"a": 1}, lambda folder: {"wall_s": 1.0})
    recorded = first.get("oracle", {"a": 1}, lambda folder: {})["stage_wall_s"]
    assert recorded >= 0 and first.fresh_run_wall(settings)["stages"] == 1  # fetched twice, counted once
    # a stage cached before whole-stage walls were recorded: its own times are used
    (tmp_path / f"{StageCache(tmp_path).path('sample', {'b': 1}).name}.json").write_text(
        json.dumps({"sampling_wall_per_image": 0.5}))
    (tmp_path / f"{StageCache(tmp_path).path('guidance-cost', {'c': 1}).name}.json").write_text(json.dumps({}))
    second = StageCache(tmp_path)  # a rerun that finds everything cached
    second.get("oracle", {"a": 1}, lambda folder: pytest.fail("recomputed"))
    second.get("sample", {"b": 1}, lambda folder: pytest.fail("recomputed"))
    second.get("guidance-cost", {"c": 1}, lambda folder: pytest.fail("recomputed"))
    fresh = second.fresh_run_wall(settings)
    sampling = 0.5 * settings.n * len(settings.prompts)
    assert fresh["by_kind_s"] == {"oracle": recorded, "sample": sampling}
    assert fresh["total_s"] == pytest.approx(recorded + sampling)
    assert fresh["stages"] == 3 and len(fresh["stages_without_wall"]) == 1 and fresh["stages_with_partial_wall"] == 1
    text = markdown({"settings": settings.to_json(), "rows": [], "wall_s": 1.0, "headline": {},
                     "fresh_run_wall": fresh})
    assert "With an empty cache" in text and "1 stage(s) recorded no wall time" in text
    assert "1 stage(s) cached before whole-stage times were recorded" in text


def test_bootstrap_interval_covers_the_mean_and_narrows_with_data():
    g = torch.Generator().manual_seed(0)
    small = [[(torch.randn(8, generator=g) + 1).tolist(), (torch.randn(8, generator=g) - 1).tolist()]]
    big = [[(torch.randn(512, generator=g) + 1).tolist(), (torch.randn(512, generator=g) - 1).tolist()]]
    lo_s, hi_s = bootstrap_interval(small, 500)
    lo_b, hi_b = bootstrap_interval(big, 500)
    assert lo_b < 0.0 < hi_b and hi_b - lo_b < 0.5 * (hi_s - lo_s)
    assert bootstrap_interval([[[None, None]]], 10) is None


def _stage(proxy, gold, hist):
    return {"prompts": [{"prompt": "p", "proxy": proxy, "gold": gold, "binary": [1.0] * len(proxy),
                         "fidelity": [None] * len(proxy), "diversity": 0.1, "histograms": hist}],
            "sampling_flops_per_image": 10, "sampling_wall_per_image": 0.01}


def test_summary_measures_the_share_of_the_exact_gain_and_the_distance_to_p_star():
    settings = BenchSettings(prompts=("p",), bootstrap=50)
    oracle = {"prompts": {"p": {"base": {"proxy": 0.4, "gold": 0.4}, "tilted": {"proxy": 0.8, "gold": 0.7},
                                "ess": 12.0, "histograms": {"colour": {"red": 1.0}}}}}
    seeds = [_stage([0.5, 0.7], [0.5, 0.5], {"colour": {"red": 0.5, "blue": 0.5}}),
             _stage([0.6, 0.6], [0.6, 0.6], {"colour": {"red": 1.0}})]
    out = summarise(seeds, oracle, settings)
    assert out["proxy"] == pytest.approx(0.6) and out["gold"] == pytest.approx(0.55)
    assert out["fraction_of_exact_gain"] == pytest.approx(0.5)  # (0.6 - 0.4) / (0.8 - 0.4)
    assert out["attribute_tv"] == pytest.approx(0.25)  # mean of 0.5 and 0
    assert out["oracle_ess"] == 12.0 and out["seeds"] == 2 and out["fidelity"] is None


def _row(model, method, proxy, total, family="sampling", budget=None):
    return {"model": model, "method": method, "proxy": proxy, "family": family, "budget": budget,
            "compute": {"total_flops": total}}


def test_headline_ratio_and_its_absence():
    rows = [_row("onestep", "learned", 0.60, 2e12),
            _row("diffusion", "finetune-rwdsm", 0.55, 1e13, "finetune", 100),
            _row("diffusion", "finetune-rwdsm", 0.58, 2e13, "finetune", 200)]
    h = headline(rows)
    assert h["reached"] and h["ratio"] == pytest.approx(0.1)
    assert h["best_finetune"]["budget"] == 200
    rows.append(_row("diffusion", "finetune-draft", 0.70, 4e13, "finetune", 50))
    h = headline(rows)
    assert not h["reached"] and h["ratio"] is None
    cheapest = h["cheapest_finetune_matching_learned"]
    assert cheapest["method"] == "finetune-draft" and cheapest["ratio"] == pytest.approx(0.05)


def test_hacking_flag_follows_each_curve_not_only_the_base():
    """A fine-tuning curve whose gold falls from budget to budget while its proxy climbs is
    flagged even though its gold stays above the base model's; a row above the base on both is
    not; a guided row with proxy up and gold down against the base is."""
    from tiltgen.eval.world_bench import flag_reward_hacking

    def row(method, proxy, gold, budget=None, ci=0.01):
        return {"model": "m", "method": method, "proxy": proxy, "gold": gold, "budget": budget,
                "gold_ci": (gold - ci, gold + ci)}

    base = row("unguided", 0.5, 0.5)
    curve = [row("finetune-draft", 0.8, 0.70, 50), row("finetune-draft", 1.5, 0.65, 100, ci=0.1),
             row("finetune-draft", 3.0, 0.58, 400)]
    honest = row("learned", 0.7, 0.6)
    hacked = row("tweedie", 0.9, 0.4)
    rows = [base, honest, hacked] + curve
    flag_reward_hacking(rows, {"m": base})
    assert not base["hacking"] and not honest["hacking"] and not curve[0]["hacking"]
    assert hacked["hacking"] and hacked["hacking_beyond_noise"] and hacked["hacking_against"] == "unguided"
    assert curve[1]["hacking"] and not curve[1]["hacking_beyond_noise"] and curve[1]["hacking_against"] == "@50"
    assert curve[2]["hacking"] and curve[2]["hacking_beyond_noise"] and curve[2]["hacking_against"] == "@50"
    text = markdown({"settings": BenchSettings().to_json(), "wall_s": 1.0, "headline": {},
                     "rows": [dict(r, proxy_ci=None, fidelity=None, binary=None, diversity=None,
                                   fraction_of_exact_gain=None, attribute_tv=None, oracle_ess=None,
                                   compute={"data_flops": 0, "train_flops": 0, "sampling_flops_per_image": 1,
                                            "total_flops": 1, "total_wall_s": 1.0}) for r in rows]})
    assert "m finetune-draft @400 (against @50)" in text and "m tweedie (against unguided)" in text


def test_reports_are_written(tmp_path):
    compute = {"data_flops": 0, "train_flops": 0, "sampling_flops_per_image": 5, "total_flops": 5e4,
               "total_wall_s": 1.0}
    row = {"model": "onestep", "method": "unguided", "proxy": 0.5, "proxy_ci": (0.4, 0.6), "gold": 0.5,
           "gold_ci": (0.4, 0.6), "fidelity": 0.9, "binary": 1.0, "diversity": 0.2, "fraction_of_exact_gain": 0.0,
           "attribute_tv": 0.1, "oracle_ess": 3.0, "compute": compute, "hacking": True, "hacking_beyond_noise": False}
    result = {"settings": BenchSettings().to_json(), "rows": [row], "wall_s": 1.0, "headline": {}}
    text = markdown(result)
    assert "| onestep | unguided |" in text and "within noise" in text
    assert plot(result, tmp_path / "p.png").stat().st_size > 0
    json.dumps(result)


def test_quick_settings_are_smaller():
    quick, full = quick_settings(), BenchSettings()
    assert quick.seeds == 1 and full.seeds >= 3
    assert all(quick.oracle_n[k] < full.oracle_n[k] for k in full.oracle_n)
    assert full.oracle_n["onestep"] >= 4096


def test_guidance_seeds_rerun_the_shipped_recipe():
    from tiltgen.eval.world_bench import shipped_recipe

    for name in ("diffusion", "onestep"):
        args = shipped_recipe(name)
        assert "--out" not in args and "--seed" not in args and "--" in args
        assert args[args.index("--model") + 1] == f"builtin:world-{name}"


def test_headline_can_require_kept_fidelity():
    rows = [_row("onestep", "learned", 0.60, 2e12),
            dict(_row("diffusion", "finetune-draft", 0.90, 1e12, "finetune", 50), fidelity_change=-0.3),
            dict(_row("diffusion", "finetune-rwdsm", 0.55, 1e13, "finetune", 100), fidelity_change=-0.02)]
    assert not headline(rows)["reached"]
    kept = headline(rows, 0.05)
    assert kept["best_finetune"]["method"] == "finetune-rwdsm" and kept["ratio"] == pytest.approx(0.2)


def test_stages_split_over_processes_cover_every_stage_once(tmp_path, monkeypatch):
    """Under torchrun each process computes stage i mod N of each phase: together every oracle,
    training run and sampling row exactly once (the stage functions are stubbed here)."""
    import tiltgen.eval.world_bench as wb
    from tiltgen.core.distributed import Processes

    settings = BenchSettings(seeds=2, particles=(2,), finetune_steps=4, budgets=(2, 4))
    calls: dict[int, list] = {0: [], 1: []}
    rank = {"now": 0}
    monkeypatch.setattr(wb, "oracle_stage", lambda c, j, name, s, p: calls[rank["now"]].append(("oracle", name)))
    monkeypatch.setattr(wb, "guidance_stage", lambda c, name, seed, p: f"guidance-{name}-{seed}")

    def finetune(c, method, name, seed, s, p):
        calls[rank["now"]].append(("finetune", method, name, seed))
        return {"budgets": {str(b): f"ft-{method}-{name}-{seed}-{b}" for b in s.budgets}}

    monkeypatch.setattr(wb, "finetune_stage", finetune)
    monkeypatch.setattr(wb, "sampling_stage", lambda c, j, name, path, method, s, particles=1, guidance=None:
                        calls[rank["now"]].append(("sample", name, path, method, particles, guidance)))
    monkeypatch.setattr(wb, "Judges", lambda: None)
    for r in (0, 1):
        rank["now"] = r
        wb.fill_stages_in_parallel(settings, tmp_path, Processes(rank=r, world_size=2), progress=False)
    samples = [c for r in (0, 1) for c in calls[r] if c[0] == "sample"]
    assert len(samples) == len(set(samples))                       # nothing twice
    assert {c for c in calls[0] if c[0] == "sample"}.isdisjoint(c for c in calls[1] if c[0] == "sample")
    # diffusion: unguided, tweedie, learned x 2 seeds; onestep: unguided, tweedie (its noise tilt),
    # learned x 2; flow: 4; best-of-2 on 3 models, SMC-2 on 2, twisted SMC-2 (without and with
    # hand-off) on diffusion; 4 fine-tuning rows x 2 seeds x 2 budgets
    assert len(samples) == 4 + 4 + 4 + 3 + 2 + 2 + 16
    assert {c[5] for c in samples if c[3] == "learned"} == {"guidance-diffusion-0", "guidance-diffusion-1",
                                                            "guidance-onestep-0", "guidance-onestep-1"}
    assert sorted(c[1] for r in (0, 1) for c in calls[r] if c[0] == "oracle") == ["diffusion", "flow", "onestep"]
    assert all(abs(len([c for c in calls[r] if c[0] == "sample"]) - len(samples) / 2) <= 1 for r in (0, 1))


def test_rows_filter_runs_only_the_named_rows_and_their_models_unguided_row():
    from tiltgen.eval.world_bench import finetune_plan, planned_models, row_names, sampling_plan

    full = BenchSettings()
    assert len(sampling_plan(full)) == 10 + 3 * 2 + 2 * 2 + 2 * 2 and len(finetune_plan(full)) == 4
    settings = BenchSettings(particles=(4, 8), rows=("diffusion:learned", "diffusion:twisted-smc",
                                                     "onestep:finetune-draft"))
    assert sampling_plan(settings) == [("diffusion", "unguided", 1), ("diffusion", "learned", 1),
                                       ("onestep", "unguided", 1), ("diffusion", "twisted-smc", 4),
                                       ("diffusion", "twisted-smc", 8)]
    assert finetune_plan(settings) == [("draft", "onestep")]
    assert planned_models(settings) == ["diffusion", "onestep"]          # no flow oracle to compute
    assert all(row in row_names() for row in settings.rows)


@pytest.mark.parametrize("kwargs, message", [({"rows": ("diffusion:learned", "flow:learned")}, "flow:learned"),
                                             ({"particles": (1, 4)}, "particle counts"),
                                             ({"particles": ()}, "particle counts"),
                                             ({"seeds": 0}, "seeds"),
                                             ({"bank": 1}, "sample bank")])
def test_bad_bench_world_settings_are_refused_by_name(kwargs, message):
    from tiltgen.errors import TiltgenError

    with pytest.raises(TiltgenError, match=message):
        BenchSettings(**kwargs)


def test_bench_world_cli_flags_set_the_settings():
    import argparse

    from tiltgen.cli.main import _bench_world_overrides
    from tiltgen.errors import TiltgenError

    args = argparse.Namespace(particles="4,8", rows="diffusion:learned, diffusion:bestofn", seeds=1, bank=16)
    assert _bench_world_overrides(args) == {"particles": (4, 8), "rows": ("diffusion:learned", "diffusion:bestofn"),
                                            "seeds": 1, "bank": 16}
    none = dict(particles=None, rows=None, seeds=None, bank=None)
    assert _bench_world_overrides(argparse.Namespace(**none)) == {}
    with pytest.raises(TiltgenError, match="--particles"):
        _bench_world_overrides(argparse.Namespace(**{**none, "particles": "4,x"}))
    with pytest.raises(TiltgenError, match="--rows"):
        _bench_world_overrides(argparse.Namespace(**{**none, "rows": " , "}))


def test_setup_cost_charges_a_bank_row_its_banks_and_twisted_smc_its_network():
    from tiltgen.eval.world_bench import setup_cost

    bank_stage = {"bank": {"size": 32, "prompts": 4, "flops": 7_000, "wall_s": 2.5}}
    assert setup_cost(bank_stage, "trainingfree-bank", None) == (7_000, 0, 2.5)
    shipped = [{"data_flops": 10, "calibration_flops": 5, "train_flops": 3}]
    assert setup_cost({}, "twisted-smc", shipped) == (15, 3, 0.0)
    assert setup_cost({}, "trainingfree", shipped) == (0, 0, 0.0)


@pytest.mark.filterwarnings("ignore")
def test_bank_row_draws_one_bank_per_prompt_and_records_its_cost(tmp_path):
    """flow:trainingfree-bank on the built-in flow (2 images, a bank of 4): the stage records the
    bank's FLOPs and wall as setup, apart from the per-image sampling FLOPs, and the bank changes
    the images of plain training-free guidance."""
    from tiltgen.eval.world_bench import MODELS, Judges, sampling_stage

    settings = BenchSettings(prompts=("a red shape",), n=2, bank=4)
    cache, judges = StageCache(tmp_path), Judges()
    banked = sampling_stage(cache, judges, "flow", MODELS["flow"], "trainingfree-bank", settings)
    plain = sampling_stage(cache, judges, "flow", MODELS["flow"], "trainingfree", settings)
    assert banked["bank"]["size"] == 4 and banked["bank"]["prompts"] == 1
    unguided = sampling_stage(cache, judges, "flow", MODELS["flow"], "unguided", settings)
    assert banked["bank"]["flops"] >= 4 * unguided["sampling_flops_per_image"]  # 4 unguided images, their rewards
    assert banked["bank"]["wall_s"] > 0 and "bank" not in plain
    assert banked["prompts"][0]["proxy"] != plain["prompts"][0]["proxy"]
    # another bank size is another stage
    other = sampling_stage(cache, judges, "flow", MODELS["flow"], "trainingfree-bank",
                           BenchSettings(prompts=("a red shape",), n=2, bank=2))
    assert other["bank"]["size"] == 2
